"""The embedded demo data set: shape scenes (``scenes.py``) written as training and evaluation sets.

Everything about a sample follows from ``(seed, split, index)``, so chunks render in parallel and still
give identical bytes. ``generate`` writes webdataset training shards, CLIP_benchmark-layout evaluation
sets, a BPE tokenizer fitted to the captions and a manifest:

    python -m superclip_pl.shapes.dataset --output-dir data/shapes
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing as mp
import random
import tarfile
from pathlib import Path

from superclip_pl.shapes.scenes import (
    BACKGROUNDS,
    COLOURS,
    N_TEMPLATES,
    SHAPES,
    SIZES,
    caption_scene,
    render_scene,
    sample_scene,
)

# Bump when rendering or captions change, so that `make data` regenerates stale sets.
GENERATOR_VERSION = 2  # 2: deterministic tokenizer merges

RETRIEVAL_CAPTIONS = 3  # captions per retrieval image, each from a different template

# CLIP_benchmark sets: name -> (class names, zero-shot templates); words all occur in training captions
EVAL_SETS = {
    "shape": (
        list(SHAPES),
        [
            "a photo of a {c}.",
            "a {c}.",
            "a picture of a {c}.",
            "a simple drawing of a {c}.",
            "an image of a {c}.",
        ],
    ),
    "colour": (
        list(COLOURS),
        # no "a {c}": "a orange" would be a phrase the captions never use
        [
            "a photo of the {c} shape.",
            "the {c} object.",
            "a picture of the {c} shape.",
            "an image with one {c} shape.",
            "one {c} object on a plain background.",
        ],
    ),
    "count": (
        ["one shape", "two shapes", "three shapes"],
        [
            "a photo of {c}.",
            "an image with {c}.",
            "a picture of {c}.",
            "a simple drawing of {c}.",
            "{c} on a plain background.",
        ],
    ),
}


def _make_sample(kind: str, seed: int, index: int, image_size: int) -> tuple[str, dict[str, bytes]]:
    """One sample of ``kind`` (train, retrieval or an EVAL_SETS name) as webdataset members."""
    rng = random.Random(f"{seed}/{kind}/{index}")  # str seeds hash with sha512: stable across runs
    label = None
    if kind == "shape":
        label = index % len(SHAPES)  # cycle the classes, so every set is balanced
        scene = sample_scene(rng, 1, shape=SHAPES[label])
    elif kind == "colour":
        label = index % len(COLOURS)
        scene = sample_scene(rng, 1, colour=COLOURS[label])
    elif kind == "count":
        label = index % 3
        scene = sample_scene(rng, label + 1)
    elif kind == "retrieval":  # 2-3 objects, so that few captions fit more than one image
        scene = sample_scene(rng, rng.randint(2, 3))
    else:
        scene = sample_scene(rng)
    buf = io.BytesIO()
    render_scene(scene, image_size).save(buf, format="PNG", compress_level=1)  # flat images: 1 ~ 9 in size
    files = {"png": buf.getvalue()}
    if label is not None:
        files["cls"] = str(label).encode()
    elif kind == "retrieval":
        caps = [caption_scene(scene, rng, t) for t in rng.sample(range(N_TEMPLATES), RETRIEVAL_CAPTIONS)]
        files["txt"] = "\n".join(caps).encode()
    else:
        files["txt"] = caption_scene(scene, rng).encode()
        files["json"] = json.dumps(scene, sort_keys=True).encode()
    return f"s{index:07d}", files


def _render_chunk(task: tuple[str, int, int, int, int]) -> list[tuple[str, dict[str, bytes]]]:
    kind, seed, start, stop, image_size = task
    return [_make_sample(kind, seed, i, image_size) for i in range(start, stop)]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed metadata (mtime 0, no owner) keeps shards byte-identical
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def generate(
    output_dir: str | Path,
    train_samples: int = 60000,
    eval_samples: int = 1000,
    retrieval_samples: int = 1000,
    seed: int = 0,
    image_size: int = 64,
    shard_size: int = 5000,
    vocab_size: int = 512,
    num_workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write train shards, eval sets, tokenizer and ``manifest.json`` under ``output_dir``; return it.

    Does nothing when the manifest already records the same parameters (unless ``overwrite``).
    The output does not depend on ``num_workers``.
    """
    from tqdm.auto import tqdm

    from superclip_pl.shapes.bpe import train_bpe_tokenizer

    out = Path(output_dir)
    params = dict(
        generator_version=GENERATOR_VERSION,
        seed=seed,
        image_size=image_size,
        train_samples=train_samples,
        eval_samples=eval_samples,
        retrieval_samples=retrieval_samples,
        shard_size=shard_size,
        vocab_size=vocab_size,
    )
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and not overwrite:
        old = json.loads(manifest_path.read_text())
        if old.get("params") == params and (out / "tokenizer").is_dir():
            if progress:
                print(f"{out} is up to date (same parameters in its manifest.json; --overwrite redoes it)")
            return old
    manifest_path.unlink(missing_ok=True)  # no manifest until everything below is written

    # one entry per tar: its path and its render chunks (250 samples each, so the bar moves)
    shards: list[tuple[Path, list[tuple]]] = []
    sets = [("train", train_samples, out / "train", "shard-{:05d}.tar")]
    sets += [(name, eval_samples, out / "eval" / name / "test", "{:d}.tar") for name in EVAL_SETS]
    sets.append(("retrieval", retrieval_samples, out / "eval" / "retrieval" / "test", "{:d}.tar"))
    for kind, total, folder, pattern in sets:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.tar"):  # a smaller rerun must not leave old shards to be globbed
            stale.unlink()
        n_shards = max(1, math.ceil(total / shard_size))
        if kind != "train":
            (folder / "nshards.txt").write_text(f"{n_shards}\n")
        for s in range(n_shards):
            stop = min((s + 1) * shard_size, total)
            chunks = [
                (kind, seed, a, min(a + 250, stop), image_size) for a in range(s * shard_size, stop, 250)
            ]
            shards.append((folder / pattern.format(s), chunks))
    for name, (classes, templates) in EVAL_SETS.items():
        folder = out / "eval" / name
        (folder / "classnames.txt").write_text("\n".join(classes) + "\n")
        (folder / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    (out / "eval" / "retrieval" / "dataset_type.txt").write_text("retrieval\n")

    tasks = [c for _, chunks in shards for c in chunks]
    # fork: workers start at once, without re-importing the package (and torch) as spawn would
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    pool = mp.get_context(method).Pool(num_workers) if num_workers > 1 else None
    results = pool.imap(_render_chunk, tasks) if pool else map(_render_chunk, tasks)  # in task order
    captions: list[str] = []
    with tqdm(
        total=sum(t[3] - t[2] for t in tasks), desc="rendering", unit="img", disable=not progress
    ) as bar:
        try:
            for path, chunks in shards:
                tmp = path.with_suffix(".tmp")  # renamed when complete: an interrupted run leaves no bad tar
                with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                    for kind, *_ in chunks:
                        samples = next(results)
                        for key, files in samples:
                            for ext, data in files.items():
                                _add(tar, f"{key}.{ext}", data)
                            if kind == "train":
                                captions.append(files["txt"].decode())
                        bar.update(len(samples))
                tmp.rename(path)
        finally:
            if pool:
                pool.terminate()

    tokenizer = train_bpe_tokenizer(captions, out / "tokenizer", vocab_size=vocab_size)
    manifest = {
        "params": params,
        "counts": {kind: total for kind, total, _, _ in sets},
        "train_shards": max(1, math.ceil(train_samples / shard_size)),
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "sizes": list(SIZES),
        "backgrounds": list(BACKGROUNDS),
        "eval_sets": {
            **{k: {"type": "classification", "classes": v[0]} for k, v in EVAL_SETS.items()},
            "retrieval": {"type": "retrieval", "captions_per_image": RETRIEVAL_CAPTIONS},
        },
        "tokenizer_vocab_size": len(tokenizer),
        "versions": {p: _version(p) for p in ("superclip-pl", "pillow", "tokenizers")},
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    if progress:
        print(f"wrote {out}: {manifest['counts']}, tokenizer of {len(tokenizer)} tokens")
    return manifest


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="data/shapes", help="where to write (default: data/shapes)")
    parser.add_argument("--train-samples", type=int, default=60000)
    parser.add_argument("--eval-samples", type=int, default=1000, help="images per classification set")
    parser.add_argument("--retrieval-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=5000, help="samples per tar shard")
    parser.add_argument("--vocab-size", type=int, default=512, help="BPE tokenizer vocabulary size")
    parser.add_argument("--num-workers", type=int, default=2, help="rendering processes")
    parser.add_argument("--overwrite", action="store_true", help="regenerate even if the manifest matches")
    generate(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
