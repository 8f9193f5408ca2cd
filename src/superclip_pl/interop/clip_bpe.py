"""The CLIP BPE tokenizer (OpenAI's, as open_clip ships it) as an HF ``CLIPTokenizer``, built offline.

open_clip's ``SimpleTokenizer`` reads ``bpe_simple_vocab_16e6.txt.gz`` (inside the ``open_clip_torch``
wheel and the reference SuperCLIP repository): 48,894 merges give a vocabulary of 256 byte symbols,
the same 256 with the end-of-word mark ``</w>``, one token per merge and the two special tokens,
49,408 in all (``<|startoftext|>`` = 49406, ``<|endoftext|>`` = 49407, the largest id, where the text
tower pools). The vocabulary here is built in the same order, so the ids are open_clip's.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # the merges open_clip reads: lines 1 .. 48894 of the file
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2  # 49408
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# open_clip cleans captions with html.unescape twice (and ftfy.fix_text, which mends mojibake and has no
# tokenizer counterpart): the entities web captions carry are unescaped here too, &amp; twice
ENTITIES = [("&amp;", "&"), ("&amp;", "&"), ("&quot;", '"'), ("&#39;", "'"), ("&#x27;", "'")]
ENTITIES += [("&apos;", "'"), ("&lt;", "<"), ("&gt;", ">"), ("&nbsp;", " ")]


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of GPT-2 and CLIP (the 256 base symbols, in id order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars), strict=True))


def find_bpe_file() -> Path | None:
    """``bpe_simple_vocab_16e6.txt.gz`` of an installed ``open_clip`` (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        if (Path(folder) / BPE_FILE).is_file():
            return Path(folder) / BPE_FILE
    return None


def read_merges(bpe_path: str | Path) -> list[tuple[str, str]]:
    """The merges of a ``bpe_simple_vocab_16e6.txt.gz`` file, checked to be complete."""
    try:
        with gzip.open(bpe_path) as f:
            lines = f.read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read the CLIP BPE merges from {str(bpe_path)!r}: {err}") from None
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(
            f"{str(bpe_path)!r} holds {len(merges)} merges, not the {NUM_MERGES} of the CLIP BPE "
            f"({BPE_FILE} from the open_clip_torch package)"
        )
    return merges


def clip_bpe_tokenizer(bpe_path: str | Path | None = None, context_length: int = 77):
    """An HF ``CLIPTokenizer`` with open_clip's ids: lower-cased, ``context_length`` tokens, padded with
    ``<|endoftext|>`` (open_clip pads with 0; the text tower pools at the first end-of-text token
    under a causal mask, so the padding never changes an embedding)."""
    from tokenizers import normalizers
    from transformers import CLIPTokenizer

    bpe_path = bpe_path or find_bpe_file()
    if bpe_path is None:
        raise ValueError(
            f"no CLIP BPE vocabulary found: pass --tokenizer with the path of {BPE_FILE} (it ships in "
            "the open_clip_torch package), a tokenizer directory, or a hub id such as "
            "openai/clip-vit-base-patch16"
        )
    merges = read_merges(bpe_path)
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [SOT, EOT]
    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=EOT,
        bos_token=SOT,
        eos_token=EOT,
        pad_token=EOT,
        model_max_length=context_length,
    )
    backend = tokenizer.backend_tokenizer  # NFC, whitespace runs -> " ", lower case
    backend.normalizer = normalizers.Sequence(
        [*(normalizers.Replace(*e) for e in ENTITIES), backend.normalizer]
    )
    return tokenizer
