"""FSDP2 sharding of ``SuperCLIP`` (``fully_shard`` per encoder layer, then the root) and the switch
that holds gradient reduction back while micro-batches accumulate."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from superclip_pl.model import SuperCLIP


def encoder_layers(model: SuperCLIP) -> list[nn.Module]:
    """The CLIP encoder layers of both towers: the sharding, checkpointing and compilation units."""
    clip = model.clip
    return [*clip.vision_model.encoder.layers, *clip.text_model.encoder.layers]


def shard(model: SuperCLIP, mesh) -> None:
    """``fully_shard`` each encoder layer, then the root (embeddings, projections, head, logit scale),
    over the mesh's ``data_parallel`` dimension; a second call does nothing."""
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if mesh is None or isinstance(model, FSDPModule):
        return
    dp_mesh = mesh["data_parallel"]
    for layer in encoder_layers(model):
        fully_shard(layer, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    # evaluation calls these instead of forward: they must gather the sharded root parameters too
    register_fsdp_forward_method(model, "encode_image")
    register_fsdp_forward_method(model, "encode_text")


@contextlib.contextmanager
def gradient_sync(wrapper: nn.Module | None, model: nn.Module, enabled: bool) -> Iterator[None]:
    """Backward passes inside reduce gradients over ranks only when ``enabled``; otherwise they add to
    the local gradients, which the next synchronised backward reduces together (one reduction per
    optimizer step). ``wrapper`` is the strategy's wrapper of the LightningModule (DDP or FSDP1, which
    have ``no_sync``), ``model`` the SuperCLIP (fully sharded under FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    if enabled:
        yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(wrapper, "no_sync"):
        with wrapper.no_sync():
            yield
    else:
        yield
