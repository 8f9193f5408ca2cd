"""ImageTextDataModule: streaming image-caption data for SuperCLIP, split over ranks and workers.

Training reads an infinite, block-shuffled stream (the trainer's `max_steps` decides its length)
whose exact position is saved in checkpoints; validation reads its source once per pass, in order.
Bad samples are skipped and counted per reason; the counts are logged as `data/skipped_<reason>`,
summarised at the end, and the run stops when more than `max_skip_fraction` of samples are bad.
"""

from __future__ import annotations

import os

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from superclip_pl.data.build import role_stream
from superclip_pl.data.checks import as_source, check_numbers
from superclip_pl.data.decode import Collate
from superclip_pl.data.loader import StreamLoader, resume_mismatch
from superclip_pl.data.mixture import SourceCounts
from superclip_pl.data.ranks import gather, per_device_batch_size
from superclip_pl.data.skips import ROLES, SkipCounts, skip_problem
from superclip_pl.data.sources import DataSource
from superclip_pl.data.stream import ImageTextStream
from superclip_pl.errors import BadDataStop
from superclip_pl.tokenizer import load_tokenizer
from superclip_pl.transforms import normalize

# the skipped fraction stops a run only after this many training samples (all ranks together); a
# warning says so as soon as WARN_AFTER_SAMPLES show a fraction above the limit
MIN_SAMPLES_FOR_SKIP_CHECK = 1000
WARN_AFTER_SAMPLES = 100


def _empty_step() -> DataLoader:
    """One empty batch: Lightning skips a loop with no batches, hooks included, and the evaluation
    callbacks run at the end of the validation / test loop."""
    return DataLoader([{}], batch_size=None)


class ImageTextDataModule(L.LightningDataModule):
    def __init__(
        self,
        tokenizer: str,
        train: DataSource | list[DataSource] | None = None,
        val: DataSource | None = None,
        test: DataSource | None = None,
        predict: DataSource | None = None,
        batch_size: int = 16,
        global_batch_size: int | None = None,
        num_workers: int = 2,
        image_size: int | None = None,
        max_length: int | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        max_skip_fraction: float = 0.01,
        max_image_pixels: int = 2**25,
        class_max_length: int | None = None,
        jpeg_decoder: str = "auto",
    ) -> None:
        """Streaming image-caption pairs, tokenised, as `pixel_values` / `input_ids` / `attention_mask`.

        Args:
            tokenizer: tokenizer directory or hub id (e.g. openai/clip-vit-base-patch16).
            train: training source (needed to fit), or a list of sources with weights drawn in
                those proportions; read as an endless shuffled stream.
            val: validation source; read once per validation, in order. Without one, validation
                runs a single empty step, so that evaluation callbacks still run at its end.
            test: test source for `superclip test`, read like `val` (an empty step without one).
            predict: source `superclip predict` embeds (images and captions), read once, in order.
            batch_size: samples per device and step (ignored when global_batch_size is set).
            global_batch_size: samples per optimizer step over all devices; the per-device batch is
                global_batch_size / (world_size x accumulate_grad_batches).
            num_workers: DataLoader worker processes per device; shards are split over them.
            image_size: side of the square images fed to the model; None: the model's (in `setup`),
                else 224 (the CLI links it from `model.image_size`).
            max_length: longest caption in tokens (CLIP: 77); longer ones are cut, keeping EOS; None:
                the model's `max_length` (in `setup`), else 77.
            shuffle_buffer: training samples shuffled together per block (per worker); 0 = stream order.
            seed: seed of the shuffle and caption choice; each epoch, rank and worker derive their own.
            max_skip_fraction: stop training when more than this fraction of samples was unusable.
            max_image_pixels: skip images with more pixels than this, before decoding them.
            class_max_length: tokens of the caption the classification targets (`class_ids`) come
                from; None or max_length: none apart from `input_ids` (linked from the model).
            jpeg_decoder: how training decodes JPEGs: `opencv` (the `opencv` extra: libjpeg-turbo at
                reduced scale and a vectorised resize, about a third less CPU per image), `pil`, or
                `auto` (OpenCV when installed, else PIL). Evaluation always uses PIL, as the HF image
                processor does.
        """
        super().__init__()
        check_numbers(locals())
        if isinstance(train, list):
            train = [as_source(f"train[{i}]", s) for i, s in enumerate(train)]
        else:
            train = as_source("train", train)
        val, test = as_source("val", val), as_source("test", test)
        self.tokenizer_name, self.train, self.val, self.test = tokenizer, train, val, test
        self.predict = as_source("predict", predict)
        self.batch_size, self.global_batch_size, self.num_workers = batch_size, global_batch_size, num_workers
        self.image_size, self.max_length = image_size, max_length
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.max_skip_fraction, self.max_image_pixels = max_skip_fraction, max_image_pixels
        self.class_max_length, self.jpeg_decoder = class_max_length, jpeg_decoder
        self.source_counts = SourceCounts([None])
        self.tokenizer = None  # loaded in setup()
        self.batch_size_per_device = batch_size
        self.streams: dict[str, ImageTextStream] = {}
        self.skips = SkipCounts()
        self._train_loader: StreamLoader | None = None
        self._resume: list[dict] | None = None
        self._warned = False  # the early warning about bad samples was given

    def _rank_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def _sizes_from_the_model(self) -> None:
        """Image size, caption length and classification length left unset: the model's (the Python
        API, where no CLI links them), else CLIP's 224 px and 77 tokens."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        if self.image_size is None:
            self.image_size = getattr(model, "image_size", None) or 224
        if self.max_length is None:
            self.max_length = getattr(model, "max_length", None) or 77
        if self.class_max_length is None and model is not None:
            self.class_max_length = getattr(getattr(model, "hparams", {}), "class_max_length", None)

    def setup(self, stage: str) -> None:
        self._sizes_from_the_model()
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_name)
        rank, world_size = self._rank_world()
        if self.global_batch_size is not None:
            accumulate = self.trainer.accumulate_grad_batches if self.trainer else 1
            self.batch_size_per_device = per_device_batch_size(self.global_batch_size, world_size, accumulate)
        roles = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        roles = roles.get(stage, ())
        for role in roles:
            source = getattr(self, role)
            if source is None and role in ("train", "predict"):
                what = "to fit" if role == "train" else "to predict (embed)"
                raise ValueError(f"data.{role} is required {what}: set data.{role}.path (and data_files)")
            if source is None or role in self.streams:
                continue
            training = role == "train"
            self.streams[role], names = role_stream(
                source,
                role,
                image_size=self.image_size,
                training=training,
                rank=rank,
                world_size=world_size,
                shuffle_buffer=self.shuffle_buffer if training else 0,
                seed=self.seed,
                max_image_pixels=self.max_image_pixels,
                num_workers=self.num_workers,
                jpeg_decoder=self.jpeg_decoder,
            )
            if training:
                self.source_counts = SourceCounts(names)

    def _on_cuda(self) -> bool:
        """Batches go to a CUDA device (so pinned memory speeds their copy up)."""
        if self.trainer is not None:
            return self.trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def _loader(self, role: str, track_consumed: bool = False) -> StreamLoader:
        rank, world_size = self._rank_world()
        return StreamLoader(
            self.streams[role],
            batch_size=self.batch_size_per_device,
            num_workers=self.num_workers,
            collate_fn=Collate(self.tokenizer, self.max_length, self.class_max_length),
            pin_memory=self._on_cuda(),
            # evaluation loaders are iterated once per validation: keep their workers between passes
            persistent_workers=role != "train" and self.num_workers > 0,
            rank=rank,
            world_size=world_size,
            track_consumed=track_consumed,
        )

    def train_dataloader(self) -> StreamLoader:
        self._train_loader = self._loader("train", track_consumed=self.trainer is not None)
        if self._resume is not None:
            self._restore()
        return self._train_loader

    def val_dataloader(self) -> StreamLoader | DataLoader:
        return self._loader("val") if "val" in self.streams else _empty_step()

    def test_dataloader(self) -> StreamLoader | DataLoader:
        return self._loader("test") if "test" in self.streams else _empty_step()

    def predict_dataloader(self) -> StreamLoader:
        return self._loader("predict")

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Count skips carried by the batch (so every worker's count arrives exactly once)."""
        if not batch:  # the empty step of a loop without data
            return batch
        skipped = batch.pop("skipped", {})
        trainer = self.trainer
        role = "train" if trainer is not None and trainer.training else "val"
        if trainer is not None and (trainer.testing or trainer.predicting):
            role = "test" if trainer.testing else "predict"
        # counts and position before this batch: what a bad-data stop saves (the batch is not trained)
        before = (self.skips.train_state(), self.source_counts.state()) if role == "train" else None
        self.skips.add(role, len(batch["keys"]), skipped)
        counts = batch.pop("counts", {})
        if role == "train":
            self.source_counts.add(counts)
            last_step = 0 < trainer.max_steps <= trainer.global_step + 1
            # every step until the stop could be judged (the same on every rank: the sync is a collective)
            early = trainer.global_step * self.batch_size_per_device * trainer.world_size
            early = early < MIN_SAMPLES_FOR_SKIP_CHECK
            if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0 or last_step or early:
                self._sync_and_check(before)
            if self._train_loader is not None:
                self._train_loader.mark_consumed()  # this batch is about to be trained on
        return batch

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Normalise the uint8 images on the device they were sent to (CPU, GPU, under any strategy):
        the workers ship a quarter of the bytes and do no float work."""
        pixels = batch.get("pixel_values") if batch else None
        if pixels is not None and pixels.dtype == torch.uint8:
            batch["pixel_values"] = normalize(pixels)
        return batch

    def _sync_and_check(self, before: tuple[dict, dict]) -> None:
        """Sum the training counts over ranks, log them, warn early and stop (after saving a checkpoint)
        if too many samples were bad.

        Called by every rank on the same training batches, so the collectives and the stop agree.
        """
        metrics = self.skips.sync(self.trainer.strategy) | self.source_counts.sync(self.trainer.strategy)
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.trainer.global_step)
        seen, counts = self.skips.train_totals
        problem = skip_problem(seen, counts, self.max_skip_fraction)
        if problem and seen >= MIN_SAMPLES_FOR_SKIP_CHECK:
            self.skips.load_train_state(before[0])
            self.source_counts.load_state(before[1])
            self._stop(problem)
        if problem and seen >= WARN_AFTER_SAMPLES and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"{problem}: training stops if it still is after {MIN_SAMPLES_FOR_SKIP_CHECK} samples; "
                "check data.train (columns, files) or raise data.max_skip_fraction"
            )

    def _stop(self, problem: str) -> None:
        """Save the model trained so far, then stop the run with one line saying where it is."""
        trainer = self.trainer
        callback = trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) or os.path.join(
            trainer.log_dir or trainer.default_root_dir, "checkpoints"
        )
        path = os.path.join(folder, f"bad-data-step={trainer.global_step}.ckpt")
        trainer.save_checkpoint(path)
        raise BadDataStop(
            f"{problem}; the model of step {trainer.global_step} is saved to {path}; fix the data or "
            "raise data.max_skip_fraction, then resume with --ckpt_path"
        )

    def teardown(self, stage: str) -> None:
        for role in ROLES:
            if self.skips.seen[role]:
                rank_zero_info("\n".join(self.skips.summary(role, self._rank_world()[1])))

    def state_dict(self) -> dict:
        """Every rank's training stream position and counts (gathered: rank 0 writes the checkpoint)."""
        if self._train_loader is None:
            return {}
        mine = {"loader": self._train_loader.state_dict(), **self.skips.train_state()}
        mine["sources"] = self.source_counts.state()
        return {"ranks": gather(mine, self._rank_world()[1])}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume = state_dict.get("ranks")
        if self._resume is not None and self._train_loader is not None:
            self._restore()

    def _restore(self) -> None:
        """Give the training loader this rank's saved position (before it starts iterating)."""
        saved, self._resume = self._resume, None
        rank, world_size = self._rank_world()
        mismatch = resume_mismatch(saved, world_size, self.num_workers, self.source_counts.names)
        if mismatch:
            rank_zero_warn(
                f"data: the checkpoint's stream positions are {mismatch}: the training stream restarts "
                "from its beginning"
            )
            return
        mine = saved[rank]
        self._train_loader.load_state_dict(mine["loader"])
        self.skips.load_train_state(mine)
        self.source_counts.load_state(mine.get("sources", {}))
