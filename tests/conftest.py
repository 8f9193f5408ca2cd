"""Shared fixtures: everything is built in code, offline, on the CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from shards import write_bad_shards, write_shards  # noqa: E402
from superclip_pl.shapes.bpe import train_bpe_tokenizer  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle", "star"]


def tiny_captions() -> list[str]:
    """A few hundred compositional captions, enough to train a small BPE vocabulary."""
    caps = []
    for i, c in enumerate(COLOURS):
        for j, s in enumerate(SHAPES):
            other = f"{COLOURS[(i + 1) % 4]} {SHAPES[(j + 2) % 4]}"
            caps += [f"a {c} {s}", f"a photo of a small {c} {s} and a big {other}", f"{c} {s} on the left"]
    return caps * 4


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """Directory of a CLIP-style BPE tokenizer (special tokens last, pad = eos) for tests."""
    out = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(tiny_captions(), out, vocab_size=96)
    return str(out)


@pytest.fixture(scope="session")
def good_shards(tmp_path_factory) -> tuple[str, dict[str, int]]:
    """4 shards x 6 good samples: (glob pattern, {key: index})."""
    root = tmp_path_factory.mktemp("good")
    return str(root / "*.tar"), write_shards(root, num_shards=4, per_shard=6)


@pytest.fixture(scope="session")
def bad_shards(tmp_path_factory) -> tuple[str, set[str]]:
    """4 shards with 14 good samples and BAD_SKIPS bad ones: (glob pattern, good keys)."""
    root = tmp_path_factory.mktemp("bad")
    return str(root / "*.tar"), write_bad_shards(root)


# a smaller-than-tiny architecture: every test model is built from this (fast on 2 cores)
MICRO = {
    "projection_dim": 32,
    "vision_config": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
    ),
    "text_config": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
}


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def batch(tokenizer):
    """A fixed batch of 8: random images and distinct captions, padded to the longest."""
    import torch

    g = torch.Generator().manual_seed(0)
    caps = [f"a {c} {s} on the left" for c, s in zip(COLOURS * 2, SHAPES + SHAPES[::-1], strict=True)]
    enc = tokenizer(caps, padding="longest", return_tensors="pt")
    return {
        "pixel_values": torch.randn(8, 3, 16, 16, generator=g),
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
    }


def quiet_trainer(**kwargs):
    """A one-device CPU Trainer without logger, checkpoints, progress bar or model summary."""
    from lightning.pytorch import Trainer

    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return Trainer(**(defaults | kwargs))
