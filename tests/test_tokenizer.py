"""Tokenizers: the CLIP-style BPE trainer (special tokens, reproducible ids), loading errors, tokenising."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_captions
from superclip_pl.shapes.bpe import BOS, EOS, train_bpe_tokenizer
from superclip_pl.tokenizer import load_tokenizer, tokenize

TRAIN_AND_PRINT = """
import sys; sys.path.insert(0, {tests!r})
from conftest import tiny_captions
from superclip_pl.shapes.bpe import train_bpe_tokenizer
tok = train_bpe_tokenizer(tiny_captions(), None, vocab_size=96)
print(sorted(tok.get_vocab().items(), key=lambda kv: kv[1]))
"""


def test_special_tokens_last_and_pad_is_eos(tokenizer):
    n = len(tokenizer)
    assert tokenizer.convert_ids_to_tokens([n - 2, n - 1]) == [BOS, EOS]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (n - 2, n - 1, n - 1)
    ids = tokenizer("a red circle")["input_ids"]
    assert ids[0] == n - 2 and ids[-1] == n - 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red circle"


def test_ids_are_the_same_in_every_process(tmp_path):
    # the BPE trainer numbers initial symbols in hash order; ours are renumbered in sorted order
    code = TRAIN_AND_PRINT.format(tests=os.path.dirname(__file__))
    runs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    assert len(runs) == 1


def test_saved_directory_loads_with_autotokenizer(tmp_path):
    train_bpe_tokenizer(tiny_captions(), tmp_path, vocab_size=96)
    tok = load_tokenizer(str(tmp_path))
    assert tok.eos_token == EOS and tok.model_max_length == 77
    long = tok(["red " * 200], truncation=True, max_length=77)["input_ids"][0]
    assert len(long) == 77 and long[-1] == tok.eos_token_id  # truncation keeps the end-of-text token


def test_missing_tokenizer_fails_with_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"cannot load tokenizer '.*nowhere'.*does not exist") as err:
        load_tokenizer(str(tmp_path / "nowhere"))
    assert "\n" not in str(err.value)


def test_tokenize_pads_to_longest_and_keeps_eos_when_truncating(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    eos = tokenizer.eos_token_id
    long = "a photo of a small red circle and a big green square " * 10
    out = tokenize(tokenizer, ["a red circle", long], max_length=12)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape == (2, 12) and ids.dtype == mask.dtype == torch.long
    assert ids[1, -1] == eos and mask[1].all()  # truncated, EOS kept as the last token
    assert ids[0, 0] == tokenizer.bos_token_id
    n = int(mask[0].sum())
    assert ids[0, n - 1] == eos and (ids[0, n:] == tokenizer.pad_token_id).all() and not mask[0, n:].any()

    short = tokenize(tokenizer, ["a red circle", "a star"])
    assert short["input_ids"].shape[1] == short["attention_mask"].sum(1).max()  # longest, not 77
    # the first EOS (where CLIP pools) sits at the same place as with padding to 77
    padded = tokenizer(["a red circle", "a star"], padding="max_length", max_length=77)["input_ids"]
    first_eos = [row.index(eos) for row in padded]
    assert first_eos == [row.tolist().index(eos) for row in short["input_ids"]]
