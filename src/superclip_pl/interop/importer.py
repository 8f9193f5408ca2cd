"""``superclip import``: an open_clip or reference-SuperCLIP checkpoint -> a directory we fine-tune from.

Reads a ``torch.save`` file (``{"state_dict": ..., "optimizer": ...}`` with ``module.`` prefixes, as
the reference trainer saves, or a bare state dict) or a safetensors file; a local directory or a hub
repo in open_clip's layout (``open_clip_config.json`` beside ``open_clip_model.safetensors`` or
``open_clip_pytorch_model.bin``, as ``superclip export --format open_clip`` writes); or
``ORG/REPO/FILE``, one file of a hub repo. Every tensor is mapped (:mod:`superclip_pl.interop.openclip`) and
the result is an HF ``CLIPModel`` directory (:mod:`superclip_pl.interop.clipdir`) with the head and the IDF
counts of a SuperCLIP checkpoint in ``superclip_head.safetensors``.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import CLIPConfig

from superclip_pl.head_file import HEAD_POOLING
from superclip_pl.interop.clip_bpe import clip_bpe_tokenizer
from superclip_pl.interop.clipdir import check_output_dir, write_clip_dir
from superclip_pl.interop.openclip import (
    NOT_WEIGHTS,
    doc_freq_to_ours,
    head_to_ours,
    key_pairs,
    text_prefix,
    to_hf,
)
from superclip_pl.interop.openclip_config import (
    check_model_cfg,
    infer_model_cfg,
    load_model_cfg,
    to_clip_config,
)
from superclip_pl.tokenizer import load_tokenizer
from superclip_pl.transforms import CLIP_MEAN, CLIP_STD

PAPER_BATCH = 16384  # the global batch of the released SuperCLIP runs (paper, configs/*_bs16k.yaml)

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
HEAD_FILE = "text_decoder.safetensors"  # the reference-named head beside an open_clip export


@dataclass
class Imported:
    """What an open_clip / SuperCLIP checkpoint holds, in our terms."""

    config: CLIPConfig
    weights: dict[str, torch.Tensor]  # CLIPModel state dict
    tokenizer: Any
    head: dict[str, torch.Tensor] | None = None  # VocabularyHead state
    doc_freq: dict[str, torch.Tensor] | None = None  # DocumentFrequency state
    source: str = ""
    model_cfg: dict[str, Any] = field(default_factory=dict)
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)
    idf_batch_size: int | None = None
    head_pooling: str = "all_patches"  # what the head averages (superclip_pl.model.HEAD_POOLING)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:160]


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one checkpoint file, unwrapped from ``{"state_dict": ...}`` and ``module.``."""
    if path.suffix == ".safetensors":
        try:
            state = load_file(path)
        except (SafetensorError, OSError) as err:
            raise ValueError(
                f"{str(path)!r} is not a readable safetensors file ({_first_line(err)})"
            ) from None
    else:
        if not zipfile.is_zipfile(path):
            raise ValueError(
                f"{str(path)!r} is not a checkpoint torch.save wrote (not a zip archive; truncated?)"
            )
        try:  # plain tensors and Python values only: a checkpoint cannot run code while being read
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"{str(path)!r} holds objects torch.load(weights_only=True) refuses ({_first_line(err)}); "
                "if you trust it, re-save its state_dict alone"
            ) from None
        except Exception as err:
            raise ValueError(f"{str(path)!r} cannot be read by torch.load ({_first_line(err)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{str(path)!r} holds no state dict")
    for strip in ("module.", "_orig_mod."):  # DDP, torch.compile
        if all(k.startswith(strip) for k in state):
            state = {k[len(strip) :]: v for k, v in state.items()}
    bad = next((k for k, v in state.items() if not torch.is_tensor(v)), None)
    if bad is not None:
        raise ValueError(f"{str(path)!r}: {bad} is a {type(state[bad]).__name__}, not a tensor")
    return state


def _hub(repo: str, filename: str, required: bool) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo, filename))
    except (EntryNotFoundError, LocalEntryNotFoundError) as err:
        if required:
            raise ValueError(f"hub repo {repo!r} has no {filename} ({_first_line(err)})") from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise ValueError(f"cannot read hub repo {repo!r} ({_first_line(err)})") from None
    return None


def locate_files(ckpt_path: str) -> tuple[list[Path], Path | None, Path | None]:
    """``(weight files, open_clip_config.json or None, directory with a tokenizer or None)``."""
    path = Path(ckpt_path)
    if path.is_file():
        config = path.parent / CONFIG_FILE
        return [path], config if config.is_file() else None, None
    if path.is_dir():
        found = [path / n for n in WEIGHT_FILES if (path / n).is_file()]
        if not found:
            found = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".pt", ".pth", ".bin"))
            found = [p for p in found if p.name != HEAD_FILE]
            if len(found) != 1:
                raise ValueError(
                    f"{ckpt_path!r} holds {len(found)} checkpoint files and none of {list(WEIGHT_FILES)}: "
                    "pass the file itself"
                )
        head, config = path / HEAD_FILE, path / CONFIG_FILE
        tok = path if (path / "tokenizer_config.json").is_file() else None
        return found[:1] + [head] * head.is_file(), config if config.is_file() else None, tok
    parts = ckpt_path.split("/")
    local = ckpt_path.startswith((".", "/")) or (len(parts) == 2 and path.suffix in (".pt", ".pth", ".bin"))
    if len(parts) < 2 or local or not all(parts):
        raise ValueError(
            f"checkpoint {ckpt_path!r} does not exist (a file, a directory, ORG/REPO or ORG/REPO/FILE)"
        )
    repo = "/".join(parts[:2])
    if len(parts) > 2:  # one file of a hub repo
        return [_hub(repo, "/".join(parts[2:]), True)], _hub(repo, CONFIG_FILE, False), None
    for name in WEIGHT_FILES:
        weights = _hub(repo, name, False)
        if weights is not None:
            head = _hub(repo, HEAD_FILE, False)
            return [weights] + ([head] if head else []), _hub(repo, CONFIG_FILE, False), None
    offline = " (or, offline, none is in the hub cache)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    raise ValueError(
        f"hub repo {repo!r} has none of {list(WEIGHT_FILES)}{offline}: name the file, as {repo}/FILE"
    )


def _tokenizer(spec: str | None, found: Path | None, context_length: int):
    if spec and spec.endswith(".txt.gz"):
        return clip_bpe_tokenizer(spec, context_length)
    if spec or found:
        return load_tokenizer(spec or str(found))
    return clip_bpe_tokenizer(None, context_length)  # open_clip's own: the BPE of an installed open_clip


def read_open_clip(
    ckpt_path: str,
    model_config: str | dict | None = None,
    tokenizer: str | None = None,
    idf_batch_size: int | None = None,
) -> Imported:
    """Read and map an open_clip / reference SuperCLIP checkpoint (see :func:`main` for the arguments)."""
    files, config_file, tok_dir = locate_files(ckpt_path)
    state = {k: v for f in files for k, v in read_state(f).items()}
    written: dict[str, Any] = json.loads(config_file.read_text()) if config_file is not None else {}
    text = text_prefix(state)
    inferred = infer_model_cfg(state, text)
    given = load_model_cfg(model_config) if isinstance(model_config, str) else model_config
    model_cfg = check_model_cfg(given or written.get("model_cfg") or inferred, inferred)
    model_cfg.pop("custom_text", None)  # the layout is read from the keys
    # --tokenizer, else the one in the directory, else the config's HF tokenizer, else the CLIP BPE
    spec = tokenizer or (None if tok_dir else model_cfg["text_cfg"].get("hf_tokenizer_name"))
    tok = _tokenizer(spec, tok_dir, model_cfg["text_cfg"]["context_length"])
    if len(tok) != model_cfg["text_cfg"]["vocab_size"]:
        raise ValueError(
            f"the tokenizer has {len(tok)} tokens but {text}token_embedding.weight has "
            f"{model_cfg['text_cfg']['vocab_size']} rows: pass the model's tokenizer with --tokenizer"
        )
    config = to_clip_config(model_cfg, tok)
    weights = to_hf(state, config, text)
    mapped = {src for src, _, _ in key_pairs(config, text)} | set(NOT_WEIGHTS)
    mapped |= {k for k in state if k.startswith("text_decoder.")} | {"cap_fq", "num_samples"}
    unmapped = sorted(set(state) - mapped)
    if unmapped:
        raise ValueError(
            f"unmapped key {unmapped[0]} ({len(unmapped)} in all): HF CLIPModel has no place for it "
            "(another architecture, or an open_clip option the import does not support)"
        )
    out = Imported(config, weights, tok, source=ckpt_path, model_cfg=model_cfg)
    out.preprocess_cfg = written.get("preprocess_cfg") or {}
    out.head_pooling = (written.get("superclip") or {}).get("head_pooling") or "all_patches"
    if any(k.startswith("text_decoder.") for k in state):
        out.head = head_to_ours(state, config.text_config.vocab_size, config.vision_config.hidden_size)
    if ("cap_fq" in state) != ("num_samples" in state) or ("cap_fq" in state and out.head is None):
        raise ValueError(
            "cap_fq and num_samples come together, with a text_decoder head: the checkpoint is incomplete"
        )
    if "cap_fq" in state:
        recorded = (written.get("superclip") or {}).get("idf_batch_size")
        out.idf_batch_size = idf_batch_size or recorded or PAPER_BATCH
        vocab = config.text_config.vocab_size
        out.doc_freq = doc_freq_to_ours(state["cap_fq"], state["num_samples"], out.idf_batch_size, vocab)
    return out


def model_card(imp: Imported) -> str:
    head = (
        "the vocabulary head" if imp.head is not None else "no head (a CLIP checkpoint: fine-tuning adds one)"
    )
    if imp.doc_freq is not None:
        captions = int(imp.doc_freq["num_docs"])
        head += f" and its IDF counts ({captions:,} captions, global batch {imp.idf_batch_size})"
    if imp.head is not None:
        head += f"; the head averages the patch tokens as `{imp.head_pooling}`"
    lines = [
        f"# Imported from `{imp.source}`",
        "",
        f"An HF `CLIPModel` written by `superclip import`, with {head} in `superclip_head.safetensors`.",
        "",
        '- zero-shot: `transformers.pipeline("zero-shot-image-classification", model=DIR)`',
        "- fine-tune: `superclip fit --config ... --model.backbone DIR --data.tokenizer DIR`",
        "- back to open_clip: `superclip export --format open_clip --ckpt_path DIR --output_dir OUT`",
        "",
        "open_clip model config:",
        "",
        f"```json\n{json.dumps(imp.model_cfg, indent=2)}\n```",
    ]
    return "\n".join(lines) + "\n"


def import_checkpoint(
    ckpt_path: str,
    output_dir: str | Path,
    model_config: str | None = None,
    tokenizer: str | None = None,
    idf_batch_size: int | None = None,
    overwrite: bool = False,
    head_pooling: str | None = None,
) -> Path:
    """Write the directory of an imported checkpoint; returns ``output_dir``. ``head_pooling`` (default:
    what the checkpoint's config records, else ``all_patches``) is recorded for fine-tuning."""
    if head_pooling not in (None, *HEAD_POOLING):
        raise ValueError(f"head_pooling={head_pooling!r} is not one of {list(HEAD_POOLING)}")
    out = check_output_dir(output_dir, overwrite)
    imp = read_open_clip(ckpt_path, model_config, tokenizer, idf_batch_size)
    imp.head_pooling = head_pooling or imp.head_pooling
    mean = imp.preprocess_cfg.get("mean", CLIP_MEAN)
    std = imp.preprocess_cfg.get("std", CLIP_STD)
    write_clip_dir(out, imp.weights, imp.config, imp.tokenizer, model_card(imp), head=imp.head,
                   doc_freq=imp.doc_freq, mean=mean, std=std, idf_batch_size=imp.idf_batch_size,
                   head_pooling=imp.head_pooling if imp.head is not None else None)  # fmt: skip
    return out
