"""The model card (``README.md``) of an exported SuperCLIP model: what it is, how it was trained
(the checkpoint's hyperparameters, step and samples seen), how well it did (the run's ``metrics.json``)
and how to use it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPConfig

from superclip_pl.model import MAX_LOGIT_SCALE


def find_metrics(ckpt_path: Path) -> dict[str, Any] | None:
    """``metrics.json`` of the run: in the log dir ``version_N/`` above ``version_N/checkpoints/x.ckpt``."""
    path = ckpt_path.resolve().parent.parent / "metrics.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def model_card(
    ckpt_path: Path,
    hparams: dict[str, Any],
    rest: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    config: CLIPConfig,
    dtype: str,
) -> str:
    """A short README.md: what the model is, how it was trained, how well it did, how to use it."""
    vc, tc = config.vision_config, config.text_config
    seen = state_dict.get("samples_seen")
    params = sum(v.numel() for k, v in state_dict.items() if k.startswith("model.clip."))
    raw_scale = float(state_dict["model.clip.logit_scale"].reshape(()))
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: zero-shot-image-classification",
        "tags: [clip, superclip, superclip-pl]",
        "---",
        "",
        "# SuperCLIP (exported by superclip-pl)",
        "",
        "A CLIP model trained with the SuperCLIP objective (contrastive loss + `class_loss_weight` x "
        "vocabulary classification loss; arXiv 2512.14480). The vocabulary classifier head is used in "
        "training only and is not part of this export: this is a plain transformers `CLIPModel`.",
        "",
        f"- checkpoint: `{ckpt_path.name}`, global step {rest.get('global_step', '?')}, "
        f"epoch {rest.get('epoch', '?')}, samples seen {int(seen) if seen is not None else '?'}",
        f"- vision: ViT width {vc.hidden_size}, {vc.num_hidden_layers} layers, patch {vc.patch_size}, "
        f"{vc.image_size} px; text: width {tc.hidden_size}, {tc.num_hidden_layers} layers, "
        f"vocabulary {tc.vocab_size}, {tc.max_position_embeddings} positions; "
        f"embedding dim {config.projection_dim}; {params / 1e6:.2f} M parameters ({dtype})",
        f"- logit scale exp({min(raw_scale, MAX_LOGIT_SCALE):.4f})"
        + (f" (clamped from {raw_scale:.4f}, as training used it)" if raw_scale > MAX_LOGIT_SCALE else ""),
    ]
    if hparams.get("loss") == "siglip":
        bias = state_dict.get("model.logit_bias")
        lines.append(
            "- trained with the sigmoid (SigLIP) loss; its logit bias"
            + (f" ({float(bias.reshape(())):.4f})" if bias is not None else "")
            + " is not part of `CLIPModel`: the pipeline's softmax ranks classes as the sigmoid would"
        )
    lines += ["", "## Training configuration", "", "| hyperparameter | value |", "|---|---|"]
    lines += [
        f"| {k} | `{json.dumps(v, default=str)}` |" for k, v in hparams.items() if not k.startswith("_")
    ]
    metrics = find_metrics(ckpt_path)
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [
            f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()
        ]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        'classifier = pipeline("zero-shot-image-classification", model="path/to/this/dir")',
        'classifier(image, candidate_labels=["red circle", "blue square"])',
        "```",
        "",
        "Images are resized (shortest side, bicubic) and centre-cropped to "
        f"{vc.image_size} px and normalised with the OpenAI CLIP mean and std, as in evaluation.",
        "",
    ]
    return "\n".join(lines)
