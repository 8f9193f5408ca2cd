# superclip-pl: `make help` lists the targets. Targets that need the environment install it on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
REFS    := $(VENV)/.test-references
# reference implementations the tests compare against (open_clip for the checkpoint interop,
# CLIP_benchmark for the evaluation numbers), installed without their dependencies, which would
# replace the CPU torch with a CUDA build and add torchvision, which cannot load beside it;
# CLIP_benchmark's metrics need only scikit-learn besides
TEST_REFERENCES := open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 timm==1.0.31 clip-benchmark==1.6.2
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
	$(BIN)/pip install -q -e ".[dev,demo,opencv]"
	touch $(STAMP)

$(REFS): $(STAMP) Makefile
	$(BIN)/pip install -q --no-deps $(TEST_REFERENCES)
	$(BIN)/pip install -q "scikit-learn>=1.3"
	touch $(REFS)

install: $(STAMP) $(REFS)  ## create .venv and install the package (torch CPU build first, then the rest)

test: $(STAMP) $(REFS)  ## run the whole test suite (CPU only, offline)
	$(BIN)/pytest -q

test-fast: $(STAMP) $(REFS)  ## run the tests not marked slow
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
	$(BIN)/python -m superclip_pl.shapes.dataset --output-dir data/shapes

demo: $(STAMP)  ## train CLIP and SuperCLIP on the shapes data (makes it if missing), compare them; ARGS="--seeds 0 1 2" for more seeds
	$(BIN)/python -m superclip_pl.shapes.dataset --output-dir data/shapes
	$(BIN)/python -m superclip_pl.demo $(ARGS)

# the grid of docs/results.md on the demo set and model: batch 16/32/64/128, 3 seeds, 80k samples each (the demo's),
# evaluated at the end (add --eval-every 16000 for learning curves in TensorBoard); 50 min on the
# 2 idle cores (docs/results.md). ARGS replaces all of it, e.g.
# ARGS="--batch-sizes 16 128 --seeds 0 --samples 2000" (a quick end-to-end check)
ABLATION := --batch-sizes 16 32 64 128 --seeds 0 1 2 --samples 80000
ablation: $(STAMP)  ## CLIP vs SuperCLIP at batch 16/32/64/128, 3 seeds, 80k samples (55 min on 2 cores); ARGS=... to change
	$(BIN)/python -m superclip_pl.shapes.dataset --output-dir data/shapes
	$(BIN)/python -m superclip_pl.shapes.ablation $(or $(ARGS),$(ABLATION))

bench: $(STAMP)  ## benchmarks (about 10 min on 2 cores): table + outputs/bench/results.json
	$(BIN)/python benchmarks/run.py $(ARGS)

gpu-check: $(STAMP)  ## on a CUDA machine: ViT-B/16 throughput and MFU, torch.compile, one FSDP step
	$(BIN)/python benchmarks/gpu_check.py $(ARGS)
