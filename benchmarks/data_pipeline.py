"""Data pipeline throughput: our decode + transform + tokenise against a plain PIL decode loop.

The baseline reads the same webdataset shards with `tarfile` and only decodes each image to RGB.
Our pipeline goes through `load_dataset` streaming, the block shuffle, the decode with its checks
(JPEGs decoded at reduced scale when they are at least twice the training size), RandomResizedCrop +
normalise, and batched tokenisation, in the process and in DataLoader workers.
The number that matters is the ratio per worker: how much of one core's plain-decode speed is
left after our preprocessing (the training step must be fed by `num_workers` of those).

Variants are timed in interleaved rounds (`timing.interleaved`) because the machine is shared;
worker start-up is left out (the clock starts at the first batch). Without `--data_files` a few
shards of 640x480 JPEGs (a common web photo size) are written to a temporary directory.
"""

from __future__ import annotations

import argparse
import glob
import io
import statistics
import tarfile
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
from PIL import Image
from timing import interleaved

from superclip_pl.data.build import image_text_stream
from superclip_pl.data.decode import Collate
from superclip_pl.data.loader import StreamLoader
from superclip_pl.data.sources import DataSource
from superclip_pl.shapes.bpe import train_bpe_tokenizer
from superclip_pl.tokenizer import load_tokenizer

# what `benchmarks/run.py` reports: per-worker speed of the whole pipeline against plain decoding
TARGETS = {
    "pipeline.1.per_worker_vs_plain_decode": (">=", 0.8),
    "pipeline.0.per_worker_vs_plain_decode": None,
    "pipeline.2.per_worker_vs_plain_decode": None,
    "plain_decode_samples_per_s": None,
}
WORDS = "a photo of small large red green blue yellow circle square star on the left right".split()  # noqa: SIM905


def write_jpeg_shards(root: Path, shards: int = 4, per_shard: int = 128, size=(640, 480)) -> list[str]:
    """Shards of smooth, noisy JPEGs with short captions; returns the captions."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    captions = []
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:04d}.tar", "w") as tar:
            for i in range(per_shard):
                phase = rng.uniform(0, 6.28, 3)
                waves = [np.sin(xx / (20 + 7 * c) + yy / (31 - 5 * c) + phase[c]) for c in range(3)]
                pixels = (np.stack(waves, -1) * 100 + 128 + rng.normal(0, 12, (*xx.shape, 3))).clip(0, 255)
                buf = io.BytesIO()
                Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=90)
                caption = " ".join(rng.choice(WORDS, size=int(rng.integers(4, 12))))
                captions.append(caption)
                for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{s:04d}{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return captions


def plain_decode(files: list[str], n: int) -> None:
    """Decode `n` images to RGB straight from the tar files (cycling over them)."""
    done = 0
    while done < n:
        for path in files:
            with tarfile.open(path) as tar:
                for member in tar:
                    if member.name.rsplit(".", 1)[-1] in ("jpg", "jpeg", "png", "webp"):
                        Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB").load()
                        done += 1
                        if done == n:
                            return


def run(
    quick: bool = False,
    data_files: str | None = None,
    tokenizer: str | None = None,
    image_size: int = 224,
    batch_size: int = 32,
    samples: int = 512,
    workers: tuple[int, ...] = (0, 1, 2),
    rounds: int = 3,
) -> dict:
    """Samples/s of the plain decode loop and of our pipeline with each number of workers (0 = in
    the main process), and each per-worker rate as a fraction of the plain decode rate.
    `quick`: a toy size (64 samples, one round) that only checks the benchmark runs."""
    if quick:
        samples, rounds, batch_size = 64, 1, 16
    with tempfile.TemporaryDirectory() as tmp:
        if data_files is None:
            captions = write_jpeg_shards(Path(tmp), per_shard=16 if quick else 128)
            data_files = str(Path(tmp) / "*.tar")
        else:
            captions = WORDS
        if tokenizer is None:
            tokenizer = str(Path(tmp) / "tokenizer")
            train_bpe_tokenizer(captions, tokenizer, vocab_size=256)
        files = sorted(glob.glob(data_files))
        tok = load_tokenizer(tokenizer)
        stream = image_text_stream(
            DataSource(path="webdataset", data_files=data_files), image_size=image_size, shuffle_buffer=256
        )
        batches = max(1, samples // batch_size)

        def pipeline(num_workers: int):
            loader = StreamLoader(
                stream, batch_size=batch_size, num_workers=num_workers, collate_fn=Collate(tok)
            )

            def timed() -> float:
                it = iter(loader)
                next(it)  # worker start-up and shuffle-buffer fill are not throughput
                start = time.perf_counter()
                for _ in islice(it, batches):
                    pass
                return time.perf_counter() - start

            return timed

        variants = {"plain_decode": lambda: plain_decode(files, batches * batch_size)}
        variants |= {f"workers={w}": pipeline(w) for w in workers}
        times = interleaved(variants, rounds=rounds)

    rate = {name: batches * batch_size / statistics.median(t) for name, t in times.items()}
    plain = rate.pop("plain_decode")
    return {
        "plain_decode_samples_per_s": plain,
        "pipeline": {
            w: {
                "samples_per_s": rate[f"workers={w}"],
                "per_worker": rate[f"workers={w}"] / max(w, 1),
                "per_worker_vs_plain_decode": rate[f"workers={w}"] / max(w, 1) / plain,
            }
            for w in workers
        },
        "config": {
            "image_size": image_size,
            "batch_size": batch_size,
            "samples": batches * batch_size,
            "rounds": rounds,
            "data_files": data_files if files else None,
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_files", help="webdataset shards (glob); default: synthetic JPEG shards")
    parser.add_argument("--tokenizer", help="tokenizer dir or hub id; default: a small BPE trained here")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = run(
        False,
        args.data_files,
        args.tokenizer,
        args.image_size,
        args.batch_size,
        args.samples,
        tuple(args.workers),
        args.rounds,
    )
    print(f"plain PIL decode: {result['plain_decode_samples_per_s']:8.1f} samples/s (1 process)")
    print(f"{'workers':>8} {'samples/s':>10} {'per worker':>11} {'per worker / plain decode':>26}")
    for w, r in result["pipeline"].items():
        ratio = r["per_worker_vs_plain_decode"]
        print(f"{w:>8} {r['samples_per_s']:10.1f} {r['per_worker']:11.1f} {ratio:26.2f}")
