"""``EMA``: the average after k steps is the closed form, evaluations see it whatever the callbacks' order,
checkpoints hold both weights, a resumed fit continues both, export writes either."""

import types

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from conftest import MICRO, quiet_trainer
from superclip_pl.cli.main import main
from superclip_pl.eval.evaluation import averaged_weights
from superclip_pl.train.ema import EMA
from superclip_pl.train.module import LitSuperCLIP

DECAY = 0.5  # large steps of the average, so that a wrong weighting shows


class Record(Callback):
    """The trainable weights after every optimizer step, and the weights each validation sees."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []
        self.validated: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.steps.append(trainable(pl_module))

    def on_validation_epoch_end(self, trainer, pl_module):
        self.validated.append(trainable(pl_module))


class StepEvaluation(Callback):
    """What an evaluation during training (``every_n_steps``) sees at step 2, and the weights after it."""

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == 2:
            with averaged_weights(trainer, pl_module, in_training=True):
                self.inside = trainable(pl_module)
            self.after = trainable(pl_module)


def trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def closed_form(steps: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """EMA_k = d^(k-1) x_1 + sum_{i=2..k} (1 - d) d^(k-i) x_i (the first update copies x_1)."""
    k = len(steps)
    later = lambda n: sum((1 - decay) * decay ** (k - i) * steps[i - 1][n] for i in range(2, k + 1))  # noqa: E731
    return {n: decay ** (k - 1) * steps[0][n] + later(n) for n in steps[0]}


def module(tokenizer_dir) -> LitSuperCLIP:
    torch.manual_seed(0)
    # constant: a run of 2 steps resumed to 4 has the rates of a run of 4
    kwargs = dict(backbone_config=MICRO, warmup_steps=0, lr_schedule="constant", lock_text=True, lr=1e-2)
    return LitSuperCLIP(tokenizer_dir, **kwargs)


def test_the_average_after_k_steps_is_the_closed_form_and_evaluations_see_it(tokenizer_dir, batch, tmp_path):
    lit, record, ema = module(tokenizer_dir), Record(), EMA(decay=DECAY)
    frozen = {n: p.detach().clone() for n, p in lit.named_parameters() if not p.requires_grad}
    # the recorder before EMA: Lightning's EMAWeightAveraging would have swapped back when it evaluates
    validation = dict(val_check_interval=4, limit_val_batches=1, num_sanity_val_steps=0)
    during = StepEvaluation()
    trainer = quiet_trainer(max_steps=4, callbacks=[record, ema, during], **validation)
    trainer.fit(lit, DataLoader([batch] * 4, batch_size=None), DataLoader([batch], batch_size=None))
    expected = closed_form(record.steps, DECAY)
    assert len(record.steps) == 4 and ema.updates == 4
    for n, value in expected.items():
        torch.testing.assert_close(record.validated[0][n], value, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(trainable(lit)[n], value, rtol=1e-6, atol=1e-7)  # after fit: the average
    for n, value in closed_form(record.steps[:2], DECAY).items():
        torch.testing.assert_close(during.inside[n], value, rtol=1e-6, atol=1e-7)
        assert torch.equal(during.after[n], record.steps[1][n])  # and the raw weights back after it
    assert set(ema.names) == set(expected)  # the locked text tower is not copied
    for n, p in lit.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    # the checkpoint: the average in state_dict, the raw weights (the last step's) beside it
    trainer.save_checkpoint(tmp_path / "ema.ckpt")
    ckpt = torch.load(tmp_path / "ema.ckpt", weights_only=True)
    for n, value in expected.items():
        torch.testing.assert_close(ckpt["state_dict"][n], value, rtol=1e-6, atol=1e-7)
        assert torch.equal(ckpt["current_model_state"][n], record.steps[-1][n])
    assert torch.equal(ckpt["state_dict"]["doc_freq.df"], ckpt["current_model_state"]["doc_freq.df"])
    # export writes the average by default, the raw weights with --weights raw
    for weights, source in (("averaged", "state_dict"), ("raw", "current_model_state")):
        out = tmp_path / weights
        args = ["export", "--ckpt_path", str(tmp_path / "ema.ckpt"), "--output_dir", str(out)]
        assert main([*args, "--weights", weights]) == 0
        exported = load_file(out / "model.safetensors")
        key = "vision_model.encoder.layers.1.mlp.fc1.weight"
        assert torch.equal(exported[key], ckpt[source]["model.clip." + key]), weights


def test_a_resumed_fit_continues_the_raw_weights_and_the_average(tokenizer_dir, batch, tmp_path):
    whole, whole_ema = module(tokenizer_dir), EMA(decay=DECAY)
    quiet_trainer(max_steps=4, callbacks=[whole_ema]).fit(whole, DataLoader([batch] * 4, batch_size=None))
    first, ema = module(tokenizer_dir), EMA(decay=DECAY)
    trainer = quiet_trainer(max_steps=2, callbacks=[ema])
    trainer.fit(first, DataLoader([batch] * 2, batch_size=None))
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    second, resumed = module(tokenizer_dir), EMA(decay=DECAY)
    trainer = quiet_trainer(max_steps=4, callbacks=[resumed])
    trainer.fit(second, DataLoader([batch] * 2, batch_size=None), ckpt_path=tmp_path / "half.ckpt")
    assert resumed.updates == 4
    for n, value in trainable(whole).items():  # both hold the average after fit, the raw ones in the callback
        torch.testing.assert_close(trainable(second)[n], value, rtol=1e-6, atol=1e-7)
    for mine, theirs in zip(resumed.average, whole_ema.average, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)


def test_sharded_training_is_refused_in_one_line():
    trainer = types.SimpleNamespace(strategy=ModelParallelStrategy.__new__(ModelParallelStrategy))
    with pytest.raises(ValueError, match="EMA does not support sharded training"):
        EMA().setup(trainer, None, "fit")
    with pytest.raises(ValueError, match=r"decay=1 must be in \[0, 1\)"):
        EMA(decay=1)
