"""Evaluate one checkpoint with ``LinearProbe`` on one process or two (DDP, gloo); each rank writes its
``trainer.callback_metrics`` to ``OUT_DIR/rank{r}.json`` and the features the probe was given to
``OUT_DIR/features{r}.pt``.

    python tests/distributed_probe.py CKPT PROBE_ROOT OUT_DIR {single,ddp}

Also the home of the probe set the tests write (CLIP_benchmark layout, train and test splits).
"""

import io
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from conftest import quiet_trainer
from distributed_eval import val_loader
from shards import write_split
from superclip_pl.eval.linear_probe import LinearProbe
from superclip_pl.train.module import LitSuperCLIP

PROBE_CLASSES = ["red", "green", "blue", "yellow", "grey"]
NOISE = 300  # pixel noise (std): enough that a probe on a random model's features is far from perfect
PALETTE = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (128, 128, 128)]


def coloured_png(label: int, seed: int) -> bytes:
    """A 16 x 16 image of the class's colour plus strong noise: a random model's features still carry
    some of the class, so a probe on them is neither perfect nor at chance."""
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor(PALETTE[label], dtype=torch.float32)
    pixels = (base + NOISE * torch.randn(16, 16, 3, generator=g)).clamp(0, 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_probe_set(root: Path, train_shards=(9, 8, 8), test_shards=(5, 5, 5)) -> Path:
    """Train and test splits of class-coloured images (labels i % 5), 3 shards each: two ranks split
    them sample by sample, unevenly (13 / 12 and 8 / 7 with the defaults)."""
    for split, sizes, offset in (("train", train_shards, 0), ("test", test_shards, 10_000)):
        n = sum(sizes)
        samples = [{"png": coloured_png(i % 5, offset + i), "cls": f"{i % 5}\n".encode()} for i in range(n)]
        write_split(root, samples, list(sizes), split)
    (root / "classnames.txt").write_text("\n".join(PROBE_CLASSES) + "\n")
    return root


def probe(root: str, **kwargs) -> LinearProbe:
    """The probe under test: a weight-decay search on a quarter of the train split, short training."""
    args = dict(batch_size=4, num_workers=0, val_proportion=0.25, epochs=4, probe_batch_size=4)
    return LinearProbe("colours", root, **(args | kwargs))


def record_features(callback: LinearProbe) -> dict[str, tuple]:
    """The (features, labels) of each split as the callback extracts them, filled in as it runs."""
    seen = {}
    extract = callback._features

    def recording(trainer, pl_module, split):
        seen[split] = extract(trainer, pl_module, split)
        return seen[split]

    callback._features = recording
    return seen


def main(ckpt: str, root: str, out_dir: str, mode: str) -> None:
    checkpoint = torch.load(ckpt, weights_only=False)
    torch.manual_seed(1)  # other weights than the checkpoint's: they must be loaded
    module = LitSuperCLIP(**checkpoint["hyper_parameters"])
    callback = probe(root, num_workers=2 if mode == "ddp" else 0)
    seen = record_features(callback)
    trainer = quiet_trainer(
        devices=1 if mode == "single" else 2,
        strategy="auto" if mode == "single" else "ddp",
        callbacks=[callback],
    )
    trainer.validate(module, dataloaders=val_loader(module.tokenizer), ckpt_path=ckpt, verbose=False)
    rank = trainer.global_rank
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    Path(out_dir, f"rank{rank}.json").write_text(
        json.dumps(metrics | {"weight_decay": callback.weight_decay})
    )
    torch.save(seen, Path(out_dir, f"features{rank}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:5])
