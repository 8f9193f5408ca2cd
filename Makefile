# superclip-pl: `make help` lists the targets. Targets that need the environment install it on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.DEFAULT_GOAL := help
.PHONY: help install test test-fast lint format data demo ablation bench gpu-check clean

help:  ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package (torch CPU build first, then the rest)

test: $(STAMP)  ## run the whole test suite (CPU only, offline)
	$(BIN)/pytest -q

test-fast: $(STAMP)  ## run the tests not marked slow
	$(BIN)/pytest -q -m "not slow"

lint: $(STAMP)  ## ruff check and format check
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

clean:  ## remove outputs and caches (keeps .venv and data)
	rm -rf outputs lightning_logs .pytest_cache .ruff_cache

data: $(STAMP)  ## render the demo data set into data/shapes (skipped when already up to date)
	$(BIN)/python -m superclip_pl.synthetic --output-dir data/shapes

demo: $(STAMP)  ## train CLIP and SuperCLIP on the shapes data (makes it if missing), compare them
	$(BIN)/python -m superclip_pl.synthetic --output-dir data/shapes
	$(BIN)/python -m superclip_pl.demo

ablation: $(STAMP)  ## CLIP vs SuperCLIP, batch 8..128 x 3 seeds, 40k samples (~3 h; ARGS="--batch-sizes 16" ~40 min)
	$(BIN)/python -m superclip_pl.synthetic --output-dir data/shapes
	$(BIN)/python -m superclip_pl.ablation $(ARGS)

bench: $(STAMP)  ## benchmarks (about 10 min on 2 cores): table + outputs/bench/results.json
	$(BIN)/python benchmarks/run.py $(ARGS)

gpu-check: $(STAMP)  ## on a CUDA machine: ViT-B/16 throughput and MFU, torch.compile, one FSDP step
	$(BIN)/python benchmarks/gpu_check.py $(ARGS)
