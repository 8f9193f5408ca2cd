"""``NonFiniteSteps``: an optimizer step whose loss or gradients are not finite is skipped; too many in a
row stop the run with a checkpoint of the last finite state.

Without it a diverging run trains on to ``max_steps`` on NaN weights and exits 0. Here, just before
each optimizer step (after every micro-batch's backward, before clipping):
- the step is bad when a loss of one of its micro-batches (``on_before_backward``) or a gradient is
  NaN or infinite, on any rank: one all-reduce (max) of one flag, so that all ranks decide together
  (under FSDP each rank sees only its own gradient shards). With a GradScaler (``16-mixed``) an
  overflowing gradient is the scaler's business (it skips the step and lowers the scale), and only
  the loss is checked. The gradient check is one max-abs per tensor (``torch._foreach_norm`` with
  ord=inf: NaN propagates, nothing overflows).
- a bad step is skipped: every gradient is dropped (AdamW leaves a parameter without a gradient
  untouched, its moments and weight decay included) and the IDF counts are put back to what they
  were before the step's first micro-batch counted its captions. The step still counts (the
  schedule and ``global_step`` move on, the batch is consumed), as with a GradScaler's skipped step.
  It is counted in ``train/nonfinite_steps`` (saved in checkpoints) and a warning names it.
- after ``max_consecutive`` bad steps in a row (``model.max_nonfinite_steps``), the weights, still
  those of the last finite step, are saved to ``diverged-step=N.ckpt`` beside the run's other
  checkpoints and ``DivergedStop`` ends the run (exit status 1) with one line saying what to try.
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from superclip_pl.errors import DivergedStop
from superclip_pl.train.signals import checkpoint_dir

ADVICE = "lower model.lr, raise model.warmup_steps or set trainer.gradient_clip_val"


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard (FSDP2)


def grads_finite(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """Whether every gradient of ``optimizer`` is finite, as a bool tensor (no host sync)."""
    grads = [_local(p.grad) for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    grads = [g for g in grads if g.numel()]
    if not grads:
        return torch.ones((), dtype=torch.bool)
    peaks = torch._foreach_norm(grads, float("inf"))  # max |g| per tensor: NaN and inf survive
    return torch.stack([p.to(grads[0].device) for p in peaks]).isfinite().all()


class NonFiniteSteps(Callback):
    """Skip optimizer steps with a non-finite loss or gradients; stop after ``max_consecutive`` in a row.

    Args:
        max_consecutive: bad steps in a row that are skipped; the next one stops the run (0: the first).
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 0:
            raise ValueError(f"model.max_nonfinite_steps={max_consecutive} must be >= 0")
        self.max_consecutive = max_consecutive
        self.total = 0  # steps skipped in the run so far
        self.consecutive = 0
        self._first_bad: int | None = None
        self._loss_ok: torch.Tensor | None = None  # all losses of this step finite (bool tensor)
        self._counts: dict[str, torch.Tensor] | None = None  # IDF counts before this step
        self._step: int | None = None

    def state_dict(self) -> dict:
        return {"total": self.total, "consecutive": self.consecutive, "first_bad": self._first_bad}

    def load_state_dict(self, state_dict: dict) -> None:
        self.total, self.consecutive = state_dict["total"], state_dict["consecutive"]
        self._first_bad = state_dict.get("first_bad")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._step = trainer.global_step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx) -> None:
        doc_freq = getattr(pl_module, "doc_freq", None)
        if self._counts is None and doc_freq is not None:  # the step's first micro-batch
            self._counts = {k: v.clone() for k, v in doc_freq.state_dict().items()}

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        ok = loss.detach().isfinite().all()
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        ok = torch.ones((), dtype=torch.bool) if self._loss_ok is None else self._loss_ok.cpu()
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            ok = ok & grads_finite(optimizer).cpu()
        bad = (~ok).to(torch.int32).to(trainer.strategy.root_device)
        bad = bool(trainer.strategy.reduce(bad, reduce_op="max"))
        counts, self._counts, self._loss_ok = self._counts, None, None
        step = trainer.global_step + 1  # the step being taken, counted from 1
        if not bad:
            self.consecutive, self._first_bad = 0, None
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        if counts is not None:
            pl_module.doc_freq.load_state_dict(counts)
        self.total += 1
        self.consecutive += 1
        self._first_bad = self._first_bad or step
        if self.consecutive <= self.max_consecutive:
            rank_zero_warn(
                f"step {step}: non-finite loss or gradients, step skipped (weights and IDF counts "
                f"unchanged); {self.consecutive} in a row (the run stops after {self.max_consecutive})"
            )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx
    ) -> None:
        if trainer.global_step == self._step:  # a micro-batch inside an optimizer step
            return
        self._step = trainer.global_step
        pl_module.log("train/nonfinite_steps", float(self.total), batch_size=1)
        if self.consecutive > self.max_consecutive:
            self._stop(trainer, pl_module)

    def _stop(self, trainer: Trainer, pl_module: LightningModule) -> None:
        first, last = self._first_bad, trainer.global_step
        what = (
            f"training diverged: non-finite loss or gradients at {self.consecutive} steps in a row "
            f"(steps {first}-{last}; {self.total} skipped in the run)"
        )
        finite = all(bool(_local(p).isfinite().all()) for p in pl_module.parameters())
        flag = torch.tensor(int(not finite), device=trainer.strategy.root_device)
        finite = not bool(trainer.strategy.reduce(flag, reduce_op="max"))  # every rank's shards
        if not finite:
            raise DivergedStop(
                f"{what}; the weights themselves are no longer finite, nothing saved: resume from an "
                f"earlier checkpoint in {checkpoint_dir(trainer)} and {ADVICE}"
            )
        path = os.path.join(checkpoint_dir(trainer), f"diverged-step={last}.ckpt")
        trainer.save_checkpoint(path)
        raise DivergedStop(
            f"{what}; the model of step {first - 1} (the last finite one) is saved to {path}; {ADVICE}, "
            f"then resume with --ckpt_path {path}"
        )
