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


def _cut(input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int, eos: int | None):
    """(B, T) ids and mask cut to at most `length` tokens; a caption that was longer keeps EOS last."""
    if input_ids.shape[1] <= length:
        return input_ids, attention_mask
    longer = attention_mask[:, length].bool()
    input_ids, attention_mask = input_ids[:, :length].clone(), attention_mask[:, :length].clone()
    if eos is not None:
        input_ids[longer, -1] = eos
    return input_ids, attention_mask


def tokenize(
    tokenizer, texts: list[str], max_length: int = 77, class_max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """Tokenise captions: `input_ids` and `attention_mask`, (B, T) long, T = longest in the batch.

    Padding to the longest caption instead of to `max_length` changes nothing for CLIP's text tower
    (causal attention, pooled at the first end-of-text token) and saves compute on short captions.
    A caption longer than `max_length` is cut so that the end-of-text token stays its last token.

    With a `class_max_length` other than `max_length`, also `class_ids` (B, T'): the same captions
    cut at `class_max_length` tokens instead, for the classification targets (the vocabulary head
    has no context limit). One tokenisation serves both: cutting the longer one at `max_length`
    gives exactly what tokenising at `max_length` gives.
    """
    longest = max(max_length, class_max_length or max_length)
    out = tokenizer(list(texts), padding="longest", truncation=True, max_length=longest, return_tensors="pt")
    input_ids, attention_mask = out["input_ids"].long(), out["attention_mask"].long()
    eos = tokenizer.eos_token_id
    if eos is not None and input_ids.shape[1] == longest:
        # tokenizers whose post-processor does not re-add EOS after truncation: put it back
        full = attention_mask[:, -1].bool() & (input_ids[:, -1] != eos)
        input_ids[full, -1] = eos
    text_ids, text_mask = _cut(input_ids, attention_mask, max_length, eos)
    batch = {"input_ids": text_ids, "attention_mask": text_mask}
    if class_max_length is not None and class_max_length != max_length:
        batch["class_ids"] = _cut(input_ids, attention_mask, class_max_length, eos)[0]
    return batch
