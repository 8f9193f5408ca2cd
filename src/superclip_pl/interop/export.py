"""``superclip export``: a SuperCLIP checkpoint -> a plain transformers ``CLIPModel`` directory.

The directory holds ``model.safetensors`` (the two towers, their projections and the logit scale;
the training-only vocabulary head and the SigLIP logit bias are left out), ``config.json``, the
training tokenizer, a ``CLIPImageProcessor`` that reproduces :func:`superclip_pl.transforms.eval_transform`
(resize the shortest side, centre crop, OpenAI CLIP mean/std, bicubic), the ``CLIPProcessor`` that
joins them, and a model card ``README.md``. ``transformers.pipeline("zero-shot-image-classification",
model=DIR)`` loads it offline (:mod:`superclip_pl.interop.clipdir`). ``--format open_clip`` writes the files
open_clip loads instead, head included (:mod:`superclip_pl.interop.openclip_export`).

Checkpoints are read as state dicts: nothing is trained or randomly initialised, the weights are
checked key by key and shape by shape against the ``CLIPConfig`` rebuilt from the hyperparameters.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPConfig, CLIPModel

from superclip_pl.interop.clipdir import check_output_dir, write_clip_dir
from superclip_pl.interop.importer import PAPER_BATCH
from superclip_pl.interop.modelcard import model_card
from superclip_pl.interop.openclip_export import read_clip_dir, write_open_clip
from superclip_pl.model import MAX_LOGIT_SCALE, PRESETS, clip_config
from superclip_pl.tokenizer import load_tokenizer

PREFIX = "model.clip."  # LitSuperCLIP.model (SuperCLIP) .clip (CLIPModel)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DCP_META = "meta.pt"  # what Lightning's ModelParallelStrategy writes next to the shards (rank 0)


def _read_remote(url: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A ``.ckpt`` at an fsspec URL, read whole into memory (object stores cannot be memory-mapped)."""
    import io

    import fsspec

    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {url!r} does not exist") from None
    except ImportError as err:  # the protocol's package (s3fs, gcsfs) is not installed
        raise ValueError(f"cannot read {url!r}: {_first_line(err)}") from None
    return _load(io.BytesIO(data), url)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, rest)`` of a Lightning ``.ckpt`` file (local or an fsspec URL: ``s3://...``) or a
    distributed checkpoint directory."""
    if "://" in str(path) and not str(path).startswith("file://"):
        return _read_remote(str(path))
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        if not (path / DCP_META).is_file() or not (path / ".metadata").is_file():
            raise ValueError(
                f"{str(path)!r} is a directory but not a Lightning distributed checkpoint "
                f"(no {DCP_META} and .metadata); pass a .ckpt file or a directory an FSDP strategy saved"
            )
        return _read_distributed(path)
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise ValueError(f"{str(path)!r} is not a SuperCLIP checkpoint: not a file written by torch.save")
    return _load(path, str(path), mmap=True)


def _load(source, name: str, **load_options) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, rest)`` of the ``torch.save`` archive ``source`` (a path or a buffer); ``name`` is
    what the user gave, for the one-line errors."""
    try:
        # plain tensors and Python values only: a checkpoint cannot run code while being read
        ckpt = torch.load(source, map_location="cpu", weights_only=True, **load_options)
    except pickle.UnpicklingError as err:  # a pickle, but with objects other than tensors and builtins
        raise ValueError(
            f"{name!r} holds objects torch.load(weights_only=True) refuses "
            f"({_first_line(err)}); if you trust it, re-save its state_dict and hyper_parameters alone"
        ) from None
    except Exception as err:  # not a zip or pickle at all
        raise ValueError(
            f"{name!r} is not a SuperCLIP checkpoint: torch.load cannot read it ({_first_line(err)})"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{name!r} is not a SuperCLIP checkpoint: it holds no Lightning state_dict")
    return ckpt.pop("state_dict"), ckpt


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:160]


def _read_distributed(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full (unsharded) model state of a ``torch.distributed.checkpoint`` directory, in one process.

    Only the model entries are read (the optimizer states, twice the model, are skipped); DCP
    reassembles each tensor from its shards into the full-size tensors allocated here.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    entries = reader.read_metadata().state_dict_metadata
    # Lightning saves {"state_dict": ..., "optimizer_0": ...} (ModelParallelStrategy) or {"model": ...}
    # (FSDPStrategy); DCP flattens nested keys with dots
    for top in ("state_dict", "model"):
        state = {
            key[len(top) + 1 :]: torch.empty(meta.size, dtype=meta.properties.dtype)
            for key, meta in entries.items()
            if key.startswith(top + ".") and isinstance(meta, TensorStorageMetadata)
        }
        if state:
            break
    wrapped = {top: state}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(wrapped, storage_reader=reader, no_dist=True)
    rest = torch.load(path / DCP_META, map_location="cpu", weights_only=True)
    return wrapped[top], rest


def rebuild_config(hparams: dict[str, Any], tokenizer) -> CLIPConfig:
    """The ``CLIPConfig`` the run trained, rebuilt the way ``SuperCLIP.build`` built it."""
    backbone = hparams.get("backbone", "tiny")
    if backbone in PRESETS:
        config = clip_config(backbone, tokenizer, hparams.get("image_size"), hparams.get("backbone_config"))
    else:
        try:
            config = CLIPConfig.from_pretrained(backbone)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"the checkpoint was fine-tuned from {backbone!r}, whose config.json cannot be loaded "
                f"({_first_line(err)}); make that directory or hub id available"
            ) from None
        if hparams.get("image_size"):  # fine-tuned at another size: position embeddings resampled
            config.vision_config.image_size = hparams["image_size"]
    # the tokenizer's special ids, so that the text tower pools at its end-of-text token
    config.text_config.bos_token_id = tokenizer.bos_token_id
    config.text_config.eos_token_id = tokenizer.eos_token_id
    config.text_config.pad_token_id = tokenizer.pad_token_id
    config.architectures = ["CLIPModel"]
    return config


def clip_weights(state_dict: dict[str, torch.Tensor], config: CLIPConfig) -> dict[str, torch.Tensor]:
    """The ``CLIPModel`` tensors of a LitSuperCLIP state dict, checked against ``config``."""
    weights = {k[len(PREFIX) :]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
    if "logit_scale" in weights:
        # FSDP2 training holds the 0-d scale as shape (1,); our model clamps it at log(100) when it uses
        # it and HF CLIPModel does not, so the clamped value is what reproduces our scores
        weights["logit_scale"] = weights["logit_scale"].reshape(()).clamp(max=MAX_LOGIT_SCALE)
    with torch.device("meta"):  # shapes without allocating or initialising anything
        expected = {k: v.shape for k, v in CLIPModel(config).state_dict().items()}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if weights[k].shape != expected[k])
    if missing or unexpected or wrong:
        found = [
            f"{what} {names[:3]}"
            for what, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if names
        ]
        raise ValueError(
            "checkpoint weights do not fit the CLIP config rebuilt from its hyperparameters: "
            + "; ".join(found)
        )
    return weights


FORMATS = ("hf", "open_clip")
WEIGHTS = ("averaged", "raw")
RAW_KEY = "current_model_state"  # the raw weights beside the averaged ones (superclip_pl.train.ema)


def export_checkpoint(
    ckpt_path: str | Path,
    output_dir: str | Path,
    dtype: str = "float32",
    overwrite: bool = False,
    tokenizer: str | None = None,
    format: str = "hf",
    idf_batch_size: int | None = None,
    weights: str = "averaged",
) -> Path:
    """Write the HF ``CLIPModel`` directory (or the open_clip files) of a SuperCLIP checkpoint.

    Args:
        ckpt_path: a Lightning ``.ckpt`` file of ``LitSuperCLIP`` or a distributed checkpoint directory;
            for ``format="open_clip"`` also an HF CLIPModel directory of ours (export, import).
        output_dir: where to write; must not exist or be empty unless ``overwrite``.
        dtype: dtype of the saved floating-point weights.
        overwrite: write into an existing non-empty ``output_dir`` (same-named files are replaced).
        tokenizer: tokenizer directory or hub id, when the one named in the checkpoint has moved.
        format: ``hf`` (transformers) or ``open_clip`` (``open_clip.create_model_and_transforms``).
        idf_batch_size: open_clip format: the global batch the reference's IDF buffers are written at
            (default: the one an imported directory was read at, else 16384).
        weights: ``averaged`` (a run with the ``EMA`` callback: its average, the checkpoint's
            ``state_dict``) or ``raw`` (the trained weights, ``current_model_state``); a run without
            EMA has one set of weights, written either way.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not one of {list(FORMATS)}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r} is not one of {list(WEIGHTS)}")
    out = check_output_dir(output_dir, overwrite)
    if format == "open_clip" and (Path(ckpt_path) / "config.json").is_file():
        src = read_clip_dir(ckpt_path)
        batch = idf_batch_size or src["idf_batch_size"] or PAPER_BATCH
        parts = [src[k] for k in ("weights", "config", "tokenizer", "head", "doc_freq")]
        return write_open_clip(out, *parts, batch, DTYPES[dtype], head_pooling=src["head_pooling"])
    state_dict, rest = read_checkpoint(ckpt_path)
    if weights == "raw" and isinstance(rest.get(RAW_KEY), dict):
        state_dict = rest.pop(RAW_KEY)
    hparams = dict(rest.get("hyper_parameters") or {})
    if "tokenizer" not in hparams or not any(k.startswith(PREFIX) for k in state_dict):
        raise ValueError(
            f"{str(ckpt_path)!r} is not a SuperCLIP checkpoint: no LitSuperCLIP hyperparameters "
            f"or no {PREFIX}* weights"
        )
    try:
        tok = load_tokenizer(tokenizer or hparams["tokenizer"])
    except ValueError as err:
        hint = "" if tokenizer else " (the tokenizer the run trained with; pass --tokenizer if it has moved)"
        raise ValueError(f"{err}{hint}") from None
    config = rebuild_config(hparams, tok)
    weights = clip_weights(state_dict, config)  # everything is checked before anything is written
    # FLIP's patch dropout, a training setting: open_clip's vision_cfg keeps it (applied in training mode
    # only), so the open_clip files carry the run's; HF's CLIPModel has no such field, and fine-tuning from
    # the released HF directory starts unmasked
    if hparams.get("patch_dropout") is not None:
        config.vision_config.patch_dropout = hparams["patch_dropout"]
    if format == "hf" and hasattr(config.vision_config, "patch_dropout"):
        del config.vision_config.patch_dropout
    if format == "open_clip":
        head = {
            k[len("model.head.") :]: v.float() for k, v in state_dict.items() if k.startswith("model.head.")
        }
        counts = {k[len("doc_freq.") :]: v for k, v in state_dict.items() if k.startswith("doc_freq.")}
        bias = state_dict.get("model.logit_bias")  # SigLIP
        batch = idf_batch_size or PAPER_BATCH
        pooling = hparams.get("head_pooling") or "all_patches"
        return write_open_clip(
            out, weights, config, tok, head or None, counts or None, batch, DTYPES[dtype], bias, pooling
        )
    card = model_card(Path(ckpt_path), hparams, rest, state_dict, config, dtype)
    return write_clip_dir(out, weights, config, tok, card, DTYPES[dtype])
