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
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from superclip_pl.shapes.captions import TEMPLATES, caption_scene
from superclip_pl.shapes.scenes import (
    BACKGROUNDS,
    DEFAULT_STYLE,
    STYLES,
    get_style,
    render_scene,
    sample_scene,
)

# Bump when rendering or captions change, so that `make data` regenerates stale sets.
# (The classic style's samples are byte-identical to version 2's.)
GENERATOR_VERSION = 3  # 2: deterministic tokenizer merges; 3: scene styles, the linear-probe set

RETRIEVAL_CAPTIONS = 3  # captions per retrieval image, each from a different template
PROBE = "probe"  # the linear-probe set: one object per picture, its shape the label; train and test splits

# zero-shot prompts per style; every word occurs in that style's training captions
_TEMPLATES = {
    "classic": {
        "shape": [
            "a photo of a {c}.",
            "a {c}.",
            "a picture of a {c}.",
            "a simple drawing of a {c}.",
            "an image of a {c}.",
        ],
        # no "a {c}": "a orange" would be a phrase the captions never use
        "colour": [
            "a photo of the {c} shape.",
            "the {c} object.",
            "a picture of the {c} shape.",
            "an image with one {c} shape.",
            "one {c} object on a plain background.",
        ],
        "count": [
            "a photo of {c}.",
            "an image with {c}.",
            "a picture of {c}.",
            "a simple drawing of {c}.",
            "{c} on a plain background.",
        ],
    },
    # prompt ensembles over the other attributes, in the captions' own words
    **{
        name: {
            "shape": [f"a {z} {c} {{c}}" for z in STYLES[name].sizes for c in STYLES[name].colours],
            "colour": [f"a {z} {{c}} {s}" for z in STYLES[name].sizes for s in STYLES[name].shapes],
            "size": [f"a {{c}} {c} {s}" for c in STYLES[name].colours for s in STYLES[name].shapes],
        }
        for name in ("small", "primary")
    },
}
COUNT_CLASSES = ("one shape", "two shapes", "three shapes")


def eval_sets(style: str = DEFAULT_STYLE) -> dict[str, tuple[list[str], list[str]]]:
    """The zero-shot classification sets of ``style``: name -> (class names, prompt templates)."""
    st = get_style(style)
    classes = {
        "shape": list(st.shapes),
        "colour": list(st.colours),
        "count": list(COUNT_CLASSES[: st.max_objects]),
        "size": list(st.sizes),
    }
    return {name: (classes[name], templates) for name, templates in _TEMPLATES[style].items()}


EVAL_SETS = eval_sets("classic")  # the classic style's sets, under their old name


def _make_sample(
    kind: str, seed: int, index: int, image_size: int, style: str
) -> tuple[str, dict[str, bytes]]:
    """One sample of ``kind`` (train, retrieval, probe/<split> or a zero-shot set) as webdataset members."""
    st = STYLES[style]
    rng = random.Random(f"{seed}/{kind}/{index}")  # str seeds hash with sha512: stable across runs
    label = None
    if kind in ("shape", f"{PROBE}/train", f"{PROBE}/test"):
        label = index % len(st.shapes)  # cycle the classes, so every set is balanced
        scene = sample_scene(rng, 1, st, shape=st.shapes[label])
    elif kind == "colour":
        label = index % len(st.colours)
        scene = sample_scene(rng, 1, st, colour=st.colours[label])
    elif kind == "count":
        label = index % st.max_objects
        scene = sample_scene(rng, label + 1, st)
    elif kind == "size":
        sizes = tuple(st.sizes)
        label = index % len(sizes)
        scene = sample_scene(rng, 1, st, size=sizes[label])
    elif kind == "retrieval":  # 2 or more objects, so that few captions fit more than one image
        scene = sample_scene(rng, rng.randint(2, st.max_objects), st)
    else:
        scene = sample_scene(rng, None, st)
    buf = io.BytesIO()
    render_scene(scene, image_size).save(buf, format="PNG", compress_level=1)  # flat images: 1 ~ 9 in size
    files = {"png": buf.getvalue()}
    if label is not None:
        files["cls"] = str(label).encode()
    elif kind == "retrieval":
        caps = [
            caption_scene(scene, rng, t, style)
            for t in rng.sample(range(TEMPLATES[style]), RETRIEVAL_CAPTIONS)
        ]
        files["txt"] = "\n".join(caps).encode()
    else:
        files["txt"] = caption_scene(scene, rng, None, style).encode()
        files["json"] = json.dumps(scene, sort_keys=True).encode()
    return f"s{index:07d}", files


def _render_chunk(task: tuple[str, int, int, int, int, str]) -> list[tuple[str, dict[str, bytes]]]:
    kind, seed, start, stop, image_size, style = task
    return [_make_sample(kind, seed, i, image_size, style) for i in range(start, stop)]


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
    style: str = DEFAULT_STYLE,
    image_size: int | None = None,
    probe_samples: int = 1000,
    shard_size: int = 5000,
    vocab_size: int = 512,
    num_workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write train shards, eval sets, tokenizer and ``manifest.json`` under ``output_dir``; return it.

    ``style`` names the scenes (``scenes.STYLES``); ``image_size`` defaults to the style's.
    ``probe_samples`` is the size of the linear-probe set's train split (its test split: ``eval_samples``).
    Does nothing when the manifest already records the same parameters (unless ``overwrite``).
    The output does not depend on ``num_workers``.
    """
    from tqdm.auto import tqdm

    from superclip_pl.shapes.bpe import train_bpe_tokenizer

    image_size = image_size or get_style(style).image_size
    zeroshot = eval_sets(style)
    out = Path(output_dir)
    params = dict(
        generator_version=GENERATOR_VERSION,
        seed=seed,
        style=style,
        image_size=image_size,
        train_samples=train_samples,
        eval_samples=eval_samples,
        retrieval_samples=retrieval_samples,
        probe_samples=probe_samples,
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
    sets += [(name, eval_samples, out / "eval" / name / "test", "{:d}.tar") for name in zeroshot]
    sets.append(("retrieval", retrieval_samples, out / "eval" / "retrieval" / "test", "{:d}.tar"))
    for split, total in (("train", probe_samples), ("test", eval_samples)):
        sets.append((f"{PROBE}/{split}", total, out / "eval" / PROBE / split, "{:d}.tar"))
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
                (kind, seed, a, min(a + 250, stop), image_size, style)
                for a in range(s * shard_size, stop, 250)
            ]
            shards.append((folder / pattern.format(s), chunks))
    for name, (classes, templates) in zeroshot.items():
        folder = out / "eval" / name
        (folder / "classnames.txt").write_text("\n".join(classes) + "\n")
        (folder / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    (out / "eval" / PROBE / "classnames.txt").write_text("\n".join(zeroshot["shape"][0]) + "\n")
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
        "style": style,
        "shapes": list(STYLES[style].shapes),
        "colours": list(STYLES[style].colours),
        "sizes": list(STYLES[style].sizes),
        "backgrounds": list(BACKGROUNDS),
        "eval_sets": {
            **{k: {"type": "classification", "classes": v[0]} for k, v in zeroshot.items()},
            "retrieval": {"type": "retrieval", "captions_per_image": RETRIEVAL_CAPTIONS},
            PROBE: {"type": "linear probe", "classes": zeroshot["shape"][0], "splits": ["train", "test"]},
        },
        "tokenizer_vocab_size": len(tokenizer),
        "versions": {p: _version(p) for p in ("superclip-pl", "pillow", "tokenizers")},
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    if progress:
        print(f"wrote {out}: {manifest['counts']}, tokenizer of {len(tokenizer)} tokens")
    return manifest


def _version(package: str) -> str:
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
    parser.add_argument(
        "--style", choices=sorted(STYLES), default=DEFAULT_STYLE, help="scene style (scenes.py)"
    )
    parser.add_argument("--image-size", type=int, help="image side in pixels (default: the style's)")
    parser.add_argument("--probe-samples", type=int, default=1000, help="train split of the linear-probe set")
    parser.add_argument("--shard-size", type=int, default=5000, help="samples per tar shard")
    parser.add_argument("--vocab-size", type=int, default=512, help="BPE tokenizer vocabulary size")
    parser.add_argument("--num-workers", type=int, default=2, help="rendering processes")
    parser.add_argument("--overwrite", action="store_true", help="regenerate even if the manifest matches")
    generate(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
