"""ImageTextDataModule: streaming image-caption data for SuperCLIP, split over ranks and workers.

Training reads an infinite, block-shuffled stream (the trainer's `max_steps` decides its length)
whose exact position is saved in checkpoints; validation reads its source once per pass, in order.
Bad samples are skipped and counted per reason; the counts are logged as `data/skipped_<reason>`,
summarised at the end, and the run stops when more than `max_skip_fraction` of samples are bad.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from superclip_pl.data.build import role_stream
from superclip_pl.data.decode import Collate
from superclip_pl.data.loader import StreamLoader
from superclip_pl.data.mixture import SourceCounts
from superclip_pl.data.skips import ROLES, SkipCounts, check_skip_fraction
from superclip_pl.data.sources import DataSource
from superclip_pl.data.stream import ImageTextStream
from superclip_pl.tokenizer import load_tokenizer
from superclip_pl.transforms import normalize

# the skipped fraction is only judged after this many training samples (all ranks together)
MIN_SAMPLES_FOR_SKIP_CHECK = 1000


def _empty_step() -> DataLoader:
    """One empty batch: Lightning skips a loop with no batches, hooks included, and the evaluation
    callbacks run at the end of the validation / test loop."""
    return DataLoader([{}], batch_size=None)


def per_device_batch_size(global_batch_size: int, world_size: int, accumulate_grad_batches: int = 1) -> int:
    """global = per-device x world_size x accumulate_grad_batches, or a clear error."""
    per_step = world_size * accumulate_grad_batches
    if global_batch_size % per_step:
        raise ValueError(
            f"data.global_batch_size={global_batch_size} is not divisible by world_size={world_size} x "
            f"accumulate_grad_batches={accumulate_grad_batches}; use a multiple of {per_step}"
        )
    return global_batch_size // per_step


def _gather(obj, world_size: int) -> list:
    """`obj` from every rank (rank order); must be called by all ranks together."""
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        out = [None] * world_size
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


class ImageTextDataModule(L.LightningDataModule):
    def __init__(
        self,
        tokenizer: str,
        train: DataSource | list[DataSource] | None = None,
        val: DataSource | None = None,
        test: DataSource | None = None,
        batch_size: int = 16,
        global_batch_size: int | None = None,
        num_workers: int = 2,
        image_size: int = 224,
        max_length: int = 77,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        max_skip_fraction: float = 0.01,
        max_image_pixels: int = 2**25,
        class_max_length: int | None = None,
    ) -> None:
        """Streaming image-caption pairs, tokenised, as `pixel_values` / `input_ids` / `attention_mask`.

        Args:
            tokenizer: tokenizer directory or hub id (e.g. openai/clip-vit-base-patch16).
            train: training source (needed to fit), or a list of sources with weights drawn in
                those proportions; read as an endless shuffled stream.
            val: validation source; read once per validation, in order. Without one, validation
                runs a single empty step, so that evaluation callbacks still run at its end.
            test: test source for `superclip test`, read like `val` (an empty step without one).
            batch_size: samples per device and step (ignored when global_batch_size is set).
            global_batch_size: samples per optimizer step over all devices; the per-device batch is
                global_batch_size / (world_size x accumulate_grad_batches).
            num_workers: DataLoader worker processes per device; shards are split over them.
            image_size: side of the square images fed to the model.
            max_length: longest caption in tokens (CLIP: 77); longer ones are cut, keeping EOS.
            shuffle_buffer: training samples shuffled together per block (per worker); 0 = stream order.
            seed: seed of the shuffle and caption choice; each epoch, rank and worker derive their own.
            max_skip_fraction: stop training when more than this fraction of samples was unusable.
            max_image_pixels: skip images with more pixels than this, before decoding them.
            class_max_length: tokens of the caption the classification targets (`class_ids`) come
                from; None or max_length: none apart from `input_ids` (linked from the model).
        """
        super().__init__()
        self.tokenizer_name, self.train, self.val, self.test = tokenizer, train, val, test
        self.batch_size, self.global_batch_size, self.num_workers = batch_size, global_batch_size, num_workers
        self.image_size, self.max_length = image_size, max_length
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.max_skip_fraction, self.max_image_pixels = max_skip_fraction, max_image_pixels
        self.class_max_length = class_max_length
        self.source_counts = SourceCounts([None])
        self.tokenizer = None  # loaded in setup()
        self.batch_size_per_device = batch_size
        self.streams: dict[str, ImageTextStream] = {}
        self.skips = SkipCounts()
        self._train_loader: StreamLoader | None = None
        self._resume: list[dict] | None = None

    def _rank_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_name)
        rank, world_size = self._rank_world()
        if self.global_batch_size is not None:
            accumulate = self.trainer.accumulate_grad_batches if self.trainer else 1
            self.batch_size_per_device = per_device_batch_size(self.global_batch_size, world_size, accumulate)
        roles = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ())
        for role in roles:
            source = getattr(self, role)
            if source is None and role == "train":
                raise ValueError("data.train is required to fit: set data.train.path (and data_files)")
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

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Count skips carried by the batch (so every worker's count arrives exactly once)."""
        if not batch:  # the empty step of a loop without data
            return batch
        skipped = batch.pop("skipped", {})
        trainer = self.trainer
        role = "train" if trainer is not None and trainer.training else "val"
        if trainer is not None and trainer.testing:
            role = "test"
        self.skips.add(role, len(batch["keys"]), skipped)
        counts = batch.pop("counts", {})
        if role == "train":
            self.source_counts.add(counts)
            if self._train_loader is not None:
                self._train_loader.mark_consumed()  # this batch is about to be trained on
            last_step = 0 < trainer.max_steps <= trainer.global_step + 1
            if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0 or last_step:
                self._sync_and_check()
        return batch

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Normalise the uint8 images on the device they were sent to (CPU, GPU, under any strategy):
        the workers ship a quarter of the bytes and do no float work."""
        pixels = batch.get("pixel_values") if batch else None
        if pixels is not None and pixels.dtype == torch.uint8:
            batch["pixel_values"] = normalize(pixels)
        return batch

    def _sync_and_check(self) -> None:
        """Sum the training counts over ranks, log them, and stop if too many samples were bad.

        Called by every rank on the same training batches, so the collective and the error agree.
        """
        metrics = self.skips.sync(self.trainer.strategy) | self.source_counts.sync(self.trainer.strategy)
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.trainer.global_step)
        seen, counts = self.skips.train_totals
        check_skip_fraction(seen, counts, self.max_skip_fraction, MIN_SAMPLES_FOR_SKIP_CHECK)

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
        return {"ranks": _gather(mine, self._rank_world()[1])}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume = state_dict.get("ranks")
        if self._resume is not None and self._train_loader is not None:
            self._restore()

    def _restore(self) -> None:
        """Give the training loader this rank's saved position (before it starts iterating)."""
        saved, self._resume = self._resume, None
        rank, world_size = self._rank_world()
        names = saved[0].get("sources", {}).get("names", [None])
        if len(saved) != world_size or saved[rank]["loader"]["num_workers"] != self.num_workers:
            rank_zero_warn(
                f"data: the checkpoint's stream positions are for {len(saved)} ranks x "
                f"{saved[0]['loader']['num_workers']} workers, this run has {world_size} x "
                f"{self.num_workers}: the training stream restarts from its beginning"
            )
            return
        if names != self.source_counts.names:
            rank_zero_warn(
                f"data: the checkpoint's stream positions are for the sources {names}, this run reads "
                f"{self.source_counts.names}: the training stream restarts from its beginning"
            )
            return
        mine = saved[rank]
        self._train_loader.load_state_dict(mine["loader"])
        self.skips.load_train_state(mine)
        self.source_counts.load_state(mine.get("sources", {}))
