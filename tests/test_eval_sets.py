"""Evaluation-set readers on tiny sets written here in the CLIP_benchmark layout, and HF ClassLabel sets."""

import io
from pathlib import Path

import datasets
import pytest
from huggingface_hub.errors import EntryNotFoundError
from PIL import Image

from shards import write_split
from superclip_pl.eval import sets
from superclip_pl.eval.hfsets import load_hf_classification_set
from superclip_pl.eval.sets import load_classification_set, load_retrieval_set

CLASSES = ["cat", "dog", "eel"]
EXTENSIONS = [("webp", "WEBP"), ("png", "PNG"), ("jpg", "JPEG")]


def image_bytes(i: int, ext: int = 1) -> bytes:
    """An image whose width 4 + i identifies sample i, whatever the (lossy) format."""
    buf = io.BytesIO()
    Image.new("RGB", (4 + i, 4), (10 * i, 0, 0)).save(buf, format=EXTENSIONS[ext][1], lossless=True)
    return buf.getvalue()


def write_set(
    root: Path,
    samples: list[dict[str, bytes]],
    shard_sizes: list[int],
    split="test",
    classnames=CLASSES,
    templates=None,
    nshards_file=True,
) -> Path:
    """CLIP_benchmark layout: <root>/classnames.txt, templates, <split>/{0..n-1}.tar, <split>/nshards.txt."""
    write_split(root, samples, shard_sizes, split, nshards_file)
    if classnames is not None:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates is not None:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return root


def classification_samples(n: int, labels=None) -> list[dict[str, bytes]]:
    labels = labels or [i % 3 for i in range(n)]
    return [{EXTENSIONS[i % 3][0]: image_bytes(i, i % 3), "cls": f"{labels[i]}\n".encode()} for i in range(n)]


def test_classification_set_reads_the_clip_benchmark_layout(tmp_path):
    templates = ["a photo of a {c}.", "a {c} drawing."]
    root = write_set(tmp_path / "set", classification_samples(10), [4, 3, 3], templates=templates)
    ds = load_classification_set(str(root))
    assert ds.classnames == CLASSES and ds.templates == templates
    samples = list(ds)
    assert [s.key for s in samples] == [f"s{i:05d}" for i in range(10)]
    assert [s.label for s in samples] == [i % 3 for i in range(10)]
    assert [s.image.size[0] - 4 for s in samples] == list(range(10))  # each image read with its own key
    assert {s.image.mode for s in samples} == {"RGB"}
    assert len({s.index for s in samples}) == 10 and ds.skipped == 0


@pytest.mark.parametrize("shard_sizes", [[5, 4], [4, 3, 2]], ids=["whole-shards", "every-other-sample"])
@pytest.mark.parametrize("nshards_file", [True, False])
def test_two_ranks_cover_each_sample_exactly_once(tmp_path, shard_sizes, nshards_file):
    root = str(write_set(tmp_path / "set", classification_samples(9), shard_sizes, nshards_file=nshards_file))
    whole = {s.key: s.index for s in load_classification_set(root)}
    parts = [{s.key: s.index for s in load_classification_set(root, rank=r, world_size=2)} for r in (0, 1)]
    assert parts[0] and parts[1]
    assert not set(parts[0]) & set(parts[1])
    assert parts[0] | parts[1] == whole  # same keys, and the same index for a key whatever the world size


def test_retrieval_set_skips_and_counts_bad_samples(tmp_path, caplog):
    samples = [
        {"jpg": image_bytes(i, 2), "txt": f"caption {i} a\ncaption {i} b\n".encode()} for i in range(6)
    ]
    samples[2]["txt"] = b"\n \n"  # no captions
    samples[4]["jpg"] = b"not an image"
    root = str(write_set(tmp_path / "coco", samples, [3, 3], classnames=None))
    ds = load_retrieval_set(root)
    got = {s.key: s.captions for s in ds}
    assert got == {f"s{i:05d}": [f"caption {i} a", f"caption {i} b"] for i in (0, 1, 3, 5)}
    assert ds.skipped == 2
    assert "skipped 2 unreadable samples" in caplog.text and "'s00002': no captions" in caplog.text
    parts = [[s.key for s in load_retrieval_set(root, rank=r, world_size=2)] for r in (0, 1)]
    assert sorted(parts[0] + parts[1]) == sorted(got)


def test_missing_templates_file_gives_none(tmp_path):
    root = write_set(tmp_path / "set", classification_samples(3), [3])
    assert load_classification_set(str(root)).templates is None


def test_missing_classnames_names_the_file(tmp_path):
    root = write_set(tmp_path / "set", classification_samples(3), [3], classnames=None)
    with pytest.raises(FileNotFoundError, match=r"set/classnames\.txt not found"):
        load_classification_set(str(root))


def test_label_outside_the_classes_names_shard_key_and_values(tmp_path):
    root = write_set(tmp_path / "set", classification_samples(4, labels=[0, 1, 5, 2]), [2, 2])
    with pytest.raises(
        ValueError,
        match=r"test/1\.tar sample 's00002': label 5 is outside the 3 classes of .*classnames\.txt",
    ):
        list(load_classification_set(str(root)))


def test_bad_roots_and_missing_shards_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a directory nor a hub id"):
        load_classification_set(str(tmp_path / "nowhere" / "deeper"))
    (tmp_path / "empty" / "test").mkdir(parents=True)
    (tmp_path / "empty" / "classnames.txt").write_text("a\nb\n")
    with pytest.raises(FileNotFoundError, match=r"no shards found at .*empty/test/"):
        load_classification_set(str(tmp_path / "empty"))
    root = write_set(tmp_path / "set", classification_samples(3), [3])
    (root / "test" / "nshards.txt").write_text("2\n")  # claims a shard that is not there
    with pytest.raises(FileNotFoundError, match=r"test/1\.tar not found"):
        load_classification_set(str(root))


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """hf_hub_download replaced by a lookup in local repo folders; returns (repos dir, downloaded names)."""
    repos, downloaded = tmp_path / "hub", []

    def download(repo_id, filename, repo_type=None, **kwargs):
        assert repo_type == "dataset"
        path = repos / repo_id / filename
        if not path.is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        downloaded.append(filename)
        return str(path)

    monkeypatch.setattr(sets, "hf_hub_download", download)
    return repos, downloaded


def test_hub_set_downloads_metadata_and_only_this_ranks_shards(fake_hub):
    repos, downloaded = fake_hub
    write_set(repos / "clip-benchmark" / "wds_fake", classification_samples(6), [3, 3], templates=["{c}!"])
    ds = load_classification_set("clip-benchmark/wds_fake", rank=1, world_size=2)
    assert ds.classnames == CLASSES and ds.templates == ["{c}!"]
    assert [s.key for s in ds] == ["s00003", "s00004", "s00005"]
    assert "test/1.tar" in downloaded and "test/0.tar" not in downloaded


def test_hub_retrieval_set_and_missing_nshards(fake_hub):
    repos, _ = fake_hub
    samples = [{"png": image_bytes(i), "txt": f"c{i}".encode()} for i in range(3)]
    write_set(repos / "clip-benchmark" / "wds_caps", samples, [3], classnames=None)
    assert [s.captions for s in load_retrieval_set("clip-benchmark/wds_caps")] == [["c0"], ["c1"], ["c2"]]
    write_set(repos / "me" / "no_count", samples, [3], nshards_file=False)
    with pytest.raises(FileNotFoundError, match=r"no shards found at hf://datasets/me/no_count/test/"):
        load_retrieval_set("me/no_count")


@pytest.fixture
def classlabel_parquet(tmp_path) -> str:
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "label": datasets.ClassLabel(names=["ant", "bee"]),
            "note": datasets.Value("string"),
        }
    )
    rows = {
        "img": [Image.new("RGB", (4 + i, 4)) for i in range(5)],
        "label": [0, 1, 1, 0, 1],
        "note": [f"n{i}" for i in range(5)],
    }
    path = tmp_path / "beans.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return str(path)


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_classlabel_set_takes_names_from_features(classlabel_parquet, streaming, tmp_path):
    kwargs = {"data_files": {"test": classlabel_parquet}, "streaming": streaming, "cache_dir": str(tmp_path)}
    ds = load_hf_classification_set("parquet", **kwargs)
    assert ds.classnames == ["ant", "bee"] and ds.templates is None
    samples = list(ds)
    assert [(s.image.size[0] - 4, s.label) for s in samples] == [(0, 0), (1, 1), (2, 1), (3, 0), (4, 1)]
    parts = [
        [s.index for s in load_hf_classification_set("parquet", rank=r, world_size=2, **kwargs)]
        for r in (0, 1)
    ]
    assert parts == [[0, 2, 4], [1, 3]]


def test_hf_set_without_classlabel_is_rejected(classlabel_parquet, tmp_path):
    with pytest.raises(ValueError, match="column 'note' is not a ClassLabel"):
        load_hf_classification_set(
            "parquet", data_files={"test": classlabel_parquet}, label_column="note", cache_dir=str(tmp_path)
        )
