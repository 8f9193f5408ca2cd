"""Models, batches and the training-step loss the benchmarks share.

CLIP-shaped runs need the 49408-token CLIP vocabulary offline. Only the vocabulary *size* and the
special-token ids matter for cost, so the models are built from a config with those numbers, and
where a real tokenizer object is needed (``LitSuperCLIP`` loads one from a directory) a word-level
tokenizer of that size is made in code (:func:`word_tokenizer`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch.utils.data import IterableDataset
from transformers import CLIPConfig, PreTrainedTokenizerFast

from superclip_pl.losses import DocumentFrequency, classification_loss, contrastive_loss
from superclip_pl.model import SuperCLIP, clip_config
from superclip_pl.train.flops import training_step_flops

CLIP_VOCAB = 49408  # OpenAI CLIP BPE: 49406 ordinary tokens, then <|startoftext|>, <|endoftext|>
CONTEXT = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def clip_vocab_overrides(vocab_size: int = CLIP_VOCAB) -> dict:
    """Text-config overrides for a CLIP-style vocabulary of ``vocab_size`` (specials last, pad = eos)."""
    bos, eos = vocab_size - 2, vocab_size - 1
    return {
        "text_config": {
            "vocab_size": vocab_size,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": eos,
        }
    }


def toy_preset(patch_size: int) -> dict:
    """The seconds-long stand-in architecture of the benchmarks' quick mode (one layer of width 32 per
    tower): the same code path as the full run, for tests."""
    layer = dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, hidden_act="gelu"
    )
    return {
        "projection_dim": 32,
        "vision_config": dict(layer, patch_size=patch_size),
        "text_config": dict(layer, max_position_embeddings=CONTEXT),
    }


def vocab_config(
    preset: str | dict,
    vocab_size: int = CLIP_VOCAB,
    image_size: int | None = None,
    overrides: dict | None = None,
) -> CLIPConfig:
    """The preset's ``CLIPConfig`` with a CLIP-style vocabulary of ``vocab_size``."""
    overrides = dict(overrides or {})
    overrides["text_config"] = {
        **overrides.get("text_config", {}),
        **clip_vocab_overrides(vocab_size)["text_config"],
    }
    return clip_config(preset, image_size=image_size, overrides=overrides)


def build_model(
    preset: str | dict,
    head: bool,
    vocab_size: int = CLIP_VOCAB,
    image_size: int | None = None,
    overrides: dict | None = None,
) -> SuperCLIP:
    """A fresh ``SuperCLIP`` (``head=False``: plain CLIP) with a CLIP-style vocabulary of ``vocab_size``."""
    return SuperCLIP(vocab_config(preset, vocab_size, image_size, overrides), head=head)


def special_ids(vocab_size: int) -> list[int]:
    return [vocab_size - 2, vocab_size - 1]


def random_captions(
    batch: int, vocab_size: int, length: int = CONTEXT, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, length): BOS, 3..length-2 random tokens, EOS, EOS padding."""
    bos, eos = special_ids(vocab_size)
    ids = torch.randint(0, vocab_size - 2, (batch, length), generator=generator)
    n = torch.randint(3, length - 1, (batch,), generator=generator)  # ordinary tokens per caption
    pos = torch.arange(length)[None, :]  # (1, T)
    ids[:, 0] = bos
    ids = torch.where(pos >= n[:, None] + 1, eos, ids)  # EOS, then EOS as padding
    mask = (pos <= n[:, None] + 1).long()
    return ids, mask


def random_batch(
    batch: int, image_size: int, vocab_size: int, length: int = CONTEXT, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A dict batch as the data module yields: ``pixel_values`` (B, 3, H, W), ``input_ids``,
    ``attention_mask``."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = random_captions(batch, vocab_size, length, g)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=g)
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}


def step_loss(
    model: SuperCLIP,
    batch: dict[str, torch.Tensor],
    doc_freq: DocumentFrequency | None,
    ignore_ids: list[int],
    class_loss_weight: float = 1.0,
) -> torch.Tensor:
    """The loss of ``LitSuperCLIP.compute_losses`` on one process: contrastive + weight x class, with the
    document frequencies counted first (``doc_freq=None`` for a model without a head, or on the meta
    device, where counting needs real data: the IDF weights are then all ones, with the same cost)."""
    out = model(batch["pixel_values"], batch["input_ids"], batch.get("attention_mask"))
    loss = contrastive_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])
    if out["vocab_logits"] is not None:
        if doc_freq is not None:
            doc_freq.update(batch["input_ids"], ignore_ids)
            idf = doc_freq.idf().to(out["vocab_logits"].device)
        else:
            idf = out["vocab_logits"].new_ones(out["vocab_logits"].shape[1])
        loss = loss + class_loss_weight * classification_loss(
            out["vocab_logits"], batch["input_ids"], idf, ignore_ids
        )
    return loss


def flops_per_step(
    preset, vocab_size: int, image_size: int, batch: int, head: bool, overrides: dict | None = None
) -> int:
    """Forward + backward FLOPs of one training step (optimizer excluded), counted on the meta device."""
    return training_step_flops(vocab_config(preset, vocab_size, image_size, overrides), head, batch, CONTEXT)


def word_tokenizer(vocab_size: int, output_dir: str | Path) -> str:
    """Save a word-level tokenizer with ``vocab_size`` ids laid out like CLIP's (``w0``.. then BOS, EOS;
    pad = EOS) to ``output_dir``, for ``LitSuperCLIP`` at CLIP vocabulary size offline. Returns the dir."""
    vocab = {f"w{i}": i for i in range(vocab_size - 2)}
    vocab |= {BOS: vocab_size - 2, EOS: vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS))  # benchmarks feed known words only
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab_size - 2), (EOS, vocab_size - 1)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, model_max_length=CONTEXT
    )
    hf.save_pretrained(str(output_dir))
    return str(output_dir)


class Batches(IterableDataset):
    """The given dict batches, in order, for ``DataLoader(Batches(batches), batch_size=None)``."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]):
        self.batches = batches

    def __iter__(self):
        yield from self.batches
