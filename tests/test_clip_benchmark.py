"""Parity with CLIP_benchmark 1.6.2 (installed by `make install`, without its dependencies) on the same
model and data: zero-shot classification and retrieval through our callbacks against its
``zeroshot_classification.evaluate`` / ``zeroshot_retrieval.evaluate``, the linear probe against its
``linear_probe.evaluate`` on the same features and seed, and the probe's features against its
``Featurizer``. CLIP_benchmark runs on the CPU here: its probe insists on ``device == "cuda"`` and
calls ``.cuda()``, which the fixture below turns into no-ops."""

import builtins
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import BatchEncoding

import distributed_eval as de
import distributed_probe as dp
from conftest import MICRO, quiet_trainer
from superclip_pl.eval.callbacks import ZeroShotClassification, ZeroShotRetrieval
from superclip_pl.eval.probe import linear_probe
from superclip_pl.eval.sets import load_classification_set, load_retrieval_set
from superclip_pl.tokenizer import tokenize
from superclip_pl.train.module import LitSuperCLIP
from superclip_pl.transforms import eval_transform

try:
    from clip_benchmark.metrics import linear_probe as cb_probe
    from clip_benchmark.metrics import zeroshot_classification as zsc
    from clip_benchmark.metrics import zeroshot_retrieval as zsr
except ImportError as e:  # fail, not skip: a skipped parity check would pass unseen
    raise ImportError(f"{e}: the reference is installed by `make install` (clip-benchmark --no-deps)") from e


def scalar(x):
    """float() that also takes the one-element arrays CLIP_benchmark's ``accuracy`` passes it (NumPy 2
    refuses to convert an array of ndim > 0)."""
    return builtins.float(x.reshape(-1)[0]) if isinstance(x, np.ndarray) else builtins.float(x)


class CudaLike(str):
    """A device string equal to "cuda" (CLIP_benchmark's probe asserts it) that torch reads as "cpu"."""

    def __eq__(self, other):
        return other == "cuda" or str.__eq__(self, other)

    __hash__ = str.__hash__


@pytest.fixture(autouse=True)
def cpu_clip_benchmark(monkeypatch):
    monkeypatch.setattr(zsc, "float", scalar, raising=False)  # the one-line NumPy 2 fix of accuracy()
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)


class OpenCLIPLike(torch.nn.Module):
    """Our model behind the interface CLIP_benchmark calls: encode_image(pixels), encode_text(tokens)."""

    def __init__(self, module: LitSuperCLIP):
        super().__init__()
        self.model, self.tokenizer, self.max_length = module.model.eval(), module.tokenizer, module.max_length

    def encode_image(self, pixels):
        return self.model.encode_image(pixels)

    def encode_text(self, tokens):
        return self.model.encode_text(**tokens)

    def tokenize(self, texts):  # CLIP_benchmark calls tokenizer(texts).to(device)
        return BatchEncoding(tokenize(self.tokenizer, texts, self.max_length))


class Images(torch.utils.data.Dataset):
    """(pixels, target) of a set's samples in its order, with ``classes`` (CLIP_benchmark reads it)."""

    def __init__(self, samples, size, classes=None):
        self.samples, self.transform, self.classes = list(samples), eval_transform(size), classes

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        return self.transform(s.image), (s.label if hasattr(s, "label") else s.captions)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("cb")
    torch.manual_seed(0)
    de.save_checkpoint(
        LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, warmup_steps=0), root / "model.ckpt"
    )
    return SimpleNamespace(
        ckpt=str(root / "model.ckpt"),
        # 40 images of 7 classes; 12 captioned images (K = 10 needs more than 10 candidates)
        cls=str(de.write_classification_set(root / "cls", n=40, shard_sizes=(14, 13, 13))),
        ret=str(de.write_retrieval_set(root / "ret", n=12, shard_sizes=(6, 6))),
        probe=str(dp.write_probe_set(root / "probe")),
    )


@pytest.fixture
def module(world):
    checkpoint = torch.load(world.ckpt, weights_only=False)
    module = LitSuperCLIP(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    return module


def test_zero_shot_classification_equals_clip_benchmarks(world, module, tokenizer):
    callback = ZeroShotClassification("colours", world.cls, batch_size=8, num_workers=0)
    quiet_trainer(callbacks=[callback]).validate(module, de.val_loader(tokenizer), verbose=False)

    evalset = load_classification_set(world.cls)
    model = OpenCLIPLike(module)
    loader = DataLoader(Images(evalset, module.image_size, evalset.classnames), batch_size=8)
    with torch.no_grad():
        ref = zsc.evaluate(
            model, loader, model.tokenize, evalset.classnames, evalset.templates, "cpu", amp=False
        )
    ours = {k.split("/")[-1]: v for k, v in callback.results.items()}
    assert ours == pytest.approx(
        {"top1": ref["acc1"], "top5": ref["acc5"], "mean_per_class_recall": ref["mean_per_class_recall"]},
        abs=1e-6,
    )
    assert 0 < ours["top1"] < ours["top5"] < 1  # a model neither perfect nor useless


def test_retrieval_recall_equals_clip_benchmarks(world, module, tokenizer):
    callback = ZeroShotRetrieval("captions", world.ret, batch_size=5, num_workers=0)
    quiet_trainer(callbacks=[callback]).validate(module, de.val_loader(tokenizer), verbose=False)

    model = OpenCLIPLike(module)
    samples = Images(load_retrieval_set(world.ret), module.image_size)
    loader = DataLoader(
        samples, batch_size=5, collate_fn=lambda b: (torch.stack([x for x, _ in b]), [c for _, c in b])
    )
    with torch.no_grad():
        ref = zsr.evaluate(model, loader, model.tokenize, "cpu", amp=False, recall_k_list=[1, 5, 10])
    expected = {f"retrieval/captions/t2i_R@{k}": ref[f"image_retrieval_recall@{k}"] for k in (1, 5, 10)}
    expected |= {f"retrieval/captions/i2t_R@{k}": ref[f"text_retrieval_recall@{k}"] for k in (1, 5, 10)}
    assert callback.results == pytest.approx(expected, abs=1e-6)
    assert 0 < callback.results["retrieval/captions/t2i_R@1"] < 1


def clusters(n, g, centres, noise=2.0):
    y = torch.randint(0, len(centres), (n,), generator=g)
    return F.normalize(centres[y] + noise * torch.randn(n, centres.shape[1], generator=g), dim=-1), y


def test_linear_probe_top1_is_clip_benchmarks_on_the_same_features_and_seed(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 32, generator=g)
    train, val, test = (clusters(n, g, centres) for n in (540, 60, 600))
    # CLIP_benchmark reads cached features from feature_root/model_id and, with fewshot_k = -1, keeps
    # the train features in the order of torch.randperm(N) drawn from the global RNG: seed it, and give
    # ours the same order, so that both see the same data in the same batches
    os.makedirs(tmp_path / "m")
    for split, (x, y) in {"train": train, "val": val, "test": test}.items():
        torch.save(x, tmp_path / "m" / f"features_{split}.pt")
        torch.save(y, tmp_path / "m" / f"targets_{split}.pt")
    torch.manual_seed(123)
    order = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(123))
    ref = cb_probe.evaluate(
        None,
        [None],
        None,
        -1,
        64,
        0,
        0.1,
        10,
        "m",
        0,
        str(tmp_path),
        CudaLike("cpu"),
        val_dataloader=[None],
        amp=False,
    )
    ours, decay = linear_probe(
        (train[0][order], train[1][order]), test, 10, val=val, lr=0.1, epochs=10, seed=0
    )
    difference = 100 * abs(ours["top1"] - ref["lp_acc1"])
    with capsys.disabled():
        print(
            f"\nlinear probe top-1: ours {ours['top1']:.4f}, CLIP_benchmark {ref['lp_acc1']:.4f} "
            f"(difference {difference:.2f} points); weight decay {decay:.3g} / {ref['weight_decay']:.3g}"
        )
    assert difference <= 0.5
    assert decay == ref["weight_decay"]
    assert ours["mean_per_class_recall"] == pytest.approx(ref["lp_mean_per_class_recall"], abs=5e-3)
    assert 0.3 < ours["top1"] < 0.95  # a problem neither trivial nor hopeless


def test_probe_features_are_clip_benchmarks_featurizer_output(world, module, tokenizer):
    callback = dp.probe(world.probe)
    seen = dp.record_features(callback)
    quiet_trainer(callbacks=[callback]).validate(module, de.val_loader(tokenizer), verbose=False)

    featurizer = cb_probe.Featurizer(OpenCLIPLike(module), normalize=True)  # its default
    for split in ("train", "test"):
        loader = DataLoader(
            Images(load_classification_set(world.probe, split), module.image_size), batch_size=7
        )
        with torch.no_grad():
            pairs = [(featurizer(x), y) for x, y in loader]
        torch.testing.assert_close(seen[split][0], torch.cat([f for f, _ in pairs]), atol=1e-6, rtol=0)
        assert torch.equal(seen[split][1], torch.cat([y for _, y in pairs]))
