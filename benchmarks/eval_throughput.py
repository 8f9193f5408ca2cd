"""Zero-shot classification throughput (images/s) of the tiny preset on the CPU.

Two figures, each the median over rounds:
- ``functions``: the pure path of ``zeroshot.py`` on images already decoded and transformed:
  ``encode_image`` in batches, scores against a classifier built beforehand by ``build_classifier``
  (prompt encoding is not timed), then ``classification_metrics``;
- ``callback``: ``ZeroShotClassification`` inside ``Trainer.validate`` on a set written in the
  CLIP_benchmark layout (PNG shards + ``.cls``), so decoding, the eval transform and the prompt
  encoding count too. Its time is that of a ``validate`` with the callback minus one without it,
  the two alternating (``timing.interleaved``), so Trainer start-up is not counted.
"""

from __future__ import annotations

import io
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from PIL import Image
from timing import interleaved
from torch.utils.data import DataLoader
from workloads import Batches, word_tokenizer

from superclip_pl.eval.callbacks import ZeroShotClassification
from superclip_pl.eval.metrics import build_classifier, classification_metrics
from superclip_pl.tokenizer import tokenize
from superclip_pl.train.module import LitSuperCLIP

TARGETS = {"functions_images_per_s": None, "callback_images_per_s": None}

FULL = dict(images=2048, stored_px=64, classes=10, templates=12, batch=64, rounds=3)
QUICK = dict(images=64, stored_px=32, classes=4, templates=2, batch=32, rounds=1)
VOCAB = 512


def write_classification_set(root: Path, n: int, size: int, classes: list[str], templates: list[str]) -> None:
    """A CLIP_benchmark-layout set: classnames, templates, ``test/0.tar`` of random PNGs + labels."""
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    g = torch.Generator().manual_seed(0)
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i in range(n):
            pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=g).numpy()
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("cls", str(i % len(classes)).encode())):
                info = tarfile.TarInfo(f"s{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def run(quick: bool = False) -> dict:
    cfg = QUICK if quick else FULL
    # words of the benchmark tokenizer's vocabulary, so prompts tokenise as real ones would
    classes = [f"w{i}" for i in range(cfg["classes"])]
    templates = [f"w{100 + i} w{200 + i} {{c}}" for i in range(cfg["templates"])]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = word_tokenizer(VOCAB, Path(tmp) / "tokenizer")
        root = Path(tmp) / "set"
        write_classification_set(root, cfg["images"], cfg["stored_px"], classes, templates)
        torch.manual_seed(0)
        module = LitSuperCLIP(tokenizer_dir, backbone="tiny", class_loss_weight=0.0)
        model = module.model.eval()
        size = model.image_size
        pixels = torch.randn(cfg["images"], 3, size, size)
        labels = torch.arange(cfg["images"]) % len(classes)

        def encode_text(prompts: list[str]) -> torch.Tensor:
            return model.encode_text(**tokenize(module.tokenizer, prompts, module.max_length))

        with torch.no_grad():
            classifier = build_classifier(encode_text, classes, templates)  # (D, C)

        @torch.no_grad()
        def functions() -> None:
            scores = [model.encode_image(x) @ classifier for x in pixels.split(cfg["batch"])]
            classification_metrics(torch.cat(scores), labels)

        def validate(with_callback: bool) -> float:
            callbacks = [ZeroShotClassification("bench", str(root), batch_size=cfg["batch"], num_workers=0)]
            trainer = Trainer(
                accelerator="cpu",
                devices=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=callbacks if with_callback else [],
            )
            start = time.perf_counter()
            trainer.validate(module, DataLoader(Batches([{}]), batch_size=None), verbose=False)
            return time.perf_counter() - start

        times = interleaved(
            {"functions": functions, "with": lambda: validate(True), "without": lambda: validate(False)},
            rounds=cfg["rounds"],
        )
    callback_s = [a - b for a, b in zip(times["with"], times["without"], strict=True)]
    return {
        "functions_images_per_s": cfg["images"] / statistics.median(times["functions"]),
        "callback_images_per_s": cfg["images"] / statistics.median(callback_s),
        "functions_s": times["functions"],
        "callback_s": callback_s,
        "config": cfg | {"image_size": size, "backbone": "tiny"},
    }
