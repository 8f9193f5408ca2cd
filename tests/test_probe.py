"""The linear-probe protocol (eval/probe.py): the batched training equals a plain PyTorch loop (nn.Linear,
AdamW, a shuffling DataLoader after manual_seed), the search follows CLIP_benchmark's rule, seeds fix
everything and leave the global RNG alone, and the split / few-shot helpers fail clearly."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from superclip_pl.eval import probe
from superclip_pl.eval.probe import (
    FIRST_ROUND,
    WEIGHT_DECAYS,
    fewshot_rows,
    linear_probe,
    search_weight_decay,
    split_validation,
    train_probes,
)


def clusters(n: int, seed: int, classes: int = 6, dim: int = 16, noise: float = 1.5):
    """Normalised features around one random centre per class (fixed centres), labels (n,)."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    return F.normalize(centres[y] + noise * torch.randn(n, dim, generator=g), dim=-1), y


def plain_training(x, y, classes, weight_decay, lr, epochs, batch_size, seed):
    """The protocol written the plain way: global seed, nn.Linear, AdamW, cosine lr per step, DataLoader."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    total = epochs * len(loader)
    for epoch in range(epochs):
        for i, (xb, yb) in enumerate(loader):
            optimizer.param_groups[0]["lr"] = (
                0.5 * (1 + np.cos(np.pi * (epoch * len(loader) + i) / total)) * lr
            )
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    return model.weight.detach(), model.bias.detach()


def test_probes_trained_together_equal_a_plain_loop_for_each_weight_decay():
    x, y = clusters(150, seed=0)  # 150 / 32: a last batch of 22
    decays = [1e-6, 0.01, 1.0]
    weights, biases = train_probes(x, y, 6, decays, lr=0.1, epochs=3, batch_size=32, seed=7)
    assert weights.shape == (3, 6, 16) and biases.shape == (3, 6)
    for w, b, decay in zip(weights, biases, decays, strict=True):
        ref_w, ref_b = plain_training(x, y, 6, decay, lr=0.1, epochs=3, batch_size=32, seed=7)
        torch.testing.assert_close(w, ref_w, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b, ref_b, atol=1e-5, rtol=1e-4)
    # a large decay shrinks the weights: the per-probe decay really differs
    assert weights[2].norm() < 0.8 * weights[0].norm()


def test_a_seed_fixes_the_probe_and_the_global_rng_is_left_alone():
    x, y = clusters(100, seed=1)
    state = torch.random.get_rng_state()
    a = train_probes(x, y, 6, [0.01], epochs=2, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = train_probes(x, y, 6, [0.01], epochs=2, seed=3)
    c = train_probes(x, y, 6, [0.01], epochs=2, seed=4)
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[0], c[0])


def test_training_is_fp32_with_grad_inside_inference_mode_and_autocast():
    x, y = clusters(64, seed=2)
    expected = train_probes(x, y, 6, [0.1], epochs=1, seed=0)
    # as in Lightning's evaluation loops: inference mode, inference tensors, bf16 autocast
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = train_probes(x.bfloat16(), y.clone(), 6, [0.1], epochs=1, seed=0)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], expected[0], atol=1e-2, rtol=0)  # bf16 inputs, fp32 training


def test_the_grid_and_the_first_round_are_clip_benchmarks():
    assert len(WEIGHT_DECAYS) == 97 and WEIGHT_DECAYS[0] == 1e-6 and WEIGHT_DECAYS[-1] == pytest.approx(100)
    assert FIRST_ROUND == [0, 16, 32, 48, 64, 80, 96]


def test_search_refines_around_the_peak_and_trains_each_point_once(monkeypatch):
    trained = []
    real = probe.train_probes

    def counting(*args, **kwargs):
        trained.extend(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(probe, "train_probes", counting)
    train, val = clusters(200, seed=3), clusters(100, seed=4)
    decay, tried = search_weight_decay(train, val, 6, epochs=2)
    assert len(trained) == len(set(trained)) == len(tried)  # no point trained twice
    assert trained[:7] == [WEIGHT_DECAYS[i] for i in FIRST_ROUND]
    assert 7 < len(tried) <= 7 + 4 * 2  # each refinement adds at most its two new neighbours
    assert decay in tried and tried[decay] == max(tried.values())
    # the huge decays (1e1, 1e2) shrink the probe to nothing: worse than the chosen one
    assert tried[WEIGHT_DECAYS[96]] < tried[decay]


def test_search_keeps_the_earlier_candidate_on_a_tie(monkeypatch):
    # every probe scores the same: CLIP_benchmark's find_peak keeps the first candidate, index 0
    monkeypatch.setattr(probe, "classification_metrics", lambda *a, **k: {"top1": 0.5})
    decay, tried = search_weight_decay(clusters(40, seed=5), clusters(20, seed=6), 6, epochs=1)
    assert decay == WEIGHT_DECAYS[0]
    # refinements around index 0: (0, 0, 8), (0, 0, 4), (0, 0, 2), (0, 0, 1)
    assert sorted(tried) == [WEIGHT_DECAYS[i] for i in sorted({*FIRST_ROUND, 8, 4, 2, 1})]


def test_linear_probe_separates_separable_features():
    train, val, test = (clusters(n, seed=s, noise=0.2) for n, s in ((300, 7), (60, 8), (200, 9)))
    metrics, decay = linear_probe(train, test, 6, val=val, epochs=5)
    assert metrics["top1"] == 1.0 and metrics["mean_per_class_recall"] == 1.0 and decay in WEIGHT_DECAYS
    metrics, decay = linear_probe(train, test, 6, epochs=5)  # no validation part: no search
    assert decay == 0.0 and metrics["top1"] == 1.0


def test_fewshot_takes_k_per_class_and_names_a_short_class():
    y = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
    rows = fewshot_rows(y, 3, seed=0)
    assert torch.bincount(y[rows]).tolist() == [3, 3, 3] and len(set(rows.tolist())) == 9
    assert not torch.equal(rows, fewshot_rows(y, 3, seed=1))  # the seed chooses which
    with pytest.raises(ValueError, match=r"fewshot_k=4: class 1 has only 3 training samples"):
        fewshot_rows(y, 4, seed=0)


def test_split_validation_sizes_as_random_split_and_refuses_an_empty_part():
    y = torch.arange(25)
    kept, held_out = split_validation(y, 0.1, seed=0)
    assert len(held_out) == math.floor(25 * 0.1) == 2 and len(kept) == 23
    assert sorted(torch.cat([kept, held_out]).tolist()) == list(range(25))
    with pytest.raises(ValueError, match=r"val_proportion=0.01 leaves 0 of the 25 training samples"):
        split_validation(y, 0.01, seed=0)
