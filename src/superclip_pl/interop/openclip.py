"""open_clip / reference SuperCLIP state dicts <-> HF ``CLIPModel`` + our head: the key maps.

As transformers' own converter does for OpenAI CLIP: ``attn.in_proj_{weight,bias}`` is split in
three (q, k, v), ``mlp.c_fc``/``c_proj`` -> ``mlp.fc1``/``fc2``, ``ln_1``/``ln_2`` ->
``layer_norm1``/``2``, ``ln_pre`` -> ``pre_layrnorm``, ``ln_post`` -> ``post_layernorm``, ``conv1`` ->
``patch_embedding``, and the (width, embed) matrices ``visual.proj`` / ``text_projection`` are
transposed into the projection Linears. The text tower sits at the top level (open_clip ``CLIP``)
or under ``text.`` (``CustomTextCLIP``, the reference's SuperCLIP). The reference's head
``text_decoder.{ln_mlp, text_projection}`` is our ``VocabularyHead.{norm, proj}``; its IDF buffers
``cap_fq`` (1, V) and ``num_samples`` (1, 1) are running sums of per-step fractions of the global batch
B, so that df = cap_fq x B and N = num_samples x B (and its IDF, log((num_samples + 1/B) /
(cap_fq + 1/B)), is our log((N + 1) / (df + 1))).
"""

from __future__ import annotations

import torch
from transformers import CLIPConfig, CLIPModel

# tensors open_clip keeps that are not weights: the causal mask is rebuilt by every implementation
NOT_WEIGHTS = ("attn_mask", "text.attn_mask")
HEAD_KEYS = {  # reference SuperCLIP (MixClsHead with layers 0) -> our VocabularyHead
    "text_decoder.ln_mlp.weight": "norm.weight",
    "text_decoder.ln_mlp.bias": "norm.bias",
    "text_decoder.text_projection.weight": "proj.weight",
    "text_decoder.text_projection.bias": "proj.bias",
}


def text_prefix(state: dict[str, torch.Tensor]) -> str:
    """``"text."`` for the custom-text layout, ``""`` for open_clip's ``CLIP`` (text at the top level)."""
    if "text.token_embedding.weight" in state:
        return "text."
    if "token_embedding.weight" in state:
        return ""
    raise ValueError(
        "missing key token_embedding.weight (or text.token_embedding.weight): not an open_clip "
        f"checkpoint with a text transformer (its first keys: {sorted(state)[:3]})"
    )


def key_pairs(config: CLIPConfig, text: str) -> list[tuple[str, str, str]]:
    """``(open_clip key, HF key, how)`` for every CLIPModel tensor; how: ``""`` copy, ``"T"`` transpose,
    ``"q"``/``"k"``/``"v"`` that third of ``in_proj``."""
    emb = "vision_model.embeddings."
    pairs = [
        ("visual.conv1.weight", emb + "patch_embedding.weight", ""),
        ("visual.class_embedding", emb + "class_embedding", ""),
        ("visual.positional_embedding", emb + "position_embedding.weight", ""),
        ("visual.proj", "visual_projection.weight", "T"),
        (text + "token_embedding.weight", "text_model.embeddings.token_embedding.weight", ""),
        (text + "positional_embedding", "text_model.embeddings.position_embedding.weight", ""),
        (text + "text_projection", "text_projection.weight", "T"),
        ("logit_scale", "logit_scale", ""),
    ]
    norms = [
        ("visual.ln_pre", "vision_model.pre_layrnorm"),
        ("visual.ln_post", "vision_model.post_layernorm"),
    ]
    norms.append((text + "ln_final", "text_model.final_layer_norm"))
    towers = [
        ("visual.transformer", "vision_model", config.vision_config.num_hidden_layers),
        (text + "transformer", "text_model", config.text_config.num_hidden_layers),
    ]
    for src, dst, layers in towers:
        for i in range(layers):
            s, d = f"{src}.resblocks.{i}.", f"{dst}.encoder.layers.{i}."
            norms += [(s + "ln_1", d + "layer_norm1"), (s + "ln_2", d + "layer_norm2")]
            norms += [(s + "mlp.c_fc", d + "mlp.fc1"), (s + "mlp.c_proj", d + "mlp.fc2")]
            norms.append((s + "attn.out_proj", d + "self_attn.out_proj"))
            for p in ("weight", "bias"):
                pairs += [(f"{s}attn.in_proj_{p}", f"{d}self_attn.{x}_proj.{p}", x) for x in "qkv"]
    pairs += [(f"{s}.{p}", f"{d}.{p}", "") for s, d in norms for p in ("weight", "bias")]
    return pairs


def expected_shapes(config: CLIPConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):  # shapes without allocating or initialising anything
        return {k: v.shape for k, v in CLIPModel(config).state_dict().items()}


def to_hf(state: dict[str, torch.Tensor], config: CLIPConfig, text: str) -> dict[str, torch.Tensor]:
    """The ``CLIPModel`` state dict of the open_clip tensors in ``state`` (other keys are left to the
    caller); a missing key or a shape the config does not give is an error naming it."""
    shapes, out = expected_shapes(config), {}
    for src, dst, how in key_pairs(config, text):
        if src not in state:
            raise ValueError(f"missing key {src} (for {dst}): the checkpoint does not fit the model config")
        x = state[src]
        if how == "T":
            x = x.T
        elif how:
            if x.shape[0] % 3:
                raise ValueError(f"{src} has shape {tuple(x.shape)}: in_proj stacks q, k and v (3 x width)")
            x = x.chunk(3, dim=0)["qkv".index(how)]
        x = x.reshape(()) if dst == "logit_scale" and x.numel() == 1 else x
        if x.shape != shapes[dst]:
            want = tuple(shapes[dst]) if how != "T" else tuple(reversed(shapes[dst]))
            raise ValueError(
                f"{src} has shape {tuple(state[src].shape)} but the model config gives {want}"
                + (" (a third of in_proj)" if how in ("q", "k", "v") else "")
            )
        out[dst] = x.to(torch.float32).contiguous()
    return out


def from_hf(
    weights: dict[str, torch.Tensor], config: CLIPConfig, text: str = "text."
) -> dict[str, torch.Tensor]:
    """open_clip tensors (layout ``text``) of a ``CLIPModel`` state dict: the inverse of :func:`to_hf`."""
    out: dict[str, torch.Tensor] = {}
    thirds: dict[str, dict[str, torch.Tensor]] = {}
    for src, dst, how in key_pairs(config, text):
        x = weights[dst]
        if how in ("q", "k", "v"):
            thirds.setdefault(src, {})[how] = x
            if len(thirds[src]) == 3:
                out[src] = torch.cat([thirds[src][c] for c in "qkv"])
            continue
        out[src] = (x.T if how == "T" else x).contiguous()
    return out


def head_to_ours(state: dict[str, torch.Tensor], vocab_size: int, width: int) -> dict[str, torch.Tensor]:
    """Our ``VocabularyHead`` state of the reference's ``text_decoder.*`` (LayerNorm + Linear)."""
    extra = sorted(k for k in state if k.startswith("text_decoder.") and k not in HEAD_KEYS)
    if extra:
        raise ValueError(
            f"unmapped key {extra[0]}: only a text_decoder of LayerNorm + Linear (clstext_cfg.layers 0, "
            "the released SuperCLIP head) maps to the vocabulary head"
        )
    out = {}
    for src, dst in HEAD_KEYS.items():
        if src not in state:
            raise ValueError(f"missing key {src}: the text_decoder head is incomplete")
        want = (
            (vocab_size, width) if dst == "proj.weight" else (vocab_size,) if dst == "proj.bias" else (width,)
        )
        if tuple(state[src].shape) != want:
            raise ValueError(f"{src} has shape {tuple(state[src].shape)} but the model config gives {want}")
        out[dst] = state[src].to(torch.float32).contiguous()
    return out


def doc_freq_to_ours(
    cap_fq: torch.Tensor, num_samples: torch.Tensor, batch_size: int, vocab_size: int
) -> dict[str, torch.Tensor]:
    """Our ``DocumentFrequency`` counts (``df`` (V,) and ``num_docs``, int64) of the reference's running
    sums at a constant global batch ``batch_size``; the products must be whole numbers."""
    if cap_fq.numel() != vocab_size:
        raise ValueError(f"cap_fq has shape {tuple(cap_fq.shape)} but the vocabulary has {vocab_size} tokens")
    if batch_size < 1:
        raise ValueError(f"--idf_batch_size={batch_size} must be the run's global batch size (>= 1)")
    df = cap_fq.double().reshape(-1) * batch_size
    n = num_samples.double().reshape(-1) * batch_size
    worst = int((df - df.round()).abs().argmax())
    if n.numel() != 1 or (df - df.round()).abs().max() > 1e-3 or (n - n.round()).abs().max() > 1e-3:
        raise ValueError(
            f"cap_fq x {batch_size} is not a whole number of captions (token {worst}: "
            f"{float(df[worst]):.4f}; num_samples x {batch_size} = {float(n[0]):.4f}): pass the run's "
            "global batch size as --idf_batch_size"
        )
    return {"df": df.round().long(), "num_docs": n.round().long().reshape(())}


def doc_freq_to_reference(
    df: torch.Tensor, num_docs: torch.Tensor, batch_size: int, special_ids: tuple[int, ...] = ()
) -> dict[str, torch.Tensor]:
    """The reference's ``cap_fq`` (1, V) and ``num_samples`` (1, 1), float64, at global batch ``batch_size``
    (any batch gives the same IDF: log((N/B + 1/B) / (df/B + 1/B)) = log((N + 1) / (df + 1))).

    We never count special tokens; the reference counts every id of its padded token rows, so that
    start and end of text, in every caption, and its padding id (0 for open_clip's tokenizer, in
    nearly every caption of a 77-token context) get IDF weight 0 there. ``special_ids`` get those
    counts (``df = N``): otherwise a run continued in the reference's trainer would give them the
    largest weights of all (about 29% of the soft-target mass on a released checkpoint's counts)."""
    df = df.clone()
    df[list(special_ids)] = num_docs.to(df.dtype)
    return {
        "cap_fq": (df.double() / batch_size).reshape(1, -1),
        "num_samples": (num_docs.double() / batch_size).reshape(1, 1),
    }
