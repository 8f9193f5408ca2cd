"""Negatives across gradient accumulation: one contrastive loss over all micro-batches of a step.

Technique: gradient caching (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup"), not open_clip's feature cache. Why:
- Every micro-batch is first encoded without a graph; only its inputs and its (B, E) embeddings are
  kept. At the step's last micro-batch the loss of all of them (and of all ranks, gathered) gives the
  embeddings' gradients; then each micro-batch is re-encoded with autograd and backpropagated with its
  embedding gradient, one at a time. Activation memory is that of one micro-batch whatever the count.
- open_clip's cache re-forwards each micro-batch with the others' cached features and backpropagates
  the full loss each time: the same compute, but the loss is evaluated K times, and the DDP gradient
  reduction must be held back by hand in the same way. Gradient caching needs one loss per step.
- Each re-encoded backward is an ordinary forward + backward of the model, so gradient checkpointing,
  bf16 autocast (the strategy's precision context wraps the training step) and FSDP2 (re-forwards go
  through the fully sharded modules) work unchanged. Gradient reduction is held back (DDP ``no_sync``,
  FSDP2 ``set_requires_gradient_sync(False)``) for all but the last backward, so it happens once.
- The last backward also carries the logit scale's (and SigLIP bias') gradient, so that under DDP
  every parameter takes part in the synchronised backward.
- Both encodings of a micro-batch draw the same random numbers (patch dropout's masks, dropout in the
  towers): the torch random state (CPU and the micro-batch's accelerator) is captured before the first
  and set again for the second, as GradCache's ``RandContext`` does, inside ``torch.random.fork_rng``,
  so that the run's own random stream (data augmentation, the next steps' masks) goes on untouched.
The cost: each micro-batch is encoded twice (about 4/3 of plain accumulation's compute without
checkpointing). The class loss has no cross-sample terms: it is computed per micro-batch in the
re-encoding, with the IDF weights of the whole step (every micro-batch's captions counted once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from superclip_pl.losses import classification_loss
from superclip_pl.train.sharding import gradient_sync


@dataclass
class RandomState:
    """The torch random state of the CPU and, for an accelerator, of ``device``."""

    device: torch.device
    cpu: torch.Tensor
    accelerator: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> RandomState:
        device = torch.device(device)
        accelerator = None
        if device.type != "cpu":
            accelerator = torch.get_device_module(device.type).get_rng_state(device)
        return cls(device, torch.get_rng_state(), accelerator)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Draw from this state inside; the state before is back afterwards."""
        accelerated = self.accelerator is not None
        devices, device_type = ([self.device], self.device.type) if accelerated else ([], None)
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            torch.set_rng_state(self.cpu)
            if accelerated:
                torch.get_device_module(self.device.type).set_rng_state(self.accelerator, self.device)
            yield


@dataclass
class NegativesCache:
    """The micro-batches of the optimizer step so far: inputs, graph-free embeddings and the random
    state each was first encoded from."""

    batches: list[dict[str, torch.Tensor]] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)  # each (B_k, E)
    texts: list[torch.Tensor] = field(default_factory=list)
    logit_scale: torch.Tensor | None = None
    logit_bias: torch.Tensor | None = None
    states: list[RandomState] = field(default_factory=list)

    def encode(self, batch: dict[str, torch.Tensor], forward: Callable[[dict], dict]) -> None:
        """Encode ``batch`` with ``forward`` without a graph and keep what the step's loss needs."""
        state = RandomState.capture(batch["pixel_values"].device)
        with torch.no_grad():
            self.add(batch, forward(batch), state)

    def add(
        self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor | None], state: RandomState
    ) -> None:
        self.batches.append(batch)
        self.states.append(state)
        self.images.append(out["image_embeds"].detach())
        self.texts.append(out["text_embeds"].detach())
        self.logit_scale = out["logit_scale"].detach()
        self.logit_bias = None if out["logit_bias"] is None else out["logit_bias"].detach()

    def clear(self) -> None:
        self.__init__()


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().requires_grad_(True)


def cached_backward(module, cache: NegativesCache, targets, idf) -> dict[str, torch.Tensor]:
    """Backward of the step's loss over all cached micro-batches; returns the loss terms (detached).

    ``module`` is the LitSuperCLIP (its ``model``, ``contrastive_term``, ``manual_backward``, hparams);
    ``targets(batch)`` gives a micro-batch's class targets; ``idf`` the step's IDF weights (or None).
    """
    hp = module.hparams
    images, texts = _leaf(torch.cat(cache.images)), _leaf(torch.cat(cache.texts))  # (K*B, E), fp32
    scale = _leaf(cache.logit_scale)
    bias = None if cache.logit_bias is None else _leaf(cache.logit_bias)
    cached = {"image_embeds": images, "text_embeds": texts, "logit_scale": scale, "logit_bias": bias}
    con = module.contrastive_term(cached)
    leaves = [images, texts, scale] + ([bias] if bias is not None else [])
    # through the gather's backward: each rank's embeddings get the gradient of every rank's loss
    grads = torch.autograd.grad(hp.contrastive_loss_weight * con, leaves)
    sizes = [x.shape[0] for x in cache.images]
    grad_images, grad_texts = grads[0].split(sizes), grads[1].split(sizes)
    total = images.shape[0]
    wrapper, last = module.trainer.strategy.model, len(cache.batches) - 1
    class_loss = torch.zeros((), device=images.device)
    for k, batch in enumerate(cache.batches):
        with gradient_sync(wrapper, module.model, enabled=k == last):
            with cache.states[k].replay():  # the first encoding's random numbers: its masks and dropout
                out = module.model(batch["pixel_values"], batch["input_ids"], batch.get("attention_mask"))
            surrogate = (out["image_embeds"].float() * grad_images[k]).sum()
            surrogate = surrogate + (out["text_embeds"].float() * grad_texts[k]).sum()
            if k == last:
                surrogate = surrogate + out["logit_scale"].float() * grads[2]
                if bias is not None:
                    surrogate = surrogate + out["logit_bias"].float() * grads[3]
            if idf is not None:
                # the class loss of the whole step is the mean over its samples: weight n_k / N
                cls = classification_loss(out["vocab_logits"], targets(batch), idf, module.ignore_ids)
                cls = cls * (batch["input_ids"].shape[0] / total)
                class_loss += cls.detach()
                surrogate = surrogate + hp.class_loss_weight * cls
            module.manual_backward(surrogate)
    terms = {"contrastive_loss": con.detach(), "loss": hp.contrastive_loss_weight * con.detach()}
    if idf is not None:
        terms["class_loss"] = class_loss
        terms["loss"] = terms["loss"] + hp.class_loss_weight * class_loss
    terms["logit_scale"] = cache.logit_scale
    return terms


def forget_logged_step_values(trainer) -> None:
    """Call at each micro-batch's start. After every batch Lightning writes the step values logged last;
    its own accumulation skips the micro-batches that do not step, manual optimisation does not, and a
    step's values would be written again at each micro-batch of the next step. Only the stepping batch
    logs anew."""
    for metric in trainer._results.values():
        if metric.meta.fx == "training_step":
            metric._forward_cache = None


def choose_optimisation(module) -> None:
    """At the fit's ``setup``: manual optimisation for negatives across accumulation, else Lightning's.

    Negatives across accumulation need every micro-batch of a step before any backward, which Lightning's
    automatic accumulation (a loss and a backward per micro-batch) cannot give: the module then optimises
    by hand. ``trainer.accumulate_grad_batches`` stays the user's knob (the data module, the step count and
    the loggers read it); Lightning refuses it with manual optimisation only in its checks before
    ``setup``, so the switch happens here. It stays so after the fit (Lightning reads the step count from
    the loop of the mode in use). Without a contrastive loss (SuperClass) there are no negatives.
    """
    hp, trainer = module.hparams, module.trainer
    negatives = hp.accumulated_negatives and hp.contrastive_loss_weight > 0
    module.automatic_optimization = not (negatives and trainer.accumulate_grad_batches > 1)
    clip, plugin = trainer.gradient_clip_val, trainer.precision_plugin
    if not module.automatic_optimization and clip and getattr(plugin, "scaler", None) is not None:
        raise ValueError(
            f"trainer.gradient_clip_val={clip} with negatives across accumulation needs precision "
            "bf16-mixed or 32-true (16-mixed scales the gradients the clip would see); or set "
            "model.accumulated_negatives false"
        )
