"""LitSuperCLIP: learning, counting, checkpointing, optimisation groups and distributed equivalence."""

import math
import os
import subprocess
import sys

import pytest
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader, IterableDataset

from conftest import MICRO, quiet_trainer
from superclip_pl.losses import DocumentFrequency
from superclip_pl.train.module import LitSuperCLIP, param_groups, warmup_cosine

HERE = os.path.dirname(__file__)


class Batches(IterableDataset):
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        yield from self.batches


class LossHistory(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_overfits_one_fixed_batch(tokenizer_dir, batch, weight):
    torch.manual_seed(0)
    module = LitSuperCLIP(
        tokenizer_dir,
        backbone_config=MICRO,
        class_loss_weight=weight,
        lr=2e-3,
        warmup_steps=5,
        weight_decay=0.0,
    )
    history = LossHistory()
    quiet_trainer(max_steps=40, callbacks=[history]).fit(
        module, DataLoader(Batches([batch] * 40), batch_size=None)
    )
    first, last = history.losses[0], history.losses[-1]
    assert math.isfinite(last)
    assert last < 0.5 * first, f"loss {first:.3f} -> {last:.3f}"
    assert (module.doc_freq is None) == (weight == 0.0)  # plain CLIP spends nothing on the head
    assert (module.model.head is None) == (weight == 0.0)


def test_siglip_option_learns(tokenizer_dir, batch):
    torch.manual_seed(0)
    module = LitSuperCLIP(
        tokenizer_dir, backbone_config=MICRO, loss="siglip", lr=2e-3, warmup_steps=5, weight_decay=0.0
    )
    assert module.model.logit_bias is not None
    history = LossHistory()
    quiet_trainer(max_steps=30, callbacks=[history]).fit(
        module, DataLoader(Batches([batch] * 30), batch_size=None)
    )
    assert history.losses[-1] < 0.5 * history.losses[0]


def distinct_batches(tokenizer, n: int, size: int = 4):
    words = ["red", "green", "blue", "circle", "square", "star", "left", "big", "small", "photo"]
    g = torch.Generator().manual_seed(0)
    out, captions = [], []
    for i in range(n):
        caps = [
            " ".join(words[(i * 7 + j * 3 + k) % 10] for k in range(1 + (i + j) % 5)) for j in range(size)
        ]
        enc = tokenizer(caps, padding="longest", return_tensors="pt")
        out.append({"pixel_values": torch.randn(size, 3, 16, 16, generator=g), **enc})
        captions += enc["input_ids"].tolist()
    return out, captions


def hand_counts(captions, ignore, vocab):
    df = torch.zeros(vocab, dtype=torch.long)
    for row in captions:
        for t in set(row) - set(ignore):
            df[t] += 1
    return df


def test_document_counts_with_gradient_accumulation_count_each_caption_once(tokenizer_dir, tokenizer):
    torch.manual_seed(0)
    module = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, warmup_steps=0)
    batches, captions = distinct_batches(tokenizer, 6)
    trainer = quiet_trainer(max_steps=3, accumulate_grad_batches=2)
    trainer.fit(module, DataLoader(Batches(batches), batch_size=None))
    assert trainer.global_step == 3
    assert int(module.doc_freq.num_docs) == len(captions) == 24
    assert int(module.samples_seen) == 24
    torch.testing.assert_close(
        module.doc_freq.df, hand_counts(captions, module.ignore_ids, module.model.vocab_size)
    )


def test_document_counts_round_trip_through_a_checkpoint(tmp_path, tokenizer_dir, tokenizer):
    torch.manual_seed(0)
    module = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, warmup_steps=0)
    batches, captions = distinct_batches(tokenizer, 6)
    trainer = quiet_trainer(max_steps=3, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(Batches(batches[:3]), batch_size=None))
    ckpt = tmp_path / "three.ckpt"
    trainer.save_checkpoint(ckpt)
    restored = LitSuperCLIP.load_from_checkpoint(ckpt)
    torch.testing.assert_close(restored.doc_freq.df, module.doc_freq.df)
    assert int(restored.doc_freq.num_docs) == 12
    # resuming the fit continues the counts from the checkpoint
    resumed = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, warmup_steps=0)
    quiet_trainer(max_steps=6, default_root_dir=tmp_path).fit(
        resumed, DataLoader(Batches(batches[3:]), batch_size=None), ckpt_path=ckpt
    )
    torch.testing.assert_close(
        resumed.doc_freq.df, hand_counts(captions, resumed.ignore_ids, resumed.model.vocab_size)
    )
    assert int(resumed.doc_freq.num_docs) == 24


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 100) == pytest.approx(0.0)


def test_no_weight_decay_on_biases_norms_and_logit_scale(tokenizer_dir):
    module = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, loss="siglip")
    decay, no_decay = param_groups(module, 0.2)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    named = {id(p): n for n, p in module.named_parameters()}
    no_decay_names = {named[id(p)] for p in no_decay["params"]}
    decay_names = {named[id(p)] for p in decay["params"]}
    assert "model.clip.logit_scale" in no_decay_names and "model.logit_bias" in no_decay_names
    assert all(n.endswith(("bias", "logit_scale", "class_embedding")) or "norm" in n for n in no_decay_names)
    assert "model.head.proj.weight" in decay_names and "model.head.norm.weight" in no_decay_names
    assert len(decay_names) + len(no_decay_names) == sum(1 for _ in module.parameters())


def test_bad_arguments_fail_clearly(tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match="class_loss_weight=-1"):
        LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, class_loss_weight=-1)
    with pytest.raises(ValueError, match="max_length=100 exceeds"):
        LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, max_length=100)
    with pytest.raises(ValueError, match="cannot load tokenizer .*no_such_dir"):
        LitSuperCLIP(str(tmp_path / "no_such_dir"))


def run_step(tokenizer_dir, out_dir, mode, weight):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": HERE}
    subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "distributed_step.py"),
            tokenizer_dir,
            str(out_dir),
            mode,
            str(weight),
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(1 if mode == "single" else 2)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_on_halves_equal_one_process_on_the_whole_batch(tmp_path, tokenizer_dir, mode):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (single,) = run_step(tokenizer_dir, tmp_path / "one", "single", 1.0)
    ranks = run_step(tokenizer_dir, tmp_path / "two", mode, 1.0)
    for state in ranks:
        # the logged loss is the mean over ranks of the local losses = the loss of the global batch
        assert state["loss"] == pytest.approx(single["loss"], rel=1e-6)
        assert state["num_docs"] == single["num_docs"] == 8
        torch.testing.assert_close(state["df"], single["df"])  # global counts on every rank
        assert set(state["grads"]) == set(single["grads"])
        for name, grad in single["grads"].items():
            torch.testing.assert_close(
                state["grads"][name].reshape(grad.shape),
                grad,
                rtol=1e-4,
                atol=1e-6,
                msg=lambda m, n=name: f"{n}: {m}",
            )


def test_document_frequency_is_a_checkpointed_buffer(tokenizer_dir):
    module = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO)
    assert isinstance(module.doc_freq, DocumentFrequency)
    keys = module.state_dict().keys()
    assert {"doc_freq.df", "doc_freq.num_docs", "samples_seen"} <= set(keys)


def test_training_step_flops_count_the_head_as_its_linear_layer(tokenizer_dir):
    from superclip_pl.train.flops import training_step_flops

    config = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO).model.config
    batch, length = 4, 16
    with_head = training_step_flops(config, True, batch, length)
    without = training_step_flops(config, False, batch, length)
    width, vocab = config.vision_config.hidden_size, config.text_config.vocab_size
    # the head's Linear(width -> vocab): 2BWV forward, 2BWV for the input's and 2BWV for the weight's grad
    assert with_head - without == 6 * batch * width * vocab
    assert without > 6 * batch * width * width  # the towers are counted too, forward and backward


def test_throughput_monitor_logs_model_flops_per_second(tmp_path, tokenizer_dir, batch):
    import csv

    from lightning.pytorch.callbacks import ThroughputMonitor
    from lightning.pytorch.loggers import CSVLogger

    from superclip_pl.train.flops import training_step_flops
    from superclip_pl.train.module import batch_size

    module = LitSuperCLIP(tokenizer_dir, backbone_config=MICRO, warmup_steps=0)
    monitor = ThroughputMonitor(batch_size_fn=batch_size, window_size=2)
    trainer = quiet_trainer(max_steps=4, callbacks=[monitor], logger=CSVLogger(tmp_path), log_every_n_steps=1)
    trainer.fit(module, DataLoader(Batches([batch] * 4), batch_size=None))
    expected = training_step_flops(module.model.config, True, *batch["input_ids"].shape)
    assert module.flops_per_batch == expected
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/device/flops_per_sec")]
    assert rows and all(float(r["train/device/flops_per_sec"]) > 0 for r in rows)
    assert all(float(r["train/device/samples_per_sec"]) > 0 for r in rows)
