"""The linear probe on frozen features, trained as CLIP_benchmark's ``linear_probe.evaluate`` trains it.

The protocol (CLIP_benchmark 1.6.2, ``clip_benchmark/metrics/linear_probe.py``, after CLIP's A.3 with
AdamW in place of L-BFGS):
- a ``Linear(D, C)`` with PyTorch's default initialisation on the features, cross-entropy, AdamW
  (betas 0.9 / 0.999, eps 1e-8, every parameter decayed, the bias too), learning rate ``lr`` on a
  cosine schedule without warm-up, stepped every batch, ``epochs`` epochs of shuffled batches; fp32;
- the weight decay is searched on a validation part: the 7 values 1e-6, ..., 1e2 of a 97-point log
  grid, then three candidates (peak - s, peak, peak + s) for s = 8, 4, 2, 1 grid steps, the best
  validation top-1 winning and a tie keeping the earlier candidate;
- the final probe is trained with that decay on train + validation (few-shot: on the k samples per
  class only, as there), and scored on the test features.

Randomness: a seed fixes the initialisation and each epoch's batch order, drawn as torch's
``DataLoader(shuffle=True)`` draws them after ``torch.manual_seed(seed)`` (what CLIP_benchmark's
``train`` does), from a generator of our own: the global RNG is never touched. Every training of a
search starts from that same state, so the probes of one round, which differ only in their weight
decay, are trained together as one (M, C, D) tensor: one pass over the data serves all of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from superclip_pl.eval.metrics import classification_metrics

# CLIP_benchmark's grid; its first round is the grid points equal to np.logspace(-6, 2, 7)
WEIGHT_DECAYS: list[float] = np.logspace(-6, 2, num=97).tolist()
FIRST_ROUND: list[int] = [i for i, v in enumerate(WEIGHT_DECAYS) if v in np.logspace(-6, 2, num=7).tolist()]


def _draw(g: torch.Generator) -> int:
    """One int64 draw, as ``DataLoader`` and ``RandomSampler`` take their seeds."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=g).item())


def train_probes(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    weight_decays: Sequence[float],
    lr: float = 0.1,
    epochs: int = 10,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """One linear probe per weight decay, all from the same initialisation and batch order.

    features (N, D) and labels (N,) on any device. Returns weights (M, C, D) and biases (M, C), fp32,
    detached, for M = len(weight_decays). Trains with autograd in fp32 whatever the caller's context
    (``inference_mode``, ``no_grad``, autocast).
    """
    # Lightning evaluates under inference_mode; the probe needs autograd and full precision
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        torch.autocast(features.device.type, enabled=False),
    ):
        n, d = features.shape
        device = features.device
        g = torch.Generator().manual_seed(seed)
        init_w = torch.empty(num_classes, d)
        torch.nn.init.kaiming_uniform_(init_w, a=math.sqrt(5), generator=g)  # nn.Linear's init, same draws
        bound = 1 / math.sqrt(d)
        init_b = torch.empty(num_classes).uniform_(-bound, bound, generator=g)
        m = len(weight_decays)
        w = init_w.to(device).expand(m, -1, -1).clone().requires_grad_()  # (M, C, D)
        b = init_b.to(device).expand(m, -1).clone().requires_grad_()  # (M, C)
        decays = torch.tensor(weight_decays, dtype=torch.float64)  # (M,)
        # AdamW decays each parameter by (1 - lr * decay) before the Adam update; the decay differs per
        # probe, so it is applied here and the optimizer runs with none (the same arithmetic). Fused: one
        # kernel per step instead of a dozen over the (M, C, D) tensor, a third of the probe's time
        optimizer = torch.optim.AdamW([w, b], lr=lr, weight_decay=0.0, fused=True)
        # copies made here are ordinary tensors, which autograd may save (inference-mode ones it may not)
        x, y = features.float().clone(), labels.to(device).long().clone()
        steps_per_epoch = math.ceil(n / batch_size)
        total = epochs * steps_per_epoch
        for epoch in range(epochs):
            _draw(g)  # a DataLoader iterator's base seed (for workers), drawn first
            order = torch.randperm(n, generator=torch.Generator().manual_seed(_draw(g))).to(device)
            for i in range(steps_per_epoch):
                step_lr = float(0.5 * (1 + np.cos(np.pi * (epoch * steps_per_epoch + i) / total)) * lr)
                optimizer.param_groups[0]["lr"] = step_lr
                idx = order[i * batch_size : (i + 1) * batch_size]
                # every probe on the same batch in one matrix product: (B, D) x (D, M * C) -> (B * M, C);
                # for one probe this is F.linear, as nn.Linear computes it
                logits = torch.addmm(b.flatten(), x[idx], w.flatten(0, 1).t()).view(-1, num_classes)
                # the sum over probes of each one's mean loss: each probe gets its own gradient
                target = y[idx].repeat_interleave(m)  # (B * M,) row b * M + p is probe p on sample b
                loss = F.cross_entropy(logits, target, reduction="sum") / len(idx)
                optimizer.zero_grad()
                loss.backward()
                with torch.no_grad():
                    factor = (1 - step_lr * decays).float().to(device)  # (M,)
                    w.mul_(factor[:, None, None])
                    b.mul_(factor[:, None])
                optimizer.step()
        return w.detach(), b.detach()


def probe_logits(weight: Tensor, bias: Tensor, features: Tensor) -> Tensor:
    """Logits (N, C) of one probe, weight (C, D) and bias (C,), on features (N, D)."""
    return torch.addmm(bias, features.float(), weight.t())


def search_weight_decay(
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    num_classes: int,
    lr: float = 0.1,
    epochs: int = 10,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[float, dict[float, float]]:
    """The weight decay CLIP_benchmark's search picks, and the validation top-1 of each one tried.

    A grid point is trained once however often the search asks for it (a probe depends only on the
    data, the seed and its decay); each round's new points are trained together.
    """
    accuracy: dict[int, float] = {}  # grid index -> validation top-1

    def peak(candidates: list[int]) -> int:
        todo = [i for i in dict.fromkeys(candidates) if i not in accuracy]
        if todo:
            weights, biases = train_probes(
                *train, num_classes, [WEIGHT_DECAYS[i] for i in todo], lr, epochs, batch_size, seed
            )
            for i, w, b in zip(todo, weights, biases, strict=True):
                accuracy[i] = classification_metrics(probe_logits(w, b, val[0]), val[1], topk=(1,))["top1"]
        # CLIP_benchmark's find_peak: the first candidate to beat the best so far (from 0) wins
        best, top = 0, 0.0
        for i in candidates:
            if accuracy[i] > top:
                best, top = i, accuracy[i]
        return best

    index = peak(FIRST_ROUND)
    for span in (8, 4, 2, 1):
        index = peak([max(index - span, 0), index, min(index + span, len(WEIGHT_DECAYS) - 1)])
    return WEIGHT_DECAYS[index], {WEIGHT_DECAYS[i]: a for i, a in sorted(accuracy.items())}


def split_validation(labels: Tensor, proportion: float, seed: int) -> tuple[Tensor, Tensor]:
    """Row indices (train, val), on the labels' device, of a seeded random split with
    ``floor(N * proportion)`` rows to val, as ``torch.utils.data.random_split([1 - p, p])`` sizes them."""
    n = len(labels)
    n_val = math.floor(n * proportion)
    if not 0 < n_val < n:
        raise ValueError(
            f"val_proportion={proportion} leaves {n_val} of the {n} training samples for validation; "
            "use a larger proportion (or more samples), or val_proportion=0 for no weight-decay search"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(labels.device)
    return order[n_val:].sort().values, order[:n_val].sort().values


def fewshot_rows(labels: Tensor, k: int, seed: int) -> Tensor:
    """Row indices of k samples per class (each class present in ``labels``), chosen in a seeded random
    order; raises, naming the class, when one has fewer than k."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).to(labels.device)
    y = labels[order]  # (N,) labels in that order
    # position of each row among the rows of its class, in that order: keep those below k
    onehot = F.one_hot(y.long()).long()  # (N, C)
    rank = (onehot.cumsum(0) * onehot).sum(1) - 1  # (N,)
    counts = onehot.sum(0)  # (C,)
    short = ((counts > 0) & (counts < k)).nonzero().flatten().tolist()
    if short:
        raise ValueError(
            f"fewshot_k={k}: class {short[0]} has only {int(counts[short[0]])} training samples "
            f"({len(short)} classes have fewer than {k}); lower fewshot_k"
        )
    return order[rank < k].sort().values


def linear_probe(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    num_classes: int,
    val: tuple[Tensor, Tensor] | None = None,
    fewshot_k: int | None = None,
    lr: float = 0.1,
    epochs: int = 10,
    batch_size: int = 64,
    seed: int = 0,
    topk: Sequence[int] = (1, 5),
) -> tuple[dict[str, float], float]:
    """Test metrics (``classification_metrics``) of the probe trained by the protocol above, and its
    weight decay. ``train``, ``val``, ``test``: (features (N, D), labels (N,)); without ``val`` there is
    no search (weight decay 0, as CLIP_benchmark does without a validation set)."""
    if fewshot_k is not None:
        rows = fewshot_rows(train[1], fewshot_k, seed)
        train = (train[0][rows], train[1][rows])
    decay = 0.0
    if val is not None:
        decay, _ = search_weight_decay(train, val, num_classes, lr, epochs, batch_size, seed)
        if fewshot_k is None:  # few-shot trains on its k per class only, not on the validation part
            train = (torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]]))
    weights, biases = train_probes(*train, num_classes, [decay], lr, epochs, batch_size, seed)
    return classification_metrics(probe_logits(weights[0], biases[0], test[0]), test[1], topk), decay
