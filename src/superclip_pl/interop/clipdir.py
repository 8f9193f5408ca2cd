"""An HF ``CLIPModel`` directory as ``superclip export`` and ``superclip import`` write it, and the one
file of ours beside it: ``superclip_head.safetensors``, the vocabulary head and the IDF counts.

The directory holds ``model.safetensors`` + ``config.json`` (the two towers), the tokenizer, a
``CLIPImageProcessor`` that reproduces :func:`superclip_pl.transforms.eval_transform` (resize the
shortest side, centre crop, mean/std, bicubic), the ``CLIPProcessor`` that joins them, and a
``README.md``; ``transformers.pipeline("zero-shot-image-classification", model=DIR)`` loads it offline
and ignores the head file, which ``--model.backbone DIR`` reads to fine-tune with the head and
counts a run (or an imported SuperCLIP checkpoint) ended with.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPProcessor

from superclip_pl.head_file import HEAD_FILE
from superclip_pl.transforms import CLIP_MEAN, CLIP_STD


def check_output_dir(output_dir: str | Path, overwrite: bool) -> Path:
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(
            f"output dir {str(out)!r} exists and is not empty; pass --overwrite to write into it"
        )
    return out


def write_clip_dir(
    out: Path,
    weights: dict[str, torch.Tensor],
    config: CLIPConfig,
    tokenizer,
    card: str,
    dtype: torch.dtype = torch.float32,
    head: dict[str, torch.Tensor] | None = None,
    doc_freq: dict[str, torch.Tensor] | None = None,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    idf_batch_size: int | None = None,
    head_pooling: str | None = None,
) -> Path:
    """Write the directory (``weights``: a ``CLIPModel`` state dict; ``head``: ``VocabularyHead`` state;
    ``doc_freq``: ``DocumentFrequency`` state; ``idf_batch_size``: the global batch the counts were read
    at, kept for an export back to the reference's format; ``head_pooling``: what the head averages, read
    by ``--model.backbone DIR``); floating-point weights are saved as ``dtype``."""
    out.mkdir(parents=True, exist_ok=True)
    cast = lambda ts: {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in ts.items()}
    save_file(cast(weights), out / "model.safetensors", metadata={"format": "pt"})
    if head is not None or doc_freq is not None:
        extras = {f"head.{k}": v for k, v in cast(head or {}).items()}
        extras |= {f"doc_freq.{k}": v.contiguous() for k, v in (doc_freq or {}).items()}
        meta = {"format": "pt"} | ({"idf_batch_size": str(idf_batch_size)} if idf_batch_size else {})
        meta |= {"head_pooling": head_pooling} if head_pooling else {}
        save_file(extras, out / HEAD_FILE, metadata=meta)
    config.dtype = dtype
    config.save_pretrained(out)
    size = config.vision_config.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(mean),
        image_std=list(std),
        resample=Image.Resampling.BICUBIC,  # as the eval transform
    )
    # the processor also saves the tokenizer; preprocessor_config.json is for readers of the older layout
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    image_processor.save_pretrained(out)
    (out / "README.md").write_text(card)
    shareable(out)
    return out


def shareable(*paths: Path) -> None:
    """Give files (or a directory's files) the mode the umask gives new files (0644 with the usual
    022): safetensors writes 0600, and models and embeddings are shared with a group."""
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        for file in path.iterdir() if path.is_dir() else [path]:
            if file.is_file():
                os.chmod(file, 0o666 & ~umask)
