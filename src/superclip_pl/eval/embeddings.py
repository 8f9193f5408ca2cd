"""``EmbeddingWriter``: what ``superclip predict`` writes, the image and caption embeddings of a data set
(what retrieval indexes are built from), one file per rank.

``<output_dir>/embeddings-rank<R>.safetensors`` holds ``image_embeds`` and ``text_embeds`` (N, E),
float32, L2-normalised, in the order of ``embeddings-rank<R>.keys.txt`` (one sample key a line). Each
rank embeds its own shards of ``data.predict``; together the files cover the set once.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from safetensors.torch import save_file

from superclip_pl.interop.clipdir import shareable


class EmbeddingWriter(BasePredictionWriter):
    def __init__(self, output_dir: str | None = None) -> None:
        """Args:
        output_dir: where the files go; None: ``embeddings`` in the trainer's log directory."""
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self._parts: dict[str, list] = {}

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        # the keys name the samples; batch indices (from a sampler, which a stream has not) are not needed
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
        self._parts = {"keys": [], "image_embeds": [], "text_embeds": []}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dl_idx):
        if not prediction:  # no samples in this batch
            return
        self._parts["keys"] += list(prediction["keys"])
        for name in ("image_embeds", "text_embeds"):
            self._parts[name].append(prediction[name].detach().float().cpu())

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        out = Path(self.output_dir or os.path.join(trainer.log_dir or trainer.default_root_dir, "embeddings"))
        out.mkdir(parents=True, exist_ok=True)
        rank, parts = trainer.global_rank, self._parts
        width = pl_module.model.config.projection_dim
        tensors = {
            name: torch.cat(parts[name]) if parts[name] else torch.zeros(0, width)
            for name in ("image_embeds", "text_embeds")
        }
        save_file(tensors, out / f"embeddings-rank{rank}.safetensors")
        shareable(out / f"embeddings-rank{rank}.safetensors")
        (out / f"embeddings-rank{rank}.keys.txt").write_text("".join(f"{k}\n" for k in parts["keys"]))
        print(f"rank {rank}: {len(parts['keys'])} embeddings written to {out / f'embeddings-rank{rank}.*'}")
        self._parts = {}
