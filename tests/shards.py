"""Tiny webdataset shards written in code for the data tests (good ones, and one of each kind of bad),
and the few settings and helpers those tests share."""

from __future__ import annotations

import io
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from superclip_pl.data import DataSource
from superclip_pl.data.decode import Collate
from superclip_pl.data.loader import StreamLoader
from superclip_pl.tokenizer import load_tokenizer

IMAGE_SIZE = 16


def wds(pattern: str, **columns) -> DataSource:
    return DataSource(path="webdataset", data_files=pattern, **columns)


def loader(stream, tokenizer_dir: str, num_workers: int = 0, batch_size: int = 4) -> StreamLoader:
    collate = Collate(load_tokenizer(tokenizer_dir), max_length=16)
    return StreamLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)


def image_of(index: int, size: tuple[int, int] = (12, 9)) -> Image.Image:
    rng = np.random.default_rng(index)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def caption_of(index: int) -> str:
    return f"a {['red', 'green', 'blue', 'yellow'][index % 4]} shape number {index}"


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_split(
    root: Path,
    samples: list[dict[str, bytes]],
    shard_sizes: list[int],
    split: str = "test",
    nshards_file=True,
) -> None:
    """One split of a CLIP_benchmark-layout set: <root>/<split>/{0..n-1}.tar (and nshards.txt);
    sample i is the files s{i:05d}.<ext> of ``samples[i]`` ({extension: bytes})."""
    assert sum(shard_sizes) == len(samples)
    (root / split).mkdir(parents=True)
    if nshards_file:
        (root / split / "nshards.txt").write_text(f"{len(shard_sizes)}\n")
    start = 0
    for s, size in enumerate(shard_sizes):
        members = [
            (f"s{i:05d}.{ext}", data) for i in range(start, start + size) for ext, data in samples[i].items()
        ]
        write_tar(root / split / f"{s}.tar", members)
        start += size


def sample(i: int, image: bytes | None, text: str | None) -> list[tuple[str, bytes]]:
    """The tar members of sample `i` (a member is left out when None)."""
    members = [(f"{i:06d}.png", image)] if image is not None else []
    return members + ([(f"{i:06d}.txt", text.encode())] if text is not None else [])


def write_shards(root: Path, num_shards: int, per_shard: int) -> dict[str, int]:
    """Good webdataset shards; returns {sample key: index}."""
    root.mkdir(parents=True, exist_ok=True)
    keys = {}
    for s in range(num_shards):
        indices = range(s * per_shard, (s + 1) * per_shard)
        write_tar(
            root / f"shard-{s:02d}.tar",
            [m for i in indices for m in sample(i, png(image_of(i)), caption_of(i))],
        )
        keys.update({f"shard-{s:02d}.tar/{i:06d}": i for i in indices})
    return keys


def bomb_png(side: int = 100_000) -> bytes:
    """A PNG whose header claims side x side pixels, with almost nothing behind it."""
    one_pixel = png(Image.new("L", (1, 1)))
    ihdr = b"IHDR" + side.to_bytes(4, "big") * 2 + one_pixel[24:29]  # new size, same depth/colour/...
    return one_pixel[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + one_pixel[33:]


BAD_SKIPS = {"corrupt_image": 2, "empty_caption": 3, "too_large": 1, "truncated_shard": 1}


def write_bad_shards(root: Path) -> set[str]:
    """Four shards with every kind of bad sample (counted in BAD_SKIPS); returns the good keys."""
    root.mkdir(parents=True, exist_ok=True)
    good = {0: range(0, 5), 1: range(16, 19), 2: range(20, 22), 3: range(30, 34)}
    shards = {
        s: [m for i in idx for m in sample(i, png(image_of(i)), caption_of(i))] for s, idx in good.items()
    }
    shards[1] = (
        sample(10, b"this is not an image", caption_of(10))  # corrupt_image
        + sample(11, png(image_of(11, (40, 30)))[:60], caption_of(11))  # corrupt_image (truncated)
        + sample(12, png(image_of(12)), "")  # empty_caption
        + sample(13, png(image_of(13)), "  \n\t")  # empty_caption
        + sample(14, png(image_of(14)), None)  # empty_caption (no txt member)
        + sample(15, bomb_png(), caption_of(15))  # too_large, seen from the header
        + shards[1]
    )
    shards[2] += sample(22, png(image_of(22, (64, 64))), caption_of(22))
    for s, members in shards.items():
        write_tar(root / f"shard-{s:02d}.tar", members)
    # cut shard 2 inside the image of its third sample: two good samples, then an unreadable tar
    data = (root / "shard-02.tar").read_bytes()
    (root / "shard-02.tar").write_bytes(data[: data.index(b"000022.png") + 512 + 300])
    return {f"shard-{s:02d}.tar/{i:06d}" for s, idx in good.items() for i in idx}


def encoded(image: Image.Image, extension: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format={"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[extension])
    return buf.getvalue()


MIXED_SKIPS = {"missing_image": 1, "corrupt_image": 1, "empty_caption": 1, "truncated_shard": 1}


def write_mixed_shards(root: Path) -> dict[str, bytes]:
    """Four shards whose samples mix .jpg/.jpeg/.png/.webp images (within and across shards), with one
    bad sample of each kind in MIXED_SKIPS and a truncated last shard; returns {good key: image bytes}."""
    root.mkdir(parents=True, exist_ok=True)
    extensions = ["jpg", "png", "webp", "jpeg"]
    good: dict[str, bytes] = {}

    def member(i: int, shard: int, ext: str, text: str | None = None, data: bytes | None = None):
        data = encoded(image_of(i, (20, 14)), ext) if data is None else data
        if text is None:
            good[f"shard-{shard:02d}.tar/{i:06d}"] = data
        members = [(f"{i:06d}.{ext}", data)]
        return members + [(f"{i:06d}.txt", (caption_of(i) if text is None else text).encode())]

    shards = {
        0: [m for i in range(6) for m in member(i, 0, extensions[i % 4])],
        1: [m for i in range(10, 13) for m in member(i, 1, extensions[(i + 1) % 4])]
        + [(f"{13:06d}.txt", caption_of(13).encode())]  # missing_image: a caption and no image
        + member(14, 1, "webp", caption_of(14), b"RIFF....WEBPgarbage")  # corrupt_image
        + member(15, 1, "png", "   ")  # empty_caption
        + [m for i in range(16, 18) for m in member(i, 1, extensions[i % 4])],
        2: [m for i in range(20, 24) for m in member(i, 2, extensions[(i + 2) % 4])],
        3: [m for i in range(30, 33) for m in member(i, 3, extensions[(i + 3) % 4])],
    }
    for s, members in shards.items():
        write_tar(root / f"shard-{s:02d}.tar", members)
    # cut the last shard inside the image of its third sample: two good samples, then an unreadable tar
    data = (root / "shard-03.tar").read_bytes()
    name = f"{32:06d}.{extensions[(32 + 3) % 4]}".encode()
    (root / "shard-03.tar").write_bytes(data[: data.index(name) + 512 + 100])
    del good["shard-03.tar/000032"]
    return good
