"""Locked towers (LiT) and SuperClass (``contrastive_loss_weight`` 0): what is locked never moves and has
no optimizer state, the rest trains, and a class-only run never runs the text tower."""

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import MICRO, quiet_trainer
from superclip_pl.train.module import LitSuperCLIP
from superclip_pl.train.towers import tower_groups


def fit(module: LitSuperCLIP, batch: dict, steps: int = 2, **trainer_kwargs):
    trainer = quiet_trainer(max_steps=steps, **trainer_kwargs)
    trainer.fit(
        module,
        DataLoader([batch] * steps * trainer_kwargs.get("accumulate_grad_batches", 1), batch_size=None),
    )
    return trainer


def snapshot(module: LitSuperCLIP) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def names(module: LitSuperCLIP, tower: str, groups: slice) -> set[str]:
    ids = {id(p) for _, params in tower_groups(module.model, tower)[groups] for p in params}
    return {n for n, p in module.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_locked_parameters_never_move_and_have_no_optimizer_state(tokenizer_dir, batch, accumulate):
    # image: all but the top 2 groups (projection; last block + post LayerNorm); text: all of it
    torch.manual_seed(0)
    module = LitSuperCLIP(
        tokenizer_dir,
        backbone_config=MICRO,
        lock_image=True,
        lock_image_unlocked_layers=2,
        lock_text=True,
        warmup_steps=0,
        weight_decay=0.5,  # weight decay alone would move a locked matrix held by the optimizer
    )
    before = snapshot(module)
    trainer = fit(module, batch, accumulate_grad_batches=accumulate)
    after = snapshot(module)
    locked = names(module, "vision", slice(0, -2)) | names(module, "text", slice(None))
    trainable = names(module, "vision", slice(-2, None)) | {n for n in before if n.startswith("model.head.")}
    trainable |= {"model.clip.logit_scale"}
    assert locked and trainable and not locked & trainable
    assert locked | trainable == set(before)  # every parameter is one or the other
    for n in locked:
        assert torch.equal(before[n], after[n]), n  # bit for bit
        assert not dict(module.named_parameters())[n].requires_grad
    assert all(not torch.equal(before[n], after[n]) for n in trainable)  # the head trains too
    optimizer = trainer.optimizers[0]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    params = dict(module.named_parameters())
    assert {n for n in params if id(params[n]) in in_optimizer} == trainable
    assert all(id(p) in in_optimizer for p in optimizer.state)


def test_unlocked_layers_count_as_open_clip_counts_them(tokenizer_dir):
    module = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, lock_image=True, lock_image_unlocked_layers=1)
    vision = module.model.clip.vision_model
    assert [n for n, p in module.model.clip.named_parameters() if p.requires_grad and "vision" in n] == []
    assert module.model.clip.visual_projection.weight.requires_grad  # 1: the projection alone
    assert not any(p.requires_grad for p in vision.post_layernorm.parameters())
    assert module.model.clip.text_model.embeddings.token_embedding.weight.requires_grad  # text not locked
    with pytest.raises(ValueError, match=r"lock_text_unlocked_layers=1 needs model.lock_text true"):
        LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, lock_text_unlocked_layers=1)
    with pytest.raises(ValueError, match=r"lock_image_unlocked_layers=5 must be between 0"):
        LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, lock_image=True, lock_image_unlocked_layers=5)


def test_superclass_trains_the_image_tower_alone_and_never_runs_the_text_tower(tokenizer_dir, batch):
    torch.manual_seed(0)
    module = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, contrastive_loss_weight=0.0, warmup_steps=0)

    def refuse(*args, **kwargs):
        raise AssertionError("the text tower ran")

    module.model.clip.text_model.forward = refuse
    before = snapshot(module)
    trainer = fit(module, batch)
    after = snapshot(module)
    unused = ("model.clip.text_", "model.clip.visual_projection", "model.clip.logit_scale")
    for n in before:
        moved = not torch.equal(before[n], after[n])
        assert moved != n.startswith(unused), n
    metrics = trainer.callback_metrics
    assert "train/contrastive_loss" not in metrics
    assert float(metrics["train/loss"]) == pytest.approx(float(metrics["train/class_loss"]))
    with pytest.raises(ValueError, match="trains nothing"):
        LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, contrastive_loss_weight=0.0, class_loss_weight=0.0)


def test_a_weighted_contrastive_loss_scales_its_term(tokenizer_dir, batch):
    torch.manual_seed(0)
    module = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, contrastive_loss_weight=0.25).eval()
    module.doc_freq.update(batch["input_ids"], module.ignore_ids)
    with torch.no_grad():
        terms = module.compute_losses(batch, gather=False)
    expected = 0.25 * terms["contrastive_loss"] + terms["class_loss"]
    torch.testing.assert_close(terms["loss"], expected)


@pytest.mark.slow
def test_locked_towers_under_ddp_and_fsdp2_with_negatives_across_accumulation(tmp_path, tokenizer_dir):
    """2 ranks x 4 micro-batches (DDP, FSDP2) against one batch of 16 on one process, towers locked:
    the locked parameters get no gradient anywhere, the others the gradients of the whole batch."""
    from test_accumulation import run

    (whole,) = run(tokenizer_dir, tmp_path / "whole", "whole", "contrastive", options="locked")
    locked = {n for n, g in whole["grads"].items() if g is None}
    assert locked and any(n.startswith("model.clip.vision_model.encoder.layers.0.") for n in locked)
    top = max(g.abs().max().item() for g in whole["grads"].values() if g is not None)
    for mode in ("ddp", "fsdp2"):
        for state in run(tokenizer_dir, tmp_path / mode, mode, "contrastive", options="locked"):
            assert state["loss"] == pytest.approx(whole["loss"], rel=1e-5)
            assert {n for n, g in state["grads"].items() if g is None} == locked, mode
            for name, grad in whole["grads"].items():
                if grad is not None:
                    got, where = state["grads"][name].reshape(grad.shape), lambda m, n=name: f"{n}: {m}"
                    torch.testing.assert_close(got, grad, rtol=1e-5, atol=1e-6 * top, msg=where)
