"""What large runs rely on beyond the loss: FLOP/s per device, the logit-scale clamp after each
optimizer step, and the FSDP fragment's fp32 gradient reduction."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

import distributed_accumulation as runs
from conftest import MICRO, quiet_trainer
from superclip_pl.losses import contrastive_loss
from superclip_pl.model import MAX_LOGIT_SCALE
from superclip_pl.train.flops import training_step_flops
from superclip_pl.train.module import LitSuperCLIP

HERE = os.path.dirname(__file__)
CONFIGS = Path(HERE).parent / "configs"
BOUND = torch.tensor(MAX_LOGIT_SCALE).item()  # ln 100 as the float32 parameter holds it


@pytest.mark.slow
def test_two_ranks_log_one_devices_flops_per_second(tmp_path, tokenizer_dir):
    """Lightning's Throughput multiplies the FLOPs it is given by the world size for the global figure:
    given one rank's FLOPs per batch, `device/flops_per_sec` / `device/batches_per_sec` is exactly
    that count, and the global `flops_per_sec` is twice the device's."""
    script = os.path.join(HERE, "distributed_accumulation.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": HERE, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, script, tokenizer_dir, str(tmp_path), "throughput", "contrastive"]
    subprocess.run(args, check=True, env=env, capture_output=True, timeout=300)
    with open(tmp_path / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["train/device/flops_per_sec"]]
    config = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO).model.config
    per_rank = training_step_flops(config, True, 4, 12)  # a rank's batch: 4 pairs of 12 tokens
    assert len(rows) >= 3
    for r in rows:
        device = float(r["train/device/flops_per_sec"])
        assert device / float(r["train/device/batches_per_sec"]) == pytest.approx(per_rank, rel=1e-9)
        assert float(r["train/flops_per_sec"]) == pytest.approx(2 * device, rel=1e-9)


class PushLogitScale(Callback):
    """Replaces the logit scale's gradient before each optimizer step: -1 (asks up) for the first
    `up` steps, +1 (asks down) afterwards; records the parameter after every batch."""

    def __init__(self, up: int):
        self.up, self.values, self.steps = up, [], 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        pl_module.model.clip.logit_scale.grad.fill_(-1.0 if self.steps < self.up else 1.0)
        self.steps += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(pl_module.model.clip.logit_scale.item())


@pytest.mark.parametrize("accumulate", [1, 2])  # Lightning's optimisation, and the module's own
def test_logit_scale_is_clamped_after_each_step_and_can_come_back(tokenizer_dir, accumulate):
    torch.manual_seed(0)
    module = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, lr=0.05, warmup_steps=0, min_lr_ratio=1.0)
    with torch.no_grad():
        module.model.clip.logit_scale.fill_(MAX_LOGIT_SCALE - 0.01)
    push = PushLogitScale(up=2)
    data = runs.pairs(module.tokenizer)
    trainer = quiet_trainer(max_steps=10, accumulate_grad_batches=accumulate, callbacks=[push])
    trainer.fit(module, DataLoader(runs.MicroBatches(data, [4] * 4, repeat=5), batch_size=None))
    assert trainer.global_step == 10
    stepped = push.values[accumulate - 1 :: accumulate]  # after each optimizer step
    assert max(push.values) <= BOUND
    assert stepped[:2] == [BOUND] * 2  # held at the bound
    # and back down once AdamW's momentum turns
    assert stepped[-1] < stepped[-2] < stepped[-3] and stepped[-1] < BOUND - 0.01


def test_the_logit_scale_has_a_gradient_at_the_bound(tokenizer_dir):
    """The forward pass does not clamp: at ln 100 the loss still moves the scale (a clamp in the
    forward pass gives 0 there, and the scale could never come down)."""
    torch.manual_seed(0)
    module = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO)
    with torch.no_grad():
        module.model.clip.logit_scale.fill_(MAX_LOGIT_SCALE)
    data = runs.pairs(module.tokenizer)
    out = module.model(data["pixel_values"], data["input_ids"], data["attention_mask"])
    assert out["logit_scale"].item() == pytest.approx(100.0)
    contrastive_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"]).backward()
    assert module.model.clip.logit_scale.grad.abs().item() > 0


def test_fsdp_fragment_reduces_gradients_and_keeps_parameters_in_fp32():
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy

    fragment = yaml.safe_load((CONFIGS / "trainer" / "fsdp.yaml").read_text())["trainer"]
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=FSDPStrategy)
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": fragment["strategy"]})).strategy
    assert fragment["precision"] == "bf16-mixed"  # the autocast
    # the strategy's MixedPrecision wins over the one Lightning derives from bf16-mixed (all bf16)
    config = strategy.mixed_precision_config
    assert (config.param_dtype, config.reduce_dtype, config.buffer_dtype) == (torch.float32,) * 3
    assert math.isclose(
        torch.tensor(MAX_LOGIT_SCALE, dtype=config.param_dtype).exp().item(), 100, rel_tol=1e-6
    )
