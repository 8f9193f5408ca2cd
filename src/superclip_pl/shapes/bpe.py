"""Train a CLIP-style BPE tokenizer on captions and save it as an HF tokenizer directory.

Real runs use the CLIP BPE tokenizer from the hub (``openai/clip-vit-base-patch16``, vocab 49408).
The offline demo and the tests train a small tokenizer of the same kind on their own captions:
lower-cased, whitespace/punctuation pre-tokenised, byte-pair merges with an end-of-word ``</w>``
suffix, and the two CLIP special tokens appended at the *end* of the vocabulary, as in CLIP
(``<|startoftext|>`` = vocab - 2, ``<|endoftext|>`` = vocab - 1, padding with ``<|endoftext|>``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END = "</w>"  # end-of-word suffix of the last symbol of every word


def learn_merges(word_counts: Counter[str], max_tokens: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Byte-pair merges over words (CLIP style: the last symbol of a word carries ``</w>``).

    Deterministic: the most frequent pair wins, ties go to the lexicographically smallest pair (the
    ``tokenizers`` trainer breaks ties by ids it assigns in hash order, so it differs between runs).
    Works on the distinct words with their counts: fine for captions of a synthetic or small corpus.
    Stops at ``max_tokens`` tokens (initial symbols + merged) or when no pair is left to merge.
    Returns the initial symbols (sorted) and the merges in order.
    """
    words = {w: [*w[:-1], w[-1] + END] for w in word_counts if w}
    alphabet = sorted({sym for syms in words.values() for sym in syms})
    merges: list[tuple[str, str]] = []
    merged: set[str] = set()
    while len(alphabet) + len(merged) < max_tokens:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, syms in words.items():
            for pair in zip(syms, syms[1:], strict=False):
                pairs[pair] += word_counts[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        merged.add(joined)
        for w, syms in words.items():
            i, out = 0, []
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[w] = out
    return alphabet, merges


def train_bpe_tokenizer(
    texts: Iterable[str], output_dir: str | Path | None = None, vocab_size: int = 512, max_length: int = 77
) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer on ``texts``; save it to ``output_dir`` (loadable by ``AutoTokenizer``).

    The vocabulary holds at most ``vocab_size`` tokens (fewer when the text runs out of pairs to merge):
    initial symbols in sorted order, merged tokens in merge order, then the two special tokens.
    """
    normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.Whitespace()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    alphabet, merges = learn_merges(counts, vocab_size - 2)
    tokens = alphabet + [t for t in dict.fromkeys(a + b for a, b in merges) if t not in alphabet]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix=END))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.decoder = decoders.BPEDecoder(suffix=END)
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
