"""Tokenizers: loading one (hub id or local directory) and tokenising captions the way CLIP does.

Real runs use the CLIP BPE tokenizer from the hub (``openai/clip-vit-base-patch16``, vocab 49408);
the offline demo trains a small one of the same kind (``superclip_pl.shapes.bpe``).
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_tokenizer(name_or_path: str):
    """``AutoTokenizer.from_pretrained`` with one clear line when the name or directory is not usable."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        hint = (
            "the directory does not exist" if not Path(name_or_path).exists() and "/" in name_or_path else ""
        )
        hint = hint or str(err).strip().splitlines()[0]
        raise ValueError(
            f"cannot load tokenizer {name_or_path!r}: {hint}; give a local tokenizer directory "
            "(e.g. data/shapes/tokenizer, made by `make data`) or a hub id (needs the network)"
        ) from None


def tokenize(tokenizer, texts: list[str], max_length: int = 77) -> dict[str, torch.Tensor]:
    """Tokenise captions: `input_ids` and `attention_mask`, (B, T) long, T = longest in the batch.

    Padding to the longest caption instead of to `max_length` changes nothing for CLIP's text tower
    (causal attention, pooled at the first end-of-text token) and saves compute on short captions.
    A caption longer than `max_length` is cut so that the end-of-text token stays its last token.
    """
    out = tokenizer(
        list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
    )
    input_ids, attention_mask = out["input_ids"].long(), out["attention_mask"].long()
    eos = tokenizer.eos_token_id
    if eos is not None and input_ids.shape[1] == max_length:
        # tokenizers whose post-processor does not re-add EOS after truncation: put it back
        full = attention_mask[:, -1].bool() & (input_ids[:, -1] != eos)
        input_ids[full, -1] = eos
    return {"input_ids": input_ids, "attention_mask": attention_mask}
