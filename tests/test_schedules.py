"""Layer-wise learning-rate decay (each parameter's rate by its depth) and the schedules' curves."""

import pytest
from torch.utils.data import DataLoader

from conftest import MICRO, quiet_trainer
from superclip_pl.train.module import LitSuperCLIP
from superclip_pl.train.schedules import constant_cooldown, lr_multiplier

# MICRO: 2 blocks per tower. Depth from the output: projection 0, block 1 (+ final LayerNorm) 1,
# block 0 2, embeddings 3 (timm's and open_clip's numbering)
VISION_DEPTH = {
    "visual_projection.": 0,
    "vision_model.post_layernorm.": 1,
    "vision_model.encoder.layers.1.": 1,
    "vision_model.encoder.layers.0.": 2,
    "vision_model.embeddings.": 3,
    "vision_model.pre_layrnorm.": 3,
}
TEXT_DEPTH = {
    "text_projection.": 0,
    "text_model.final_layer_norm.": 1,
    "text_model.encoder.layers.1.": 1,
    "text_model.encoder.layers.0.": 2,
    "text_model.embeddings.": 3,
}


def expected_lr(name: str, lr: float, image: float, text: float) -> float:
    name = name.removeprefix("model.clip.")
    for table, decay in ((VISION_DEPTH, image), (TEXT_DEPTH, text)):
        for prefix, depth in table.items():
            if name.startswith(prefix):
                return lr * decay**depth
    return lr  # the head, the logit scale


def test_layer_decay_gives_each_parameter_the_lr_of_its_depth(tokenizer_dir, batch):
    module = LitSuperCLIP(
        tokenizer_dir,
        backbone_config=MICRO,
        lr=1e-3,
        warmup_steps=0,
        lr_schedule="constant",
        image_layer_decay=0.5,
        text_layer_decay=0.8,
        lock_text=True,
        lock_text_unlocked_layers=2,  # locked parameters stay out of every group
    )
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module, DataLoader([batch], batch_size=None))
    rate = {id(p): g["lr"] for g in trainer.optimizers[0].param_groups for p in g["params"]}
    seen = set()
    for name, p in module.named_parameters():
        if not p.requires_grad:
            assert id(p) not in rate, name
            continue
        assert rate[id(p)] == pytest.approx(expected_lr(name, 1e-3, 0.5, 0.8)), name
        seen.add(expected_lr(name, 1e-3, 0.5, 0.8))
    assert sorted(seen) == pytest.approx([1e-3 * 0.5**3, 1e-3 * 0.5**2, 1e-3 * 0.5, 1e-3 * 0.8, 1e-3])
    groups = trainer.optimizers[0].param_groups
    assert groups[0]["lr"] == pytest.approx(1e-3)  # the full rate first: it is what train/lr logs
    # weight decay still on matrices only, whatever the rate
    assert all((g["weight_decay"] > 0) == all(p.ndim >= 2 for p in g["params"]) for g in groups)
    with pytest.raises(ValueError, match=r"image_layer_decay=1.5 must be in \(0, 1\]"):
        LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, image_layer_decay=1.5)


def test_constant_cooldown_curve_is_open_clips():
    # open_clip_train/scheduler.py const_lr_cooldown: warm-up (step + 1) / warmup, constant, then
    # (1 - e / es) ** power of the way from the peak down to the end value
    warmup, total, cooldown = 10, 100, 20
    curve = [constant_cooldown(s, warmup, total, cooldown) for s in range(total + 1)]
    assert curve[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert curve[10:80] == [1.0] * 70
    assert curve[80:] == pytest.approx([1 - e / 20 for e in range(21)])
    squared = [constant_cooldown(s, warmup, total, cooldown, min_ratio=0.1, power=2.0) for s in (80, 90, 100)]
    assert squared == pytest.approx([1.0, 0.1 + 0.9 * 0.25, 0.1])
    assert [lr_multiplier("constant", s, 10, 100) for s in (0, 9, 10, 10_000)] == pytest.approx(
        [0.1, 1, 1, 1]
    )
    cosine = [lr_multiplier("cosine", s, 10, 100) for s in (9, 55, 100)]
    assert cosine == pytest.approx([1.0, 0.5, 0.0])


def test_a_constant_run_extended_and_cooled_down_takes_the_new_end(tokenizer_dir, batch, tmp_path):
    """A `constant` run resumed with `constant_cooldown` and a later max_steps: the rate stays at the peak
    until the cool-down, which ends at the new max_steps."""
    kwargs = dict(backbone_config=MICRO, lr=1e-3, warmup_steps=2)
    first = LitSuperCLIP(tokenizer_dir, lr_schedule="constant", **kwargs)
    trainer = quiet_trainer(max_steps=4)
    trainer.fit(first, DataLoader([batch] * 4, batch_size=None))
    trainer.save_checkpoint(tmp_path / "constant.ckpt")
    second = LitSuperCLIP(tokenizer_dir, lr_schedule="constant_cooldown", cooldown_steps=4, **kwargs)
    rates = []

    from lightning.pytorch import Callback

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = quiet_trainer(max_steps=10, callbacks=[Record()])
    trainer.fit(second, DataLoader([batch] * 6, batch_size=None), ckpt_path=tmp_path / "constant.ckpt")
    # steps 4..9: constant through step 5, then the last 4 steps (6..9) come down linearly to 0
    assert rates == pytest.approx([1e-3, 1e-3, 1e-3, 0.75e-3, 0.5e-3, 0.25e-3])
    with pytest.raises(ValueError, match="constant_cooldown needs model.cooldown_steps"):
        LitSuperCLIP(tokenizer_dir, lr_schedule="constant_cooldown", **kwargs)
