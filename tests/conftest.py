"""Shared fixtures: everything is built in code, offline, on the CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from superclip_pl.tokenizer import train_bpe_tokenizer  # noqa: E402

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
