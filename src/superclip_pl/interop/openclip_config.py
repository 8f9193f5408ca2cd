"""open_clip model configs (``model_cfg``: ``embed_dim``, ``vision_cfg``, ``text_cfg``, ``quick_gelu``, and
the reference SuperCLIP fork's ``clstext_cfg``) <-> HF ``CLIPConfig``, read from the tensors when absent.

Only what an HF ``CLIPModel`` computes maps: a ViT with a class token pooled after ``ln_post``, a
causal text transformer pooled at its end-of-text token, linear projections without bias, GELU or
QuickGELU. Every other open_clip option that changes the computation is refused by name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPConfig

HEAD_WIDTH = 64  # open_clip's default head_width: heads = width // 64 when a config does not say

# the released architectures (the reference's model_configs/*.json), for --model_config NAME;
# "-quickgelu" after a name selects QuickGELU (OpenAI-derived weights)
_B16 = {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16}
_L16 = {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 16}
_TEXT_B = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}
_TEXT_L = {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}
_CLS = {"context_length": 77, "vocab_size": 49408, "layers": 0, "mlp_ratio": 4}
NAMED: dict[str, dict[str, Any]] = {
    "ViT-B-16": {"embed_dim": 512, "vision_cfg": _B16, "text_cfg": _TEXT_B},
    "ViT-L-16": {"embed_dim": 768, "vision_cfg": _L16, "text_cfg": _TEXT_L},
    "ViT-B-32": {"embed_dim": 512, "vision_cfg": {**_B16, "patch_size": 32}, "text_cfg": _TEXT_B},
    "ViT-L-14": {"embed_dim": 768, "vision_cfg": {**_L16, "patch_size": 14}, "text_cfg": _TEXT_L},
    "SuperCLIP-ViT-B-16": {"embed_dim": 512, "vision_cfg": _B16, "text_cfg": _TEXT_B, "clstext_cfg": _CLS},
    "SuperCLIP-ViT-L-16": {"embed_dim": 768, "vision_cfg": _L16, "text_cfg": _TEXT_L, "clstext_cfg": _CLS},
}

# options that change nothing an HF CLIPModel computes at inference (training-time or tokenizer hints);
# vision_cfg.patch_dropout is carried into the HF config as the default of training from it
_IGNORED = {
    "vision_cfg": {"output_tokens", "patch_dropout"},
    "text_cfg": {"output_tokens", "pad_id", "hf_tokenizer_name", "tokenizer_kwargs", "tokenizer_mode"},
    "clstext_cfg": {"context_length", "mlp_ratio", "heads", "width"},
}
# options that must keep open_clip's default (another value computes something CLIPModel cannot)
_DEFAULTS = {
    "vision_cfg": {
        "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False, "pos_embed_type": "learnable",
        "final_ln_after_pool": False, "pool_type": "tok", "act_kwargs": None, "block_type": None,
        "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
        "scale_attn": False, "scale_fc": False, "timm_model_name": None,
    },
    "text_cfg": {
        "ls_init_value": None, "embed_cls": False, "no_causal_mask": False, "final_ln_after_pool": False,
        "proj_bias": False, "proj_type": "linear", "act_kwargs": None, "block_type": None,
        "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
        "scale_attn": False, "scale_fc": False, "hf_model_name": None,
    },
}  # fmt: skip
_SHAPES = {
    "vision_cfg": ("image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio", "norm_kwargs"),
    "text_cfg": ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "norm_kwargs"),
    "clstext_cfg": ("vocab_size", "layers"),
}
_OMITTED = {"vision_cfg": HEAD_WIDTH, "text_cfg": 8, "clstext_cfg": 0}  # CLIPTextCfg.heads = 8
_TOP = {"embed_dim", "vision_cfg", "text_cfg", "clstext_cfg", "quick_gelu", "custom_text"}
_TOP_IGNORED = {"init_logit_scale", "init_logit_bias", "cast_dtype", "output_dict"}


def load_model_cfg(spec: str) -> dict[str, Any]:
    """``--model_config``: a JSON file (a ``model_cfg`` or an ``open_clip_config.json``) or a name of
    :data:`NAMED`, optionally ending in ``-quickgelu``."""
    if Path(spec).is_file():
        try:
            data = json.loads(Path(spec).read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"--model_config {spec!r} is not valid JSON ({err})") from None
        return data.get("model_cfg", data) if isinstance(data, dict) else data
    name, quick = (spec[: -len("-quickgelu")], True) if spec.endswith("-quickgelu") else (spec, False)
    if name not in NAMED:
        raise ValueError(
            f"--model_config {spec!r} is neither a JSON file nor one of {sorted(NAMED)} (+ '-quickgelu')"
        )
    return {**json.loads(json.dumps(NAMED[name])), **({"quick_gelu": True} if quick else {})}


def _layers(state: dict[str, torch.Tensor], prefix: str) -> int:
    ids = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def infer_model_cfg(state: dict[str, torch.Tensor], text: str) -> dict[str, Any]:
    """The ``model_cfg`` the tensors' shapes give (heads as width // 64, plain GELU: shapes cannot tell
    heads or activation); ``text`` is the text tower's key prefix, ``""`` or ``"text."``."""
    for key in ("visual.conv1.weight", "visual.positional_embedding", "visual.proj"):
        if key not in state:
            raise ValueError(f"missing key {key}: not an open_clip ViT checkpoint")
    for key in ("token_embedding.weight", "positional_embedding", "text_projection"):
        if text + key not in state:
            raise ValueError(f"missing key {text + key}: not an open_clip text tower")
    width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    fc = state.get("visual.transformer.resblocks.0.mlp.c_fc.weight")
    vocab, text_width = state[text + "token_embedding.weight"].shape
    text_fc = state.get(text + "transformer.resblocks.0.mlp.c_fc.weight")
    cfg: dict[str, Any] = {
        "embed_dim": state["visual.proj"].shape[1],
        "vision_cfg": {
            "image_size": grid * patch,
            "layers": _layers(state, "visual.transformer.resblocks."),
            "width": width,
            "patch_size": patch,
            "head_width": HEAD_WIDTH if width % HEAD_WIDTH == 0 else width,
            "mlp_ratio": (fc.shape[0] / width) if fc is not None else 4.0,
        },
        "text_cfg": {
            "context_length": state[text + "positional_embedding"].shape[0],
            "vocab_size": vocab,
            "width": text_width,
            "heads": max(1, text_width // HEAD_WIDTH),
            "layers": _layers(state, text + "transformer.resblocks."),
            "mlp_ratio": (text_fc.shape[0] / text_width) if text_fc is not None else 4.0,
        },
    }
    if "text_decoder.text_projection.weight" in state:
        cfg["clstext_cfg"] = {
            "vocab_size": state["text_decoder.text_projection.weight"].shape[0],
            "layers": 0,
        }
    return cfg


def check_model_cfg(given: dict[str, Any], inferred: dict[str, Any]) -> dict[str, Any]:
    """``given`` completed from ``inferred``: every option is one CLIPModel computes, and every size
    agrees with the tensors (else one line naming the option, its value and the tensors')."""
    if not isinstance(given, dict) or "vision_cfg" not in given or "text_cfg" not in given:
        raise ValueError("the model config has no vision_cfg and text_cfg: give an open_clip model_cfg")
    for key in set(given) - _TOP - _TOP_IGNORED:
        raise ValueError(f"model config option {key!r} is not supported by the import (HF CLIPModel)")
    cfg = {k: v for k, v in given.items() if k not in _TOP_IGNORED}
    if cfg.get("embed_dim", inferred["embed_dim"]) != inferred["embed_dim"]:
        raise ValueError(
            f"model config embed_dim={cfg['embed_dim']} but visual.proj has {inferred['embed_dim']} columns"
        )
    if "clstext_cfg" in inferred and "clstext_cfg" not in cfg:
        cfg["clstext_cfg"] = {}
    for part in ("vision_cfg", "text_cfg", "clstext_cfg"):
        if part not in cfg:
            continue
        sub = dict(cfg[part] or {})
        if given is not inferred:  # open_clip's defaults for what a config leaves out
            sub.setdefault(
                {"vision_cfg": "head_width", "text_cfg": "heads"}.get(part, "layers"), _OMITTED[part]
            )
        for key, value in sub.items():
            if key in _IGNORED.get(part, ()) or key in _SHAPES[part]:
                continue
            if key not in _DEFAULTS.get(part, {}) and not (
                part == "text_cfg" and key in ("pool_type", "eos_id")
            ):
                raise ValueError(f"model config {part}.{key}={value!r} is not supported by the import")
            if key in _DEFAULTS.get(part, {}) and value != _DEFAULTS[part][key]:
                raise ValueError(
                    f"model config {part}.{key}={value!r}: HF CLIPModel computes only "
                    f"{key}={_DEFAULTS[part][key]!r}, so these weights cannot be imported"
                )
        if part == "text_cfg" and sub.get("pool_type", "argmax") not in ("argmax", "eos"):
            raise ValueError(
                f"model config text_cfg.pool_type={sub['pool_type']!r}: HF CLIPModel pools the text at its "
                "end-of-text token (argmax or eos)"
            )
        if part == "clstext_cfg" and sub.get("layers", 0) != 0:
            raise ValueError(
                f"model config clstext_cfg.layers={sub['layers']}: only layers 0 (LayerNorm + Linear, the "
                "released SuperCLIP head) maps to the vocabulary head"
            )
        norm = sub.get("norm_kwargs") or {}
        if set(norm) - {"eps"}:
            raise ValueError(f"model config {part}.norm_kwargs={norm!r}: only eps is supported")
        for key, value in (inferred.get(part) or {}).items():
            # heads cannot be read from the shapes: a config's value stands
            if (
                key in sub
                and key not in ("head_width", "heads")
                and not math.isclose(float(sub[key]), float(value))
            ):
                raise ValueError(
                    f"model config {part}.{key}={sub[key]} but the checkpoint's tensors give {value}"
                )
            sub.setdefault(key, value)
        cfg[part] = sub
    if "clstext_cfg" in cfg and "clstext_cfg" not in inferred:
        raise ValueError("the model config has a clstext_cfg but the checkpoint has no text_decoder.* head")
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    if vision["width"] % vision["head_width"] or text["width"] % text["heads"]:
        raise ValueError(
            f"model config: vision width {vision['width']} / head_width {vision['head_width']} or text "
            f"width {text['width']} / heads {text['heads']} is not a whole number of heads"
        )
    return cfg


def to_clip_config(cfg: dict[str, Any], tokenizer) -> CLIPConfig:
    """The HF ``CLIPConfig`` of a checked ``model_cfg``, with the tokenizer's special ids."""
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    if text.get("pool_type", "argmax") == "eos" and text.get("eos_id") != tokenizer.eos_token_id:
        raise ValueError(
            f"model config text_cfg.eos_id={text.get('eos_id')} but the tokenizer's eos_token_id is "
            f"{tokenizer.eos_token_id}: pass the model's own tokenizer with --tokenizer"
        )
    if text.get("pool_type", "argmax") == "argmax" and tokenizer.eos_token_id != len(tokenizer) - 1:
        raise ValueError(
            f"the text tower pools at the largest token id but the tokenizer's end-of-text token is "
            f"{tokenizer.eos_token_id}, not {len(tokenizer) - 1}: pass the model's own tokenizer"
        )
    dropout = vision.get("patch_dropout", 0.0) or 0.0
    if not 0 <= dropout < 1:
        raise ValueError(f"model config vision_cfg.patch_dropout={dropout}: a fraction in [0, 1) (0: off)")
    return CLIPConfig(
        projection_dim=cfg["embed_dim"],
        vision_config=dict(
            hidden_size=vision["width"],
            num_hidden_layers=vision["layers"],
            num_attention_heads=vision["width"] // vision["head_width"],
            intermediate_size=round(vision["width"] * vision["mlp_ratio"]),
            image_size=vision["image_size"],
            patch_size=vision["patch_size"],
            hidden_act=act,
            layer_norm_eps=(vision.get("norm_kwargs") or {}).get("eps", 1e-5),
            **({"patch_dropout": dropout} if dropout else {}),
        ),
        text_config=dict(
            hidden_size=text["width"],
            num_hidden_layers=text["layers"],
            num_attention_heads=text["heads"],
            intermediate_size=round(text["width"] * text["mlp_ratio"]),
            max_position_embeddings=text["context_length"],
            vocab_size=text["vocab_size"],
            hidden_act=act,
            layer_norm_eps=(text.get("norm_kwargs") or {}).get("eps", 1e-5),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        architectures=["CLIPModel"],
    )


def from_clip_config(config: CLIPConfig) -> dict[str, Any]:
    """The open_clip ``model_cfg`` of an HF ``CLIPConfig``, in the custom-text layout (``text.*``) of the
    reference's SuperCLIP; a head's ``clstext_cfg`` goes beside it (open_clip's CLIP classes refuse it)."""
    v, t = config.vision_config, config.text_config
    acts = {v.hidden_act, t.hidden_act}
    if not acts <= {"gelu", "quick_gelu"} or len(acts) != 1:
        raise ValueError(f"hidden_act {sorted(acts)}: open_clip has GELU or QuickGELU, one for both towers")
    if v.layer_norm_eps != t.layer_norm_eps:
        raise ValueError(f"layer_norm_eps {v.layer_norm_eps} / {t.layer_norm_eps}: open_clip has one value")
    norm = {} if v.layer_norm_eps == 1e-5 else {"norm_kwargs": {"eps": v.layer_norm_eps}}
    # argmax pooling (the reference's, and every open_clip version's) when the end-of-text token has
    # the largest id, as in the CLIP BPE; else open_clip's "eos" pooling at the tokenizer's id
    pool = {} if t.eos_token_id == t.vocab_size - 1 else {"pool_type": "eos", "eos_id": t.eos_token_id}
    return {
        "embed_dim": config.projection_dim,
        "quick_gelu": v.hidden_act == "quick_gelu",
        "custom_text": True,
        "vision_cfg": {
            "image_size": v.image_size,
            "layers": v.num_hidden_layers,
            "width": v.hidden_size,
            "patch_size": v.patch_size,
            "head_width": v.hidden_size // v.num_attention_heads,
            "mlp_ratio": v.intermediate_size / v.hidden_size,
            **({"patch_dropout": v.patch_dropout} if getattr(v, "patch_dropout", 0) else {}),
            **norm,
        },
        "text_cfg": {
            "context_length": t.max_position_embeddings,
            "vocab_size": t.vocab_size,
            "width": t.hidden_size,
            "heads": t.num_attention_heads,
            "layers": t.num_hidden_layers,
            "mlp_ratio": t.intermediate_size / t.hidden_size,
            "pad_id": t.pad_token_id if t.pad_token_id is not None else 0,
            **pool,
            **norm,
        },
    }
