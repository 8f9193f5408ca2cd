"""The demo data generator: deterministic, captions true to the scenes, formats its consumers can read."""

import hashlib
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
from superclip_pl.shapes.captions import TEMPLATES, caption_scene
from superclip_pl.shapes.scenes import STYLES

SMALL = ["--train-samples", "40", "--eval-samples", "20", "--retrieval-samples", "12", "--shard-size", "16"]
SMALL += ["--probe-samples", "24"]
DEMO = STYLES[scenes.DEFAULT_STYLE]  # the default style (primary)


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

    dataset.generate(
        tmp_path / "b", 40, 20, 12, probe_samples=24, shard_size=16, num_workers=2, progress=False
    )
    a, b = _tree(data), _tree(tmp_path / "b")
    data_files = [f for f in a if not f.startswith("tokenizer/")]
    # train, 3 zero-shot classification sets (shape, colour, size), retrieval, the probe's two splits
    assert sum(f.endswith(".tar") for f in data_files) == 3 + 3 * 2 + 1 + 2 + 2
    assert {f: a[f] for f in data_files} == {f: b[f] for f in data_files}
    # tokenizers' BPE trainer numbers the single-character tokens in hash-map order, so only the merges
    # (and so the token strings) are reproducible, not the ids
    tok_a, tok_b = (AutoTokenizer.from_pretrained(str(d / "tokenizer")) for d in (data, tmp_path / "b"))
    captions = [m["txt"].decode() for m in _members(data / "train/shard-00000.tar").values()]
    assert [tok_a.tokenize(c) for c in captions] == [tok_b.tokenize(c) for c in captions]


def test_another_seed_gives_other_images_and_captions(data, tmp_path):
    dataset.generate(
        tmp_path / "c", 40, 20, 12, seed=1, probe_samples=24, shard_size=16, num_workers=1, progress=False
    )
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
        assert 1 <= len(scene["objects"]) <= DEMO.max_objects
        for obj in scene["objects"]:
            assert obj["shape"] in DEMO.shapes and obj["colour"] in DEMO.colours
            assert f"{obj['size']} {obj['colour']} {obj['shape']}" in caption


def test_the_classic_style_gives_the_bytes_of_generator_version_2():
    """The first demo set (its ablation numbers are published) can still be made: these samples'
    digest is the one version 2 of the generator gave."""
    digest = hashlib.sha256()
    for kind in ("train", "shape", "colour", "count", "retrieval"):
        for i in range(3):
            _, files = dataset._make_sample(kind, 0, i, 64, "classic")
            for ext in sorted(files):
                digest.update(files[ext])
    assert digest.hexdigest() == "289843ca2aa6ecdc9a734509eb40f7b6479cd735944abd42c60e968a0c3e6f46"


@pytest.mark.parametrize("style", ["small", "primary"])
def test_the_demo_styles_speak_a_word_level_vocabulary_of_about_20_words(style):
    rng, st = random.Random(0), STYLES[style]
    words = set()
    for _ in range(500):
        words |= set(caption_scene(scenes.sample_scene(rng, None, st), rng, None, style).split())
    named = {*st.shapes, *st.colours, *st.sizes}
    assert named <= words and len(words) <= 30


@pytest.mark.parametrize("style", list(STYLES))
def test_every_template_names_all_objects(style):
    rng, st = random.Random(0), STYLES[style]
    captions = set()
    for i in range(60):
        scene = scenes.sample_scene(rng, 1 + i % st.max_objects, st)
        for t in range(TEMPLATES[style]):
            caption = caption_scene(scene, rng, t, style)
            assert all(f"{o['colour']} {o['shape']}" in caption for o in scene["objects"]), caption
            assert all(
                any(re.search(rf"\b{w}\b", caption) for w in st.size_words[o["size"]])
                for o in scene["objects"]
            )
            captions.add(caption)
    assert len(captions) > 0.7 * 60 * TEMPLATES[style]  # templates and wording really vary
    with pytest.raises(IndexError):  # TEMPLATES counts them all
        caption_scene(scene, rng, TEMPLATES[style], style)


@pytest.mark.parametrize("style", list(STYLES))
def test_objects_are_apart_inside_the_border_and_drawn_in_their_colour(style):
    rng, st = random.Random(1), STYLES[style]
    for _ in range(100):
        scene = scenes.sample_scene(rng, st.max_objects, st)
        objs = scene["objects"]
        lo, hi = st.edge - 1e-3, 1 - st.edge + 1e-3  # coordinates are rounded to 4 digits
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
            assert math.dist(pixel, scenes.object_rgb(o)) < 60, (o, pixel)
            assert math.dist(scenes.object_rgb(o), scenes.COLOUR_RGB[o["colour"]]) <= 3**0.5 * st.tint


@pytest.mark.parametrize("name", list(dataset.eval_sets(DEMO.name)))
def test_classification_sets_follow_clip_benchmark_layout(data, name):
    root = data / "eval" / name
    classes = (root / "classnames.txt").read_text().splitlines()
    assert classes == dataset.eval_sets(DEMO.name)[name][0]
    templates = (root / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates and all("{c}" in t for t in templates)
    nshards = int((root / "test/nshards.txt").read_text())
    assert sorted(p.name for p in (root / "test").glob("*.tar")) == [f"{i}.tar" for i in range(nshards)]
    samples = [s for i in range(nshards) for s in _members(root / f"test/{i}.tar").values()]
    assert len(samples) == 20 and all(set(s) == {"png", "cls"} for s in samples)
    labels = [int(s["cls"]) for s in samples]
    assert set(labels) == set(range(min(len(classes), 20)))  # balanced: every class shows up
    images = [Image.open(io.BytesIO(s["png"])).convert("RGB") for s in samples]
    assert all(im.size == (32, 32) for im in images)
    if name == "colour":  # the label is the colour actually drawn: at least a small object's worth of it
        for im, label in zip(images, labels, strict=True):
            rgb = scenes.COLOUR_RGB[classes[label]]
            near = 40 + 3**0.5 * DEMO.tint  # the object's tint moves it this far at most
            assert (np.linalg.norm(np.asarray(im, float) - rgb, axis=-1) < near).sum() > 15, classes[label]


def test_the_probe_set_has_train_and_test_splits_labelled_by_shape(data):
    from superclip_pl.eval.sets import load_classification_set

    root = data / "eval" / dataset.PROBE
    assert (root / "classnames.txt").read_text().splitlines() == list(DEMO.shapes)
    train, test = (list(load_classification_set(str(root), split)) for split in ("train", "test"))
    assert (len(train), len(test)) == (24, 20)
    assert {s.label for s in train} == {s.label for s in test} == set(range(len(DEMO.shapes)))
    pixels = lambda samples: {np.asarray(s.image).tobytes() for s in samples}  # noqa: E731
    assert not pixels(train) & pixels(test)  # the splits are drawn apart


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
    assert rows[0]["png"].size == (32, 32) and rows[0]["txt"]


def test_tokenizer_loads_and_keeps_eval_words_whole(data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    for classes, templates in dataset.eval_sets(DEMO.name).values():  # every word of every prompt
        for prompt in (t.format(c=c) for t in templates for c in classes):
            assert all(len(tok.tokenize(word)) == 1 for word in prompt.split()), prompt
    ids = tok("a small red circle")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 6


def test_manifest_skips_a_matching_rerun_and_redoes_a_changed_one(tmp_path):
    out = tmp_path / "d"
    first = dataset.generate(out, 20, 8, 8, probe_samples=8, shard_size=8, num_workers=1, progress=False)
    assert first["counts"] == {
        "train": 20,
        "shape": 8,
        "colour": 8,
        "size": 8,
        "retrieval": 8,
        "probe/train": 8,
        "probe/test": 8,
    }
    assert json.loads((out / "manifest.json").read_text()) == first
    stamp = (out / "train/shard-00000.tar").stat().st_mtime_ns
    dataset.generate(out, 20, 8, 8, probe_samples=8, shard_size=8, num_workers=1, progress=False)
    assert (out / "train/shard-00000.tar").stat().st_mtime_ns == stamp
    dataset.generate(out, 10, 8, 8, probe_samples=8, shard_size=8, num_workers=1, progress=False)
    assert len(list((out / "train").glob("*.tar"))) == 2  # the third, stale shard is gone
    assert json.loads((out / "manifest.json").read_text())["params"]["train_samples"] == 10
