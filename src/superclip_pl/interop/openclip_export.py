"""``superclip export --format open_clip``: our model as the files ``open_clip`` loads.

``open_clip.create_model_and_transforms("local-dir:DIR")`` (or ``"hf-hub:ORG/REPO"`` once uploaded)
reads ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) and ``open_clip_model.safetensors``
(the towers, custom-text layout ``text.*`` as in the reference's SuperCLIP, loaded strictly). A
SuperCLIP model's head goes beside them in the reference's names, ``text_decoder.safetensors``
(``text_decoder.{ln_mlp, text_projection}.{weight,bias}``, ``cap_fq``, ``num_samples``), since open_clip's
CLIP classes have no place for it: merged with the towers' file it is the state dict of the reference
fork's ``SuperCLIP`` class built from ``model_cfg`` + ``superclip.clstext_cfg``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig

from superclip_pl.head_file import HEAD_FILE, read_extras, read_head_pooling
from superclip_pl.interop.clipdir import shareable
from superclip_pl.interop.openclip import HEAD_KEYS, doc_freq_to_reference, expected_shapes, from_hf
from superclip_pl.interop.openclip_config import from_clip_config
from superclip_pl.tokenizer import load_tokenizer
from superclip_pl.transforms import CLIP_MEAN, CLIP_STD

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
REFERENCE_HEAD_FILE = "text_decoder.safetensors"
CLIP_BPE_IDS = (49408, 49406, 49407)  # vocab size, <|startoftext|>, <|endoftext|>: open_clip's tokenizer


def read_clip_dir(path: str | Path) -> dict[str, Any]:
    """The parts of an HF ``CLIPModel`` directory (ours: ``superclip export`` / ``superclip import``):
    ``weights``, ``config``, ``tokenizer``, ``head``, ``doc_freq``, ``idf_batch_size``."""
    path = Path(path)
    try:
        config = CLIPConfig.from_pretrained(path)
        weights = {k: v.float() for k, v in load_file(path / "model.safetensors").items()}
    except (OSError, ValueError, SafetensorError) as err:
        raise ValueError(
            f"{str(path)!r} is not an HF CLIPModel directory with model.safetensors ({err})"
        ) from None
    if "logit_scale" in weights:
        weights["logit_scale"] = weights["logit_scale"].reshape(())
    shapes = expected_shapes(config)
    for key in sorted(set(shapes) | set(weights)):
        if key not in weights or key not in shapes or weights[key].shape != shapes[key]:
            raise ValueError(
                f"{str(path / 'model.safetensors')!r}: {key} is missing, unexpected or not of the shape "
                "its config.json gives"
            )
    head, doc_freq = read_extras(str(path))
    batch = None
    if (path / HEAD_FILE).is_file():
        with safe_open(path / HEAD_FILE, "pt") as f:
            batch = int((f.metadata() or {}).get("idf_batch_size", 0)) or None
    return {"weights": weights, "config": config, "tokenizer": load_tokenizer(str(path)), "head": head,
            "doc_freq": doc_freq, "idf_batch_size": batch,
            "head_pooling": read_head_pooling(str(path)) or "all_patches"}  # fmt: skip


def write_open_clip(
    out: Path,
    weights: dict[str, torch.Tensor],
    config: CLIPConfig,
    tokenizer,
    head: dict[str, torch.Tensor] | None,
    doc_freq: dict[str, torch.Tensor] | None,
    idf_batch_size: int,
    dtype: torch.dtype = torch.float32,
    logit_bias: torch.Tensor | None = None,
    head_pooling: str = "all_patches",
) -> Path:
    """Write ``open_clip_config.json``, ``open_clip_model.safetensors``, the tokenizer and, with a head,
    ``text_decoder.safetensors`` (the IDF buffers at global batch ``idf_batch_size``, float64 as in the
    reference; the special tokens' counts as the reference keeps them) and the head's pooling."""
    model_cfg = from_clip_config(config)
    pad = 0  # open_clip's own tokenizer pads with 0
    if (len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id) != CLIP_BPE_IDS:
        # not open_clip's default tokenizer: open_clip reads the HF tokenizer saved here (local-dir:)
        model_cfg["text_cfg"]["hf_tokenizer_name"] = str(getattr(tokenizer, "name_or_path", "") or ".")
        pad = tokenizer.pad_token_id
    specials = tuple({tokenizer.bos_token_id, tokenizer.eos_token_id, pad} - {None})
    cast = lambda ts: {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in ts.items()}
    tensors = from_hf(weights, config, "text.")
    tensors["logit_scale"] = tensors["logit_scale"].reshape(())
    if logit_bias is not None:  # a SigLIP model: open_clip builds the bias from init_logit_bias
        tensors["logit_bias"] = logit_bias.detach().reshape(())
        model_cfg["init_logit_bias"] = float(logit_bias)
    out.mkdir(parents=True, exist_ok=True)
    save_file(cast(tensors), out / WEIGHTS_FILE, metadata={"format": "pt"})
    superclip: dict[str, Any] = {}
    if head is not None:
        ref = cast({src: head[dst] for src, dst in HEAD_KEYS.items()})
        if doc_freq is not None:  # float64 whatever dtype, as the reference keeps them
            ref |= doc_freq_to_reference(doc_freq["df"], doc_freq["num_docs"], idf_batch_size, specials)
        save_file(ref, out / REFERENCE_HEAD_FILE, metadata={"format": "pt"})
        superclip = {
            "clstext_cfg": {"context_length": config.text_config.max_position_embeddings,
                            "vocab_size": config.text_config.vocab_size, "layers": 0, "mlp_ratio": 4},
            "head_file": REFERENCE_HEAD_FILE,
            "idf_batch_size": idf_batch_size,
            "head_pooling": head_pooling,
        }  # fmt: skip
    size = config.vision_config.image_size
    preprocess = {"size": size, "mode": "RGB", "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}  # fmt: skip
    document = {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
    (out / CONFIG_FILE).write_text(
        json.dumps(document | ({"superclip": superclip} if superclip else {}), indent=2)
    )
    tokenizer.save_pretrained(out)
    shareable(out)
    return out
