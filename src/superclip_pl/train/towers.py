"""The towers' layer groups, input to output, and locking (LiT): what ``lock_image`` / ``lock_text`` and
layer-wise learning-rate decay count.

The groups are open_clip's (``VisionTransformer.layer_groups``, ``_text_layer_groups``), in HF names:
``embeddings`` (vision: patch embedding, class token, position embedding, ``pre_layrnorm``; text: token
and position embeddings), one group per encoder block (the last block with the tower's final LayerNorm),
then ``proj`` (the projection to the shared embedding space). A locked parameter has
``requires_grad=False``: it gets no gradient, no optimizer state and no weight decay (AdamW's groups
hold only trainable parameters), so it stays bit for bit as loaded; DDP leaves it out of its
reduction and FSDP2 shards it like any other. The vocabulary head, the logit scale and the SigLIP bias
belong to no tower: locking never touches them.
"""

from __future__ import annotations

from torch import nn

from superclip_pl.model import SuperCLIP

Groups = list[tuple[str, list[nn.Parameter]]]


def _params(*modules: nn.Module | nn.Parameter) -> list[nn.Parameter]:
    return [p for m in modules for p in ([m] if isinstance(m, nn.Parameter) else m.parameters())]


def tower_groups(model: SuperCLIP, tower: str) -> Groups:
    """``[(name, parameters), ...]`` of the ``vision`` or ``text`` tower, input to output."""
    clip = model.clip
    if tower == "vision":
        emb, tower_model = clip.vision_model.embeddings, clip.vision_model
        groups = [("embeddings", _params(emb, tower_model.pre_layrnorm))]
        final, proj = tower_model.post_layernorm, clip.visual_projection
    else:
        tower_model = clip.text_model
        groups = [("embeddings", _params(tower_model.embeddings))]
        final, proj = tower_model.final_layer_norm, clip.text_projection
    blocks = tower_model.encoder.layers
    for i, block in enumerate(blocks):
        groups.append((f"layer.{i}", _params(block, *([final] if i == len(blocks) - 1 else []))))
    groups.append(("proj", _params(proj)))
    return groups


def lock_tower(model: SuperCLIP, tower: str, unlocked: int, key: str) -> None:
    """Freeze the tower but its top ``unlocked`` groups, counted from the output as open_clip counts
    them (``--lock-image-unlocked-groups``, ``--lock-text-unlocked-layers``): 0 freezes all of it, 1 leaves
    the projection trainable, 2 also the last block with the final LayerNorm, and so on. ``key`` names
    the setting in errors."""
    groups = tower_groups(model, tower)
    if not 0 <= unlocked <= len(groups):
        raise ValueError(
            f"{key}={unlocked} must be between 0 (the whole tower locked) and {len(groups)} (the "
            f"{len(groups) - 2} blocks, the embeddings and the projection: nothing locked)"
        )
    for i, (_, params) in enumerate(groups):
        for p in params:
            p.requires_grad_(i >= len(groups) - unlocked)


def freeze_unused(model: SuperCLIP, contrastive: bool, head: bool) -> None:
    """Without the contrastive loss (SuperClass) nothing reaches the text tower, the two projections,
    the logit scale or the SigLIP bias: they are frozen, so that DDP expects no gradient for them and
    AdamW keeps no state; without a head (CLIP) nothing is frozen."""
    if contrastive:
        return
    if not head:
        raise ValueError(
            "model.contrastive_loss_weight=0 with model.class_loss_weight=0 trains nothing: set either > 0"
        )
    clip = model.clip
    unused = [clip.text_model, clip.text_projection, clip.visual_projection, clip.logit_scale]
    for p in _params(*unused, *([model.logit_bias] if model.logit_bias is not None else [])):
        p.requires_grad_(False)


def lock_towers(model: SuperCLIP, hp) -> None:
    """Apply ``LitSuperCLIP``'s ``lock_image``, ``lock_text`` (with their unlocked layers) and the freezing
    of what ``contrastive_loss_weight`` 0 leaves unused; ``hp`` its hyperparameters."""
    for tower, key in (("vision", "image"), ("text", "text")):
        unlocked = hp[f"lock_{key}_unlocked_layers"]
        if hp[f"lock_{key}"]:
            lock_tower(model, tower, unlocked, f"model.lock_{key}_unlocked_layers")
        elif unlocked:
            raise ValueError(f"model.lock_{key}_unlocked_layers={unlocked} needs model.lock_{key} true")
    freeze_unused(model, hp["contrastive_loss_weight"] > 0, model.head is not None)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("every parameter is locked: unlock a tower or keep the head (class_loss_weight > 0)")
