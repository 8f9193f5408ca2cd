"""``superclip_head.safetensors``: the vocabulary head and the IDF counts that a SuperCLIP directory
holds beside the HF ``CLIPModel`` files (``superclip export`` and ``superclip import`` write it,
``SuperCLIP.from_pretrained`` and ``--model.backbone DIR`` read it). The model reads it, so it lives with
the method; the rest of the directory's format is in ``superclip_pl.interop.clipdir``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

HEAD_FILE = "superclip_head.safetensors"  # head.{norm,proj}.{weight,bias}, doc_freq.{df,num_docs}
# what the vocabulary head averages (the file's metadata records it): the index of the first token of the
# tower's (B, 1 + P, W) output it takes; skip_first_patch is the reference before its commit bc640a6
HEAD_POOLING = {"all_patches": 1, "skip_first_patch": 2}


def locate(name_or_path: str, filename: str) -> Path | None:
    """``filename`` in a local directory or a hub repo (through the hub cache), None when absent."""
    if os.path.isdir(name_or_path):
        path = Path(name_or_path) / filename
        return path if path.is_file() else None
    if os.path.exists(name_or_path) or name_or_path.count("/") != 1:
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(name_or_path, filename))
    except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError):
        return None


def read_extras(name_or_path: str) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """``(head state, doc_freq state)`` of a directory's ``superclip_head.safetensors`` (None, None
    without one; either is None when the file lacks it)."""
    path = locate(name_or_path, HEAD_FILE)
    if path is None:
        return None, None
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"cannot read {str(path)!r}: {err}; re-run `superclip import` or delete it"
        ) from None
    part = lambda prefix: {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)} or None
    return part("head."), part("doc_freq.")


def read_head_pooling(name_or_path: str) -> str | None:
    """The head pooling a directory's ``superclip_head.safetensors`` records (``superclip import
    --head_pooling``), None without one."""
    from safetensors import safe_open

    path = locate(name_or_path, HEAD_FILE)
    if path is None:
        return None
    with safe_open(path, "pt") as f:
        return (f.metadata() or {}).get("head_pooling")
