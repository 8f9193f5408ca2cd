"""The demo data generator: deterministic, captions true to the scenes, formats its consumers can read."""

import io
import json
import math
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from superclip_pl.shapes import dataset, scenes
from superclip_pl.shapes.dataset import EVAL_SETS
from superclip_pl.shapes.scenes import COLOURS, N_TEMPLATES, SHAPES, SIZE_WORDS

SMALL = ["--train-samples", "40", "--eval-samples", "20", "--retrieval-samples", "12", "--shard-size", "16"]


def _members(tar_path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of a webdataset shard."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    dataset.main(["--output-dir", str(out), *SMALL, "--num-workers", "1"])  # through the CLI
    return out


def test_same_seed_gives_identical_bytes_whatever_the_workers(data, tmp_path):
    from transformers import AutoTokenizer

    dataset.generate(tmp_path / "b", 40, 20, 12, shard_size=16, num_workers=2, progress=False)
    a, b = _tree(data), _tree(tmp_path / "b")
    data_files = [f for f in a if not f.startswith("tokenizer/")]
    assert sum(f.endswith(".tar") for f in data_files) == 3 + 3 * 2 + 1  # train, 3 classification, retrieval
    assert {f: a[f] for f in data_files} == {f: b[f] for f in data_files}
    # tokenizers' BPE trainer numbers the single-character tokens in hash-map order, so only the merges
    # (and so the token strings) are reproducible, not the ids
    tok_a, tok_b = (AutoTokenizer.from_pretrained(str(d / "tokenizer")) for d in (data, tmp_path / "b"))
    captions = [m["txt"].decode() for m in _members(data / "train/shard-00000.tar").values()]
    assert [tok_a.tokenize(c) for c in captions] == [tok_b.tokenize(c) for c in captions]


def test_another_seed_gives_other_images_and_captions(data, tmp_path):
    dataset.generate(tmp_path / "c", 40, 20, 12, seed=1, shard_size=16, num_workers=1, progress=False)
    a, b = _members(data / "train/shard-00000.tar"), _members(tmp_path / "c/train/shard-00000.tar")
    assert a.keys() == b.keys()
    assert sum(a[k]["png"] != b[k]["png"] for k in a) == len(a)
    assert sum(a[k]["txt"] != b[k]["txt"] for k in a) > 0.8 * len(a)


def test_train_shards_hold_every_sample_once(data):
    shards = sorted((data / "train").glob("*.tar"))
    assert [p.name for p in shards] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    keys = [k for p in shards for k, files in _members(p).items() if set(files) == {"png", "txt", "json"}]
    assert keys == [f"s{i:07d}" for i in range(40)]


def test_captions_bind_each_objects_colour_shape_and_size(data):
    for files in _members(data / "train/shard-00000.tar").values():
        caption, scene = files["txt"].decode(), json.loads(files["json"])
        assert 1 <= len(scene["objects"]) <= 3
        for obj in scene["objects"]:
            assert f"{obj['colour']} {obj['shape']}" in caption
            assert any(re.search(rf"\b{w}\b", caption) for w in SIZE_WORDS[obj["size"]])


def test_every_template_names_all_objects():
    rng = random.Random(0)
    captions = set()
    for i in range(60):
        scene = scenes.sample_scene(rng, 1 + i % 3)
        for t in range(N_TEMPLATES):
            caption = scenes.caption_scene(scene, rng, t)
            assert all(f"{o['colour']} {o['shape']}" in caption for o in scene["objects"]), caption
            captions.add(caption)
    assert len(captions) > 0.9 * 60 * N_TEMPLATES  # templates and wording really vary
    with pytest.raises(IndexError):  # N_TEMPLATES counts them all
        scenes.caption_scene(scene, rng, N_TEMPLATES)


def test_objects_are_apart_inside_the_border_and_drawn_in_their_colour():
    rng = random.Random(1)
    for _ in range(100):
        scene = scenes.sample_scene(rng, 3)
        objs = scene["objects"]
        lo, hi = scenes.EDGE - 1e-3, 1 - scenes.EDGE + 1e-3  # coordinates are rounded to 4 digits
        for a in objs:
            assert lo <= a["x"] - a["radius"] and a["x"] + a["radius"] <= hi
            assert lo <= a["y"] - a["radius"] and a["y"] + a["radius"] <= hi
            for b in objs:
                if a is not b:
                    assert math.dist((a["x"], a["y"]), (b["x"], b["y"])) > a["radius"] + b["radius"]
        img = scenes.render_scene(scene, image_size=128)
        for o in objs:  # a ring is hollow: look inside its band instead of at its centre
            dx = 0.8 * o["radius"] if o["shape"] == "ring" else 0.0
            pixel = img.getpixel((round((o["x"] + dx) * 128), round(o["y"] * 128)))
            assert math.dist(pixel, scenes.COLOUR_RGB[o["colour"]]) < 60, (o, pixel)


@pytest.mark.parametrize("name", list(EVAL_SETS))
def test_classification_sets_follow_clip_benchmark_layout(data, name):
    root = data / "eval" / name
    classes = (root / "classnames.txt").read_text().splitlines()
    assert classes == EVAL_SETS[name][0]
    templates = (root / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert len(templates) >= 3 and all("{c}" in t for t in templates)
    nshards = int((root / "test/nshards.txt").read_text())
    assert sorted(p.name for p in (root / "test").glob("*.tar")) == [f"{i}.tar" for i in range(nshards)]
    samples = [s for i in range(nshards) for s in _members(root / f"test/{i}.tar").values()]
    assert len(samples) == 20 and all(set(s) == {"png", "cls"} for s in samples)
    labels = [int(s["cls"]) for s in samples]
    assert set(labels) == set(range(min(len(classes), 20)))  # balanced: every class shows up
    images = [Image.open(io.BytesIO(s["png"])).convert("RGB") for s in samples]
    assert all(im.size == (64, 64) for im in images)
    if name == "colour":  # the label is the colour actually drawn: at least a small object's worth of it
        for im, label in zip(images, labels, strict=True):
            rgb = scenes.COLOUR_RGB[classes[label]]
            assert (np.linalg.norm(np.asarray(im, float) - rgb, axis=-1) < 40).sum() > 15, classes[label]


def test_retrieval_set_holds_several_captions_per_image(data):
    root = data / "eval/retrieval"
    assert (root / "dataset_type.txt").read_text().strip() == "retrieval"
    samples = _members(root / "test/0.tar").values()
    assert len(samples) == 12
    for s in samples:
        caps = s["txt"].decode().splitlines()
        assert len(caps) == dataset.RETRIEVAL_CAPTIONS == len(set(caps))


def test_train_shards_stream_through_hf_datasets(data):
    from datasets import load_dataset

    ds = load_dataset("webdataset", data_files=str(data / "train/*.tar"), split="train", streaming=True)
    rows = list(ds)
    assert len(rows) == 40
    assert {"png", "txt", "__key__"} <= set(rows[0])
    assert rows[0]["png"].size == (64, 64) and rows[0]["txt"]


def test_tokenizer_loads_and_keeps_eval_words_whole(data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    for word in [*SHAPES, *COLOURS, "one", "two", "three", "shapes", "photo", "background"]:
        assert len(tok.tokenize(word)) == 1, word
    ids = tok("a small red circle")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 6


def test_manifest_skips_a_matching_rerun_and_redoes_a_changed_one(tmp_path):
    out = tmp_path / "d"
    first = dataset.generate(out, 20, 8, 8, shard_size=8, num_workers=1, progress=False)
    assert first["counts"] == {"train": 20, "shape": 8, "colour": 8, "count": 8, "retrieval": 8}
    assert json.loads((out / "manifest.json").read_text()) == first
    stamp = (out / "train/shard-00000.tar").stat().st_mtime_ns
    dataset.generate(out, 20, 8, 8, shard_size=8, num_workers=1, progress=False)
    assert (out / "train/shard-00000.tar").stat().st_mtime_ns == stamp
    dataset.generate(out, 10, 8, 8, shard_size=8, num_workers=1, progress=False)
    assert len(list((out / "train").glob("*.tar"))) == 2  # the third, stale shard is gone
    assert json.loads((out / "manifest.json").read_text())["params"]["train_samples"] == 10
