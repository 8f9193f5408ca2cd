"""Negatives across gradient accumulation: a step of K micro-batches (on R ranks) is the step of one
batch of K x R x B, in its loss and its gradients; ``accumulated_negatives=False`` is Lightning's own."""

import os
import subprocess
import sys

import pytest
import torch

import distributed_accumulation as runs
from superclip_pl.losses import classification_loss, contrastive_loss

HERE = os.path.dirname(__file__)


def run(
    tokenizer_dir, out_dir, mode: str, loss: str, negatives: bool = True, options: str = ""
) -> list[dict]:
    """States of `distributed_accumulation.py` (one per rank): in this process on one rank, else as a
    subprocess (Lightning's DDP launcher re-runs the script)."""
    out_dir.mkdir()
    ranks = 2 if mode in ("ddp", "fsdp2", "ddp_whole") else 1
    if ranks == 1:
        runs.main(tokenizer_dir, str(out_dir), mode, loss, negatives, options)
    else:
        script = os.path.join(HERE, "distributed_accumulation.py")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": HERE, "OMP_NUM_THREADS": "1"}
        args = [sys.executable, script, tokenizer_dir, str(out_dir), mode, loss, str(int(negatives)), options]
        subprocess.run(args, check=True, env=env, capture_output=True, timeout=300)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(ranks)]


def assert_same_step(state: dict, reference: dict) -> None:
    assert state["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert state["num_docs"] == reference["num_docs"] == 16  # every caption counted once
    torch.testing.assert_close(state["df"], reference["df"])
    assert set(state["grads"]) == set(reference["grads"])
    # atol: gradients that are 0 in exact arithmetic (the key biases: softmax ignores a constant) are
    # rounding noise of order 1e-10 in both
    top = max(g.abs().max().item() for g in reference["grads"].values())
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(
            state["grads"][name].reshape(grad.shape),
            grad,
            rtol=1e-5,
            atol=1e-6 * top,
            msg=lambda m, n=name: f"{n}: {m}",
        )


@pytest.mark.parametrize("loss", ["contrastive", "siglip"])
def test_four_micro_batches_are_one_step_of_sixteen(tmp_path, tokenizer_dir, loss):
    (whole,) = run(tokenizer_dir, tmp_path / "whole", "whole", loss)
    for mode in ("micro", "uneven"):  # 4 x 4, and 5 + 3 + 6 + 2
        (state,) = run(tokenizer_dir, tmp_path / mode, mode, loss)
        assert_same_step(state, whole)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "loss"), [("ddp", "contrastive"), ("ddp", "siglip"), ("fsdp2", "contrastive")]
)
def test_two_ranks_of_four_micro_batches_are_one_step_of_sixteen(tmp_path, tokenizer_dir, mode, loss):
    (whole,) = run(tokenizer_dir, tmp_path / "whole", "whole", loss)
    for state in run(tokenizer_dir, tmp_path / mode, mode, loss):  # 2 ranks x 4 micro-batches x 2
        assert_same_step(state, whole)


@pytest.mark.slow
def test_ddp_reduces_the_gradients_once_per_step(tmp_path, tokenizer_dir):
    """The first K - 1 re-encoded backward passes run under `no_sync`: as many bucket all-reduces for
    a step of 4 micro-batches as for a step of one batch."""
    accumulated = run(tokenizer_dir, tmp_path / "ddp", "ddp", "contrastive")
    whole = run(tokenizer_dir, tmp_path / "ddp_whole", "ddp_whole", "contrastive")
    assert [s["reductions"] for s in accumulated] == [s["reductions"] for s in whole]
    assert all(s["reductions"] >= 1 for s in whole)


def test_without_accumulated_negatives_each_micro_batch_has_its_own_loss(tmp_path, tokenizer_dir):
    """`accumulated_negatives=False`: Lightning's accumulation, the mean of the micro-batches' losses,
    each contrastive over its 4 pairs, each class loss with the IDF weights counted so far."""
    (state,) = run(tokenizer_dir, tmp_path / "plain", "micro", "contrastive", negatives=False)
    torch.manual_seed(0)
    module = runs.LitSuperCLIP(tokenizer_dir, backbone_config=runs.MICRO, warmup_steps=0)
    data = runs.pairs(module.tokenizer)
    for k in range(4):
        batch = {key: v[4 * k : 4 * k + 4] for key, v in data.items()}
        module.doc_freq.update(batch["input_ids"], module.ignore_ids)
        out = module.model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        con = contrastive_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])
        cls = classification_loss(
            out["vocab_logits"], batch["input_ids"], module.doc_freq.idf(), module.ignore_ids
        )
        ((con + cls) / 4).backward()
    top = max(p.grad.abs().max().item() for p in module.parameters())
    for name, p in module.named_parameters():
        torch.testing.assert_close(state["grads"][name], p.grad, rtol=1e-5, atol=1e-6 * top)
    assert state["loss"] == pytest.approx((con + cls).item(), rel=1e-5)  # logged: the last micro-batch's


def test_gradient_checkpointing_and_bf16_autocast_keep_the_step(tmp_path, tokenizer_dir):
    """Re-encoding under gradient checkpointing gives the same step; under bf16 autocast 4 x 4 and 16
    agree to bf16's precision (the embeddings' gradients are fp32, the matrix products bf16)."""
    (whole,) = run(tokenizer_dir, tmp_path / "whole", "whole", "contrastive")
    (state,) = run(tokenizer_dir, tmp_path / "ckpt", "micro", "contrastive", options="checkpointing")
    assert_same_step(state, whole)
    (whole,) = run(tokenizer_dir, tmp_path / "whole_bf16", "whole", "contrastive", options="bf16")
    (state,) = run(tokenizer_dir, tmp_path / "bf16", "micro", "contrastive", options="bf16,checkpointing")
    assert state["loss"] == pytest.approx(whole["loss"], rel=2e-2)
    flat = [
        torch.cat([s["grads"][n].flatten().float() for n in sorted(whole["grads"])]) for s in (state, whole)
    ]
    assert torch.nn.functional.cosine_similarity(*flat, dim=0) > 0.99


def test_gradient_clipping_applies_to_the_accumulated_step(tokenizer_dir):
    """Lightning clips only in automatic optimisation; the module clips its own accumulated step."""
    from lightning.pytorch import Callback
    from torch.utils.data import DataLoader

    from conftest import quiet_trainer

    norms = []

    class Norm(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            norms.append(
                torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in pl_module.parameters()]))
            )

    torch.manual_seed(0)
    module = runs.LitSuperCLIP(tokenizer_dir, backbone_config=runs.MICRO, warmup_steps=0)
    data = runs.pairs(module.tokenizer)
    trainer = quiet_trainer(
        max_steps=2, accumulate_grad_batches=2, gradient_clip_val=1e-3, callbacks=[Norm()]
    )
    trainer.fit(module, DataLoader(runs.MicroBatches(data, [4] * 4), batch_size=None))
    assert not module.automatic_optimization and trainer.global_step == 2
    assert len(norms) == 2 and all(n <= 1e-3 * (1 + 1e-4) for n in norms)
