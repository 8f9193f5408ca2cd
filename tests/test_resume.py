"""Exact resume of the training stream: from a loader state, and through a Lightning checkpoint."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

from shards import IMAGE_SIZE, caption_of, image_of, loader, png, wds, write_shards
from superclip_pl.data import DataSource, ImageTextDataModule
from superclip_pl.data import datamodule as data_module
from superclip_pl.data.build import image_text_stream
from superclip_pl.data.decode import Collate
from superclip_pl.data.loader import StreamLoader, resume_mismatch
from superclip_pl.errors import BadDataStop
from superclip_pl.tokenizer import load_tokenizer


def take(loader_: StreamLoader, n: int) -> list[dict]:
    batches = iter(loader_)
    return [next(batches) for _ in range(n)]


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def skips_of(batches: list[dict]) -> Counter:
    return sum((Counter(b["skipped"]) for b in batches), Counter())


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_continues_exactly_where_the_state_was_taken(bad_shards, tokenizer_dir, num_workers):
    pattern, _ = bad_shards

    def fresh() -> StreamLoader:
        stream = image_text_stream(
            wds(pattern), image_size=IMAGE_SIZE, shuffle_buffer=5, seed=3, max_image_pixels=4096
        )
        return loader(stream, tokenizer_dir, num_workers=num_workers, batch_size=3)

    full = take(fresh(), 20)  # 60 samples: four passes over the 14 good ones, shuffled, with bad ones
    assert len(set(keys_of(full[:4]))) == 12  # a pass has no repeats
    for k in (3, 8):
        first = fresh()
        before = take(first, k)
        second = fresh()
        second.load_state_dict(first.state_dict())
        after = take(second, 20 - k)
        assert keys_of(before + after) == keys_of(full)  # same samples, same order: none repeated or lost
        assert skips_of(before + after) == skips_of(full)
        # and the same random crops: drawn from the stream's seeded RNG, not a worker's global one
        pixels = [b["pixel_values"] for b in before + after]
        assert all(torch.equal(a, b["pixel_values"]) for a, b in zip(pixels, full, strict=True))


def test_resume_is_exact_across_an_unreadable_parquet_file(tmp_path, tokenizer_dir):
    for f in range(4):
        rows = range(f * 7, f * 7 + 7)
        table = pa.table(
            {
                "image": [{"bytes": png(image_of(i)), "path": None} for i in rows],
                "caption": [caption_of(i) for i in rows],
                "key": [f"k{i}" for i in rows],
            }
        )
        pq.write_table(table, tmp_path / f"part-{f}.parquet", row_group_size=3)
    broken = (tmp_path / "part-2.parquet").read_bytes()
    (tmp_path / "part-2.parquet").write_bytes(broken[: len(broken) // 2])
    source = DataSource(path="parquet", data_files=str(tmp_path / "*.parquet"))

    def fresh() -> StreamLoader:
        stream = image_text_stream(source, image_size=IMAGE_SIZE, shuffle_buffer=4, seed=1)
        return loader(stream, tokenizer_dir, batch_size=3)

    full = take(fresh(), 14)  # two passes over the 21 readable rows
    assert sorted(set(keys_of(full)), key=lambda k: int(k[1:])) == [
        f"k{i}" for i in [*range(14), *range(21, 28)]
    ]
    assert skips_of(full) == {"truncated_shard": 2}
    for k in range(1, 14):
        first = fresh()
        before = take(first, k)
        second = fresh()
        second.load_state_dict(first.state_dict())
        after = take(second, 14 - k)
        assert keys_of(before + after) == keys_of(full) and skips_of(before + after) == skips_of(full)


@pytest.mark.parametrize("shuffle_buffer", [0, 4])
def test_resume_at_the_end_of_an_epoch_goes_on_with_the_next(tmp_path, tokenizer_dir, shuffle_buffer):
    write_shards(tmp_path, num_shards=1, per_shard=4)

    def fresh() -> StreamLoader:
        stream = image_text_stream(
            wds(str(tmp_path / "*.tar")), image_size=IMAGE_SIZE, shuffle_buffer=shuffle_buffer
        )
        return loader(stream, tokenizer_dir, batch_size=4)

    full = take(fresh(), 3)
    first = fresh()
    before = take(first, 1)  # exactly one epoch
    second = fresh()
    second.load_state_dict(first.state_dict())
    assert keys_of(before + take(second, 2)) == keys_of(full)


def test_loader_state_can_follow_consumption_instead_of_production(good_shards, tokenizer_dir):
    pattern, _ = good_shards

    def fresh(track: bool) -> StreamLoader:
        stream = image_text_stream(wds(pattern), image_size=IMAGE_SIZE, shuffle_buffer=5)
        return StreamLoader(
            stream, batch_size=2, collate_fn=Collate(load_tokenizer(tokenizer_dir)), track_consumed=track
        )

    full = take(fresh(False), 5)
    ahead = fresh(True)
    produced = take(ahead, 3)  # like Lightning's fetcher: one batch more than trained on
    ahead.mark_consumed()
    ahead.mark_consumed()
    resumed = fresh(False)
    resumed.load_state_dict(ahead.state_dict())
    assert keys_of(produced[:2] + take(resumed, 3)) == keys_of(full)
    other_rank = fresh(False)
    other_rank.load_state_dict({**ahead.state_dict(), "rank": 1})  # not ours: ignored
    assert keys_of(take(other_rank, 1)) == keys_of(full[:1])


# ---------------------------------------------------------------- through Lightning


class TinyModel(L.LightningModule):
    def __init__(self, estimate_steps: bool = False) -> None:
        super().__init__()
        self.layer, self.estimate_steps = torch.nn.Linear(3, 1), estimate_steps

    def training_step(self, batch, batch_idx):
        return self.layer(batch["pixel_values"].mean((2, 3))).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        loss = self.layer(batch["pixel_values"].mean((2, 3))).pow(2).mean()
        self.log("val/loss", loss, batch_size=len(batch["keys"]))

    def configure_optimizers(self):
        if self.estimate_steps:  # loads the train dataloader before the checkpoint is restored
            assert self.trainer.estimated_stepping_batches == self.trainer.max_steps
        return torch.optim.SGD(self.parameters(), lr=0.01)


class KeysSeen(L.Callback):
    def __init__(self) -> None:
        self.keys: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys += batch["keys"]


class Captured(Logger):
    name, version = "captured", 0

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def data(train: str | None, tokenizer_dir: str, **overrides) -> ImageTextDataModule:
    settings = dict(
        tokenizer=tokenizer_dir,
        train=wds(train) if train else None,
        batch_size=3,
        num_workers=2,
        image_size=IMAGE_SIZE,
        max_length=16,
        shuffle_buffer=5,
        seed=1,
        max_skip_fraction=1.0,
        max_image_pixels=4096,
    )
    return ImageTextDataModule(**{**settings, **overrides})


def fit(tmp_path, dm, max_steps, ckpt_path=None, save_every=None, estimate_steps=False):
    keys, logger = KeysSeen(), Captured()
    callbacks = [keys]
    if save_every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=save_every, save_top_k=-1))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=1 if estimate_steps else None,
        val_check_interval=4,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=2,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=bool(save_every),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(TinyModel(estimate_steps), datamodule=dm, ckpt_path=ckpt_path)
    return keys.keys, logger.metrics


@pytest.mark.slow
@pytest.mark.parametrize("estimate_steps", [False, True])
def test_fit_stops_and_resumes_exactly_from_a_checkpoint(
    tmp_path, bad_shards, good_shards, tokenizer_dir, estimate_steps
):
    pattern, _ = bad_shards
    val = wds(good_shards[0])
    full_dm = data(pattern, tokenizer_dir, val=val)
    full, metrics = fit(tmp_path / "full", full_dm, max_steps=8, estimate_steps=estimate_steps)
    first, _ = fit(
        tmp_path / "a",
        data(pattern, tokenizer_dir, val=val),
        max_steps=4,
        save_every=4,
        estimate_steps=estimate_steps,
    )
    resumed_dm = data(pattern, tokenizer_dir, val=val)
    ckpt = tmp_path / "a" / "epoch=0-step=4.ckpt"
    rest, _ = fit(
        tmp_path / "b", resumed_dm, max_steps=8, ckpt_path=ckpt, save_every=4, estimate_steps=estimate_steps
    )
    assert len(full) == 24 and first + rest == full  # no sample repeated or skipped

    # skip counts: those of exactly the 8 batches trained on (not of the batch pre-fetched after them),
    # restored from the checkpoint, and logged as data/skipped_<reason> at the last step
    plain = loader(full_dm.streams["train"], tokenizer_dir, num_workers=2, batch_size=3)
    assert full_dm.skips.skipped["train"] == skips_of(take(plain, 8)) == resumed_dm.skips.skipped["train"]
    skips = full_dm.skips
    assert skips.seen["train"] == resumed_dm.skips.seen["train"] == 24 + sum(skips.skipped["train"].values())
    step, last = [(s, m) for s, m in metrics if "data/samples_read" in m][-1]
    assert step == 7 and last["data/samples_read"] == full_dm.skips.seen["train"]
    assert all(last[f"data/skipped_{r}"] == n for r, n in full_dm.skips.skipped["train"].items())
    assert full_dm.skips.seen["val"] == 2 * 24  # two validation passes over the good shards
    lines = full_dm.skips.summary("train")
    assert lines[0].startswith(f"data.train: {full_dm.skips.seen['train']} samples read")
    assert len(lines) == 1 + len([n for n in full_dm.skips.skipped["train"].values() if n])


@pytest.mark.slow
def test_too_many_bad_samples_warn_early_then_stop_with_a_checkpoint(
    tmp_path, bad_shards, tokenizer_dir, monkeypatch
):
    """A warning as soon as WARN_AFTER_SAMPLES show too many bad samples, the stop after
    MIN_SAMPLES_FOR_SKIP_CHECK, and before it a checkpoint that says where it is and loads."""
    monkeypatch.setattr(data_module, "WARN_AFTER_SAMPLES", 3)
    monkeypatch.setattr(data_module, "MIN_SAMPLES_FOR_SKIP_CHECK", 12)
    dm = data(bad_shards[0], tokenizer_dir, max_skip_fraction=0.1, num_workers=0)
    with (
        pytest.warns(UserWarning, match=r"samples skipped .* training stops if it still is after 12"),
        pytest.raises(BadDataStop, match=r"more than max_skip_fraction=0.1.* saved to (\S+\.ckpt)") as stop,
    ):
        fit(tmp_path, dm, max_steps=20, save_every=100)
    path = re.search(r"saved to (\S+\.ckpt)", str(stop.value)).group(1)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert 0 < ckpt["global_step"] < 20 and f"step={ckpt['global_step']}" in path
    saved = ckpt["ImageTextDataModule"]["ranks"][0]  # the counts of the batches trained (3 samples each)
    assert ckpt["state_dict"] and saved["seen"] == 3 * ckpt["global_step"] + sum(saved["skipped"].values())


@pytest.mark.slow
def test_the_batch_in_flight_at_a_bad_data_stop_is_trained_after_the_resume(
    tmp_path, bad_shards, good_shards, tokenizer_dir, monkeypatch
):
    """The stop happens while a batch is handed to the model: the checkpoint neither counts it as read
    nor skips it, so the resumed run trains exactly the batches the run without a limit trains."""
    full, _ = fit(
        tmp_path / "full",
        data(bad_shards[0], tokenizer_dir, num_workers=0, val=wds(good_shards[0])),
        max_steps=8,
    )
    monkeypatch.setattr(data_module, "MIN_SAMPLES_FOR_SKIP_CHECK", 12)
    strict = data(bad_shards[0], tokenizer_dir, max_skip_fraction=0.1, num_workers=0, val=wds(good_shards[0]))
    keys, logger = KeysSeen(), Captured()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=8, logger=logger, callbacks=[keys], enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path / "stopped",
    )  # fmt: skip
    with pytest.raises(BadDataStop, match=r"saved to (\S+\.ckpt)") as stop:
        trainer.fit(TinyModel(), datamodule=strict)
    path = re.search(r"saved to (\S+\.ckpt)", str(stop.value)).group(1)
    saved = torch.load(path, weights_only=True)["ImageTextDataModule"]["ranks"][0]
    assert saved["seen"] == len(keys.keys) + sum(
        saved["skipped"].values()
    )  # the batch in flight: not counted
    rest, _ = fit(
        tmp_path / "resumed",
        data(bad_shards[0], tokenizer_dir, num_workers=0, val=wds(good_shards[0])),
        8,
        ckpt_path=path,
    )
    assert 0 < len(keys.keys) < len(full) and keys.keys + rest == full


@pytest.mark.slow
def test_a_checkpoint_from_another_worker_count_restarts_the_stream_with_a_warning(
    tmp_path, good_shards, tokenizer_dir
):
    """Stream positions are per worker: resumed with 1 worker instead of 2, the training stream
    starts again from its beginning (the samples a fresh 1-worker run reads), and the log says so."""
    fit(tmp_path / "a", data(good_shards[0], tokenizer_dir), max_steps=2, save_every=2)
    fresh, _ = fit(tmp_path / "fresh", data(good_shards[0], tokenizer_dir, num_workers=1), max_steps=1)
    with pytest.warns(
        UserWarning, match=r"positions are for 1 ranks x 2 workers, this run has 1 x 1: .* restarts"
    ):
        rest, _ = fit(
            tmp_path / "b",
            data(good_shards[0], tokenizer_dir, num_workers=1),
            max_steps=3,  # (before the validation at step 4: no validation set here)
            ckpt_path=tmp_path / "a" / "epoch=0-step=2.ckpt",
        )
    assert len(rest) == 3 and rest == fresh


def test_resume_mismatch_names_what_differs():
    saved = [{"loader": {"num_workers": 2}, "sources": {"names": ["web", "recaptioned"]}}] * 2
    assert resume_mismatch(saved, 2, 2, ["web", "recaptioned"]) is None
    assert (
        resume_mismatch(saved, 4, 2, ["web", "recaptioned"]) == "for 2 ranks x 2 workers, this run has 4 x 2"
    )
    assert "this run has 2 x 0" in resume_mismatch(saved, 2, 0, ["web", "recaptioned"])
    assert (
        resume_mismatch(saved, 2, 2, ["web"])
        == "for the sources ['web', 'recaptioned'], this run reads ['web']"
    )


def test_setup_fails_fast_on_bad_settings(good_shards, tokenizer_dir):
    with pytest.raises(ValueError, match="tokenizer 'nobody/nothing'"):
        data(good_shards[0], "nobody/nothing").setup("fit")
    with pytest.raises(ValueError, match="data.train is required to fit"):
        data(None, tokenizer_dir).setup("fit")
    with pytest.raises(ValueError, match="global_batch_size=10 is not divisible"):
        dm = data(good_shards[0], tokenizer_dir, global_batch_size=10)
        dm.trainer = L.Trainer(accelerator="cpu", devices=1, accumulate_grad_batches=4, logger=False)
        dm.setup("fit")


@pytest.mark.slow
def test_superclip_fit_resumes_exactly_through_the_cli(tmp_path, bad_shards, tokenizer_dir):
    import yaml

    from conftest import MICRO
    from superclip_pl.cli.main import build_cli

    config = {
        "model": {"backbone_config": MICRO, "warmup_steps": 0},
        "data": {
            "class_path": "superclip_pl.data.ImageTextDataModule",
            "init_args": {
                "tokenizer": tokenizer_dir,
                "train": {"path": "webdataset", "data_files": bad_shards[0], "image_column": "png"},
                "batch_size": 3,
                "num_workers": 2,
                "max_length": 16,
                "shuffle_buffer": 5,
                "max_skip_fraction": 1.0,
                "max_image_pixels": 4096,
            },
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"every_n_train_steps": 4},
                }
            ],
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))

    def fit(run: str, max_steps: int, ckpt_path=None) -> list[str]:
        args = ["--config", str(tmp_path / "config.yaml"), "--trainer.max_steps", str(max_steps)]
        args += ["--trainer.default_root_dir", str(tmp_path / run)]
        cli = build_cli(args, run=False)
        assert cli.datamodule.image_size == 16  # linked from the backbone
        keys = KeysSeen()
        cli.trainer.callbacks.append(keys)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
        return keys.keys

    first = fit("a", 4)
    rest = fit("b", 8, ckpt_path=tmp_path / "a" / "checkpoints" / "epoch=0-step=4.ckpt")
    assert first + rest == fit("full", 8)


@pytest.mark.slow
def test_ddp_resume_gives_every_rank_its_own_position(tmp_path, bad_shards, tokenizer_dir):
    """Lightning writes rank 0's checkpoint and restores rank 0's loader state into every rank;
    the data module gathers and restores each rank's own position and counts."""
    script = Path(__file__).with_name("distributed_data.py")

    def run(name: str, max_steps: int, ckpt_path: Path | None = None) -> list[dict]:
        out = tmp_path / name
        out.mkdir()
        args = [sys.executable, str(script), bad_shards[0], tokenizer_dir, str(out), str(max_steps)]
        subprocess.run(args + ([str(ckpt_path)] if ckpt_path else []), check=True, timeout=600)
        return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]

    full = run("full", 8)  # also checkpoints at step 4: the same file a run stopped there writes
    rest = run("rest", 8, tmp_path / "full" / "checkpoints" / "epoch=0-step=4.ckpt")
    for r in range(2):
        assert full[r]["keys"][:12] + rest[r]["keys"] == full[r]["keys"]  # 4 steps x 3 samples, then on
        assert rest[r]["skipped"] == full[r]["skipped"] and rest[r]["seen"] == full[r]["seen"]
    assert not set(full[0]["keys"][:6]) & set(full[1]["keys"][:6])  # the ranks read different shards
    seen, counts = full[0]["totals"]  # summed over ranks at the last step
    assert seen == full[0]["seen"] + full[1]["seen"]
    assert all(counts[r] == full[0]["skipped"].get(r, 0) + full[1]["skipped"].get(r, 0) for r in counts)
