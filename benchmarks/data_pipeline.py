"""Data pipeline throughput: our decode + transform + tokenise against a plain PIL decode loop.

The baseline reads the same webdataset shards with `tarfile` and only decodes each image, full size,
to RGB. Our pipeline is what the data module runs: the tar reader (`data/tars.py`) under HF's
streaming `IterableDataset`, the block shuffle, the decode with its checks (JPEGs decoded at the
scale the crop needs: OpenCV when the `opencv` extra is installed, else PIL `draft`; with OpenCV
the PIL decoder is timed too), RandomResizedCrop to uint8, batched tokenisation, and the
batch sent from the DataLoader workers (normalisation happens on the device, after the transfer,
and is not part of this). The numbers that matter: per worker, how much of one core's plain-decode
speed each worker delivers (the training step is fed by `num_workers` of those), and for the whole
loader, its rate against plain decoding in as many processes as it has workers.

Variants are timed in interleaved rounds (`timing.interleaved`) because the machine is shared;
worker start-up is left out (the clock starts at the first batch). Without `--data_files` a few
shards of 640x480 JPEGs (a common web photo size) are written to a temporary directory.
"""

from __future__ import annotations

import argparse
import glob
import io
import multiprocessing
import os
import statistics
import tarfile
import tempfile
import time
from functools import partial
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
    "pipeline.1.per_worker_vs_plain_decode": (">=", 1.0),
    "pipeline.2.per_worker_vs_plain_decode": (">=", 1.0),
    "pipeline.2.loader_vs_plain_decode": (">=", 1.0),
    "pipeline.0.per_worker_vs_plain_decode": None,
    "pipeline.1.per_cpu_second_vs_plain_decode": None,
    "pipeline.2.per_cpu_second_vs_plain_decode": None,
    "plain_decode_samples_per_s": None,
    "pil_in_process_vs_plain_decode": None,  # the same pipeline with data.jpeg_decoder: pil
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


def plain_decode_in(pool, processes: int, files: list[str], n: int) -> None:
    """`plain_decode` of `n` images split over `processes` processes of `pool`, each on its own shards."""
    shares = [files[i::processes] for i in range(processes)]
    pool.starmap(plain_decode, [(share, n // processes) for share in shares])


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its living descendants (DataLoader workers,
    pool processes), read from /proc; 0 where there is no /proc.

    On a machine shared with other work a process gets a varying share of a core, so wall-clock
    rates move from round to round; the CPU time a variant spends per image does not, and its
    inverse is what a worker delivers when it has a core to itself.
    """
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            todo += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:  # not Linux, or the process has just ended
            continue
    return total


def run(
    quick: bool = False,
    data_files: str | None = None,
    tokenizer: str | None = None,
    image_size: int = 224,
    batch_size: int = 32,
    samples: int = 512,
    workers: tuple[int, ...] = (0, 1, 2),
    rounds: int = 3,
    jpeg_decoder: str = "auto",
) -> dict:
    """Samples/s of the plain decode loop (in 1 process, and in as many as the most workers) and of
    our pipeline with each number of workers (0 = in the main process); per worker and whole-loader
    rates as fractions of plain decoding in 1 and in `workers` processes (medians of per-round
    ratios), and the same per CPU-second. `jpeg_decoder` is the data module's (auto: OpenCV when
    installed); with OpenCV, the PIL decoder is also timed in the main process, for comparison.
    `quick`: a toy size (64 samples, one round)."""
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
        source = DataSource(path="webdataset", data_files=data_files)
        # as the data module ships them: uint8, normalised on the device
        make = partial(image_text_stream, source, image_size=image_size, shuffle_buffer=256, normalized=False)
        stream = make(jpeg_decoder=jpeg_decoder)
        opencv = stream.decoder.opencv
        batches = max(1, samples // batch_size)
        n = batches * batch_size
        cpu: dict[str, list[float]] = {}

        def pipeline(num_workers: int, stream=stream, name: str | None = None):
            name = name or f"workers={num_workers}"
            loader = StreamLoader(
                stream, batch_size=batch_size, num_workers=num_workers, collate_fn=Collate(tok)
            )

            def timed() -> float:
                it = iter(loader)
                next(it)  # worker start-up and shuffle-buffer fill are not throughput
                start, used = time.perf_counter(), cpu_seconds()
                for _ in islice(it, batches):
                    pass
                cpu.setdefault(name, []).append(cpu_seconds() - used)
                return time.perf_counter() - start

            return timed

        def clocked(name: str, fn):
            def timed() -> float:
                start, used = time.perf_counter(), cpu_seconds()
                fn()
                cpu.setdefault(name, []).append(cpu_seconds() - used)
                return time.perf_counter() - start

            return timed

        parallel = sorted({w for w in workers if w > 1})
        with multiprocessing.get_context("fork").Pool(max(parallel, default=1)) as pool:
            variants = {"plain_decode": clocked("plain_decode", partial(plain_decode, files, n))}
            for p in parallel:
                variants[f"plain_decode_x{p}"] = clocked(
                    f"plain_decode_x{p}", partial(plain_decode_in, pool, p, files, n)
                )
            variants |= {f"workers={w}": pipeline(w) for w in workers}
            if opencv:  # the lever's effect: the PIL decoder on the same samples, in the main process
                variants["pil_workers=0"] = pipeline(0, make(jpeg_decoder="pil"), "pil_workers=0")
            times = interleaved(variants, rounds=rounds)
        cpu = {name: t[-rounds:] for name, t in cpu.items()}  # the warm-up round is not counted

    rate = {name: n / statistics.median(t) for name, t in times.items()}

    def ratio(num: str, den: str, divide: int = 1) -> float:
        # per round (both variants timed in the same round), then the median over rounds
        return statistics.median(b / a / divide for a, b in zip(times[num], times[den], strict=True))

    def cpu_ratio(name: str) -> float | None:
        # plain decoding's CPU time per image over ours (all our processes), per round, median
        ratios = [a / b for a, b in zip(cpu["plain_decode"], cpu[name], strict=True) if a > 0 and b > 0]
        return statistics.median(ratios) if ratios else None

    return {
        "plain_decode_samples_per_s": rate["plain_decode"],
        "plain_decode_parallel_samples_per_s": {p: rate[f"plain_decode_x{p}"] for p in parallel},
        "cpu_ms_per_image": {name: 1e3 * statistics.median(t) / n for name, t in cpu.items()},
        "pipeline": {
            w: {
                "samples_per_s": rate[f"workers={w}"],
                "per_worker": rate[f"workers={w}"] / max(w, 1),
                "per_worker_vs_plain_decode": ratio(f"workers={w}", "plain_decode", max(w, 1)),
                "loader_vs_plain_decode": ratio(
                    f"workers={w}", f"plain_decode_x{w}" if w > 1 else "plain_decode"
                ),
                # images per CPU-second, ours (workers and main process) over plain decoding
                "per_cpu_second_vs_plain_decode": cpu_ratio(f"workers={w}"),
            }
            for w in workers
        },
        "pil_in_process_vs_plain_decode": ratio("pil_workers=0", "plain_decode") if opencv else None,
        "config": {
            "jpeg_decoder": "opencv" if opencv else "pil",
            "image_size": image_size,
            "batch_size": batch_size,
            "samples": n,
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
    parser.add_argument("--jpeg_decoder", choices=["auto", "pil", "opencv"], default="auto")
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
        args.jpeg_decoder,
    )
    print(f"plain PIL decode: {result['plain_decode_samples_per_s']:8.1f} samples/s (1 process)")
    for p, r in result["plain_decode_parallel_samples_per_s"].items():
        print(f"plain PIL decode: {r:8.1f} samples/s ({p} processes)")
    print("CPU ms per image:", {k: round(v, 2) for k, v in result["cpu_ms_per_image"].items()})
    print(
        f"{'workers':>8} {'samples/s':>10} {'per worker':>11} {'per worker/plain':>17} "
        f"{'loader/plain':>13} {'per CPU s/plain':>16}"
    )
    for w, r in result["pipeline"].items():
        print(
            f"{w:>8} {r['samples_per_s']:10.1f} {r['per_worker']:11.1f} "
            f"{r['per_worker_vs_plain_decode']:17.2f} {r['loader_vs_plain_decode']:13.2f} "
            f"{r['per_cpu_second_vs_plain_decode'] or 0:16.2f}"
        )
    if result["pil_in_process_vs_plain_decode"] is not None:
        print(
            f"decoded by {result['config']['jpeg_decoder']}; the PIL decoder in process / plain: "
            f"{result['pil_in_process_vs_plain_decode']:.2f}"
        )
