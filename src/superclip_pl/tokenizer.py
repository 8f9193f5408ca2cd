"""Train a CLIP-style BPE tokenizer on captions and save it as an HF tokenizer directory.

Real runs use the CLIP BPE tokenizer from the hub (``openai/clip-vit-base-patch16``, vocab 49408).
The offline demo and the tests train a small tokenizer of the same kind on their own captions:
lower-cased, whitespace/punctuation pre-tokenised, byte-pair merges with an end-of-word ``</w>``
suffix, and the two CLIP special tokens appended at the *end* of the vocabulary, as in CLIP
(``<|startoftext|>`` = vocab - 2, ``<|endoftext|>`` = vocab - 1, padding with ``<|endoftext|>``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def train_bpe_tokenizer(
    texts: Iterable[str], output_dir: str | Path | None = None, vocab_size: int = 512, max_length: int = 77
) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer on ``texts``; save it to ``output_dir`` (loadable by ``AutoTokenizer``)."""
    tok = Tokenizer(models.BPE(unk_token=None, end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2, end_of_word_suffix="</w>", show_progress=False, min_frequency=1
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok = _canonical_ids(tok)
    # special tokens go last, as in CLIP, so that ids 0.. are ordinary tokens
    tok.add_special_tokens([BOS, EOS])
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, bos), (EOS, eos)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=max_length,
        padding_side="right",
        truncation_side="right",
    )
    if output_dir is not None:
        hf.save_pretrained(str(output_dir))
    return hf


def _canonical_ids(tok: Tokenizer) -> Tokenizer:
    """Renumber the vocabulary reproducibly: the BPE trainer numbers the initial symbols in hash order.

    Initial symbols (single characters, with and without ``</w>``) come first in sorted order, then the
    merged tokens in merge order; the merges themselves, and so every tokenisation, are unchanged.
    """
    spec = json.loads(tok.to_str())
    model = spec["model"]
    merged = ["".join(m) if isinstance(m, list) else m.replace(" ", "") for m in model["merges"]]
    merged = [t for t in dict.fromkeys(merged) if t in model["vocab"]]
    initial = sorted(set(model["vocab"]) - set(merged))
    model["vocab"] = {t: i for i, t in enumerate(initial + merged)}
    return Tokenizer.from_str(json.dumps(spec))


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
