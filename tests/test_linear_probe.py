"""The LinearProbe callback: the numbers of the pure protocol on the features it extracts, the same
numbers on two processes (uneven shards), when it runs in fit / validate / test, and clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import distributed_eval as de
import distributed_probe as dp
from conftest import MICRO, quiet_trainer
from superclip_pl import LinearProbe
from superclip_pl.eval.probe import linear_probe, split_validation
from superclip_pl.eval.sets import load_classification_set
from superclip_pl.train.module import LitSuperCLIP

HERE = os.path.dirname(__file__)
KEYS = [f"linprobe/colours/{m}" for m in ("top1", "top5", "mean_per_class_recall")]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir):
    """A checkpoint of a micro model and a probe set (train 25 images, test 15, 5 classes, 3 shards each)."""
    root = tmp_path_factory.mktemp("probe")
    torch.manual_seed(0)
    de.save_checkpoint(
        LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, warmup_steps=0), root / "model.ckpt"
    )
    return SimpleNamespace(ckpt=str(root / "model.ckpt"), probe=str(dp.write_probe_set(root / "set")))


@pytest.fixture
def module(world):
    checkpoint = torch.load(world.ckpt, weights_only=False)
    module = LitSuperCLIP(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    return module


def test_validate_gives_the_protocols_numbers_on_the_extracted_features(world, module, tokenizer):
    callback = dp.probe(world.probe)
    seen = dp.record_features(callback)
    quiet_trainer(callbacks=[callback]).validate(module, de.val_loader(tokenizer), verbose=False)

    (train_x, train_y), (test_x, test_y) = seen["train"], seen["test"]
    assert train_x.shape == (25, 32) and test_x.shape == (15, 32)
    assert torch.equal(train_y, torch.arange(25) % 5)  # in the set's order
    torch.testing.assert_close(train_x.norm(dim=1), torch.ones(25))  # normalised, as CLIP_benchmark's
    kept, held_out = split_validation(train_y, 0.25, seed=0)
    expected, decay = linear_probe(
        (train_x[kept], train_y[kept]),
        (test_x, test_y),
        5,
        val=(train_x[held_out], train_y[held_out]),
        epochs=4,
        batch_size=4,
    )
    assert callback.results == {f"linprobe/colours/{k}": v for k, v in expected.items()}
    assert callback.weight_decay == decay
    assert 0.2 < callback.results["linprobe/colours/top1"] < 1  # better than chance, not perfect
    assert all(p.grad is None for p in module.parameters())  # the probe trains on features, not the model


@pytest.mark.slow
def test_two_processes_give_the_metrics_of_one(world, tmp_path):
    sizes = [
        [len(list(load_classification_set(world.probe, split, rank=r, world_size=2))) for r in (0, 1)]
        for split in ("train", "test")
    ]
    assert sizes == [[13, 12], [8, 7]]  # uneven: one rank runs a placeholder batch
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": HERE}
    script = os.path.join(HERE, "distributed_probe.py")
    outputs = {}
    for mode in ("single", "ddp"):
        out = tmp_path / mode
        out.mkdir()
        proc = subprocess.run(
            [sys.executable, script, world.ckpt, world.probe, str(out), mode],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[mode] = out
    single = json.loads((outputs["single"] / "rank0.json").read_text())
    one = torch.load(outputs["single"] / "features0.pt")
    for rank in (0, 1):
        metrics = json.loads((outputs["ddp"] / f"rank{rank}.json").read_text())
        assert {k: metrics[k] for k in [*KEYS, "weight_decay"]} == pytest.approx(
            {k: single[k] for k in [*KEYS, "weight_decay"]}, abs=1e-6
        )
        features = torch.load(outputs["ddp"] / f"features{rank}.pt")  # every rank holds every row
        for split in ("train", "test"):
            torch.testing.assert_close(features[split][0], one[split][0], atol=1e-6, rtol=0)
            assert torch.equal(features[split][1], one[split][1])
    assert 0 < single["linprobe/colours/top1"] < 1


class WithTestStep(LitSuperCLIP):
    def test_step(self, batch, batch_idx):
        return self.validation_step(batch, batch_idx)


def test_fit_every_n_steps_and_test_evaluate_the_same_model_alike(world, tokenizer):
    checkpoint = torch.load(world.ckpt, weights_only=False)
    module = WithTestStep(**{**checkpoint["hyper_parameters"], "lr": 0.0})
    module.load_state_dict(checkpoint["state_dict"])
    callback = dp.probe(world.probe, every_n_steps=2, fewshot_k=3)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[callback])
    trainer.fit(module, train_dataloaders=de.val_loader(tokenizer))
    assert callback.evaluated_at == 2 and set(callback.results) == set(KEYS)
    fitted = dict(callback.results)
    trainer.test(module, dataloaders=de.val_loader(tokenizer), verbose=False)
    assert callback.results == fitted  # the same model (lr 0), the same seed: the same probe


def test_a_missing_train_split_fails_at_setup_naming_it(world, module, tokenizer, tmp_path):
    root = dp.write_probe_set(tmp_path / "set")
    for f in (root / "train").iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError, match=r"no shards found at .*set/train/"):
        quiet_trainer(callbacks=[dp.probe(str(root))]).validate(
            module, de.val_loader(tokenizer), verbose=False
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"val_proportion": 1.0}, "val_proportion=1.0 is out of range"),
        ({"fewshot_k": 0}, "fewshot_k=0 is out of range"),
        ({"epochs": 0}, "epochs=0 is out of range"),
        ({"main_metric": "top3"}, r"main_metric='top3' is not one of its metrics \['top1', 'top5'"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LinearProbe("x", "owner/set", **kwargs)


def test_a_short_class_for_fewshot_is_named(world, module, tokenizer):
    callback = dp.probe(world.probe, fewshot_k=5)  # 5 per class in train, 1 of them held out for some
    with pytest.raises(ValueError, match=r"fewshot_k=5: class \d has only \d training samples"):
        quiet_trainer(callbacks=[callback]).validate(module, de.val_loader(tokenizer), verbose=False)


def test_val_split_replaces_the_held_out_part(world, module, tokenizer, tmp_path):
    root = Path(dp.write_probe_set(tmp_path / "set"))
    (root / "val").symlink_to(root / "test", target_is_directory=True)
    callback = dp.probe(str(root), val_split="val")
    seen = dp.record_features(callback)
    quiet_trainer(callbacks=[callback]).validate(module, de.val_loader(tokenizer), verbose=False)
    assert set(seen) == {"train", "val", "test"} and len(seen["train"][1]) == 25  # no part held out
