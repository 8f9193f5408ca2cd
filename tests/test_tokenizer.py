"""The CLIP-style BPE tokenizer trainer: layout of the special tokens, reproducible ids, loading errors."""

import os
import subprocess
import sys

import pytest

from conftest import tiny_captions
from superclip_pl.tokenizer import BOS, EOS, load_tokenizer, train_bpe_tokenizer

TRAIN_AND_PRINT = """
import sys; sys.path.insert(0, {tests!r})
from conftest import tiny_captions
from superclip_pl.tokenizer import train_bpe_tokenizer
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
