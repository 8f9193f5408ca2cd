"""Real shards and mixtures: webdataset samples with different image extensions, image candidates,
weighted source mixtures (proportions, seeding, exact resume), caption columns with probabilities."""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch
from PIL import Image

from shards import (
    IMAGE_SIZE,
    MIXED_SKIPS,
    caption_of,
    image_of,
    loader,
    png,
    sample,
    wds,
    write_mixed_shards,
    write_shards,
    write_tar,
)
from superclip_pl.data import DataSource
from superclip_pl.data.build import image_text_stream, role_stream
from superclip_pl.data.mixture import MixtureStream, source_names
from superclip_pl.transforms import eval_transform

# ---------------------------------------------------------------- shards that mix image extensions


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory) -> tuple[str, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("mixed")
    return str(root / "*.tar"), write_mixed_shards(root)


def test_hf_webdataset_builder_refuses_these_shards(mixed_shards):
    # the problem this reader solves: HF infers one schema from the first 5 samples
    import datasets

    with pytest.raises(ValueError, match="don't share the same prefix or the same types"):
        datasets.load_dataset("webdataset", data_files=mixed_shards[0], split="train", streaming=True)


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_shards_with_mixed_image_extensions_stream_like_uniform_ones(
    mixed_shards, tokenizer_dir, num_workers
):
    pattern, good = mixed_shards
    stream = image_text_stream(wds(pattern), image_size=IMAGE_SIZE, training=False, normalized=False)
    assert set(stream.decoder.columns.images) >= {"jpg", "jpeg", "png", "webp"}  # auto-detected
    keys, skipped = [], Counter()
    for batch in loader(stream, tokenizer_dir, num_workers=num_workers, batch_size=3):
        assert batch["pixel_values"].dtype == torch.uint8
        for key, pixels in zip(batch["keys"], batch["pixel_values"], strict=True):
            expected = eval_transform(IMAGE_SIZE, normalized=False)(Image.open(io.BytesIO(good[key])))
            assert torch.equal(pixels, expected)  # each sample's own image, whatever its extension
        keys += batch["keys"]
        skipped.update(batch["skipped"])
    assert sorted(keys) == sorted(good) and dict(skipped) == MIXED_SKIPS


def test_an_image_column_list_takes_the_first_present(tmp_path):
    members = [("000000.png", png(image_of(0))), ("000000.jpg", b"not read"), ("000000.txt", b"both")]
    members += sample(1, None, "a caption without image") + [("000002.jpg", png(image_of(2)))]
    members += [("000002.txt", b"jpg only")]
    write_tar(tmp_path / "s.tar", members)
    source = wds(str(tmp_path / "s.tar"), image_column=["png", "jpg"])
    samples = list(image_text_stream(source, image_size=IMAGE_SIZE, training=False))
    assert [s["text"] for s in samples] == ["both", "jpg only"]
    torch.testing.assert_close(samples[0]["pixel_values"], eval_transform(IMAGE_SIZE)(image_of(0)))
    assert sum((Counter(s["skipped"]) for s in samples), Counter()) == {"missing_image": 1}
    with pytest.raises(ValueError, match=r"data.train.image_column: \['webp', 'gif'\] is not a column"):
        image_text_stream(wds(str(tmp_path / "s.tar"), image_column=["webp", "gif"]))


# ---------------------------------------------------------------- weighted mixtures of sources


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> tuple[str, str]:
    """Source a: 4 shards x 7 samples; source b: 2 x 5, its shards named b-*.tar (distinct keys)."""
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    write_shards(a, num_shards=4, per_shard=7)
    write_shards(b, num_shards=2, per_shard=5)
    for shard in b.glob("*.tar"):
        shard.rename(b / f"b-{shard.name}")
    return str(a / "*.tar"), str(b / "*.tar")


def mixture(two_sources, weights=(0.8, 0.2), seed=0, rank=0, world_size=1, num_workers=0) -> MixtureStream:
    sources = [
        wds(pattern, name=name, weight=w) for pattern, name, w in zip(two_sources, "ab", weights, strict=True)
    ]
    stream, names = role_stream(
        sources,
        "train",
        training=True,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        image_size=IMAGE_SIZE,
        shuffle_buffer=4,
        seed=seed,
    )
    assert names == ["a", "b"] and isinstance(stream, MixtureStream)
    return stream


def take(batches, n: int) -> list[dict]:
    it = iter(batches)
    return [next(it) for _ in range(n)]


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def test_a_mixture_draws_its_sources_in_their_weights_seeded(two_sources, tokenizer_dir):
    batches = take(loader(mixture(two_sources), tokenizer_dir, batch_size=50), 40)  # 2,000 samples
    keys = keys_of(batches)
    share_b = sum(k.startswith("b-") for k in keys) / len(keys)
    assert len(keys) == 2000 and abs(share_b - 0.2) < 0.03
    # the batches count what they carry per source, as data/samples_read/<name> adds up
    counts = Counter()
    for batch in batches:
        counts.update({name: read for name, (read, _) in batch["counts"].items()})
    assert counts == {"a": round(2000 * (1 - share_b)), "b": round(2000 * share_b)}
    again = keys_of(take(loader(mixture(two_sources), tokenizer_dir, batch_size=50), 40))
    other = keys_of(take(loader(mixture(two_sources, seed=1), tokenizer_dir, batch_size=50), 40))
    assert keys == again and keys != other  # seeded, reproducible


def test_every_sample_of_a_mixture_comes_from_its_source_and_runs_on(two_sources):
    stream = mixture(two_sources, weights=(1, 1))
    samples = [s for s, _ in zip(stream, range(300), strict=False)]
    by_source = Counter(s["source"] for s in samples)
    assert set(by_source) == {"a", "b"} and abs(by_source["b"] / 300 - 0.5) < 0.1
    # b has 10 samples: drawn ~150 times, it went through many epochs (infinite training stream)
    keys_b = Counter(s["key"] for s in samples if s["source"] == "b")
    assert len(keys_b) == 10 and min(keys_b.values()) >= 10


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_a_mixture_resumes_exactly_mid_way(two_sources, tokenizer_dir, num_workers):
    def fresh():
        return loader(mixture(two_sources, weights=(0.6, 0.4)), tokenizer_dir, num_workers, batch_size=3)

    full = take(fresh(), 24)
    assert {k[:2] == "b-" for k in keys_of(full[:5])} == {True, False}  # stopped mid-mixture
    for k in (5, 13):
        first = fresh()
        before = take(first, k)
        second = fresh()
        second.load_state_dict(first.state_dict())
        assert keys_of(before + take(second, 24 - k)) == keys_of(full)  # the very same samples


def test_mixture_settings_are_checked():
    with pytest.raises(ValueError, match=r"data.train\[1\].weight: 0 must be > 0"):
        source_names([DataSource("webdataset"), DataSource("webdataset", weight=0)])
    with pytest.raises(ValueError, match="the source name 'x' is used twice"):
        source_names([DataSource("webdataset", name="x"), DataSource("webdataset", name="x")])
    assert source_names([DataSource("w", weight=3), DataSource("w", name="r")]) == (
        ["source0", "r"],
        [0.75, 0.25],
    )


# ---------------------------------------------------------------- caption columns with probabilities


def write_two_caption_columns(path, n: int = 200, empty_every: int = 0) -> None:
    members = []
    for i in range(n):
        recaption = "" if empty_every and i % empty_every == 0 else f"a long re-caption of image {i}"
        members += [(f"{i:06d}.png", png(image_of(i, (4, 4)))), (f"{i:06d}.txt", caption_of(i).encode())]
        members += [(f"{i:06d}.recaption.txt", recaption.encode())]
    write_tar(path, members)


def test_caption_columns_are_drawn_in_their_probabilities_seeded(tmp_path, tokenizer_dir):
    write_two_caption_columns(tmp_path / "s.tar")
    source = wds(str(tmp_path / "s.tar"), text_column={"txt": 0.7, "recaption.txt": 0.3})

    def texts(seed: int) -> list[str]:
        stream = image_text_stream(source, image_size=IMAGE_SIZE, seed=seed, shuffle_buffer=16)
        return [s["text"] for s, _ in zip(stream, range(2000), strict=False)]

    drawn = texts(0)
    share = sum(t.startswith("a long re-caption") for t in drawn) / len(drawn)
    assert abs(share - 0.3) < 0.03
    assert drawn == texts(0) and drawn != texts(1)  # seeded, reproducible
    evaluation = image_text_stream(source, image_size=IMAGE_SIZE, training=False)
    assert all(s["text"] == caption_of(i) for i, s in enumerate(evaluation))  # the first column


def test_an_empty_drawn_caption_column_falls_back_and_is_counted(tmp_path, tokenizer_dir):
    write_two_caption_columns(tmp_path / "s.tar", n=100, empty_every=2)  # half the re-captions empty
    source = wds(str(tmp_path / "s.tar"), text_column={"txt": 0.5, "recaption.txt": 0.5})
    stream = image_text_stream(source, image_size=IMAGE_SIZE, infinite=False, shuffle_buffer=10)
    samples = list(stream)
    assert len(samples) == 100 and all(s["text"] for s in samples)  # none skipped
    fallbacks = [s for s in samples if s["fallback"]]
    assert 10 < len(fallbacks) < 40  # ~ 50 empty re-captions x 0.5 drawn
    assert all(s["text"] == caption_of(int(s["key"].split("/")[1])) for s in fallbacks)
    again = image_text_stream(source, image_size=IMAGE_SIZE, infinite=False, shuffle_buffer=10)
    batches = list(loader(again, tokenizer_dir, batch_size=10))
    assert sum(b["counts"][None][1] for b in batches) == len(fallbacks)


def test_caption_column_probabilities_are_checked(tmp_path):
    write_two_caption_columns(tmp_path / "s.tar", n=3)
    with pytest.raises(ValueError, match=r"data.train.text_column: \{'txt': -1\} must map caption columns"):
        image_text_stream(wds(str(tmp_path / "s.tar"), text_column={"txt": -1}))
    with pytest.raises(ValueError, match=r"data.train.text_column: 'recap' is not a column .*first samples"):
        image_text_stream(wds(str(tmp_path / "s.tar"), text_column={"txt": 1, "recap": 1}))


@pytest.mark.slow
def test_a_mixture_resumes_exactly_on_two_ddp_ranks(tmp_path, bad_shards, tokenizer_dir):
    """Two gloo ranks, one worker each, mixing the bad shards (4) with 3 more that do not split over
    2 ranks; stopped at step 4 and resumed, each rank reads what the uninterrupted run read."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    other = tmp_path / "b"
    write_shards(other, num_shards=3, per_shard=5)
    for shard in other.glob("*.tar"):
        shard.rename(other / f"b-{shard.name}")
    script = Path(__file__).with_name("distributed_data.py")
    data_files = f"{bad_shards[0]},{other / '*.tar'}"

    def run(name: str, max_steps: int, ckpt_path: Path | None = None) -> list[dict]:
        out = tmp_path / name
        out.mkdir()
        args = [sys.executable, str(script), data_files, tokenizer_dir, str(out), str(max_steps)]
        subprocess.run(args + ([str(ckpt_path)] if ckpt_path else []), check=True, timeout=600)
        return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]

    full = run("full", 8)
    rest = run("rest", 8, tmp_path / "full" / "checkpoints" / "epoch=0-step=4.ckpt")
    for r in range(2):
        assert full[r]["keys"][:12] + rest[r]["keys"] == full[r]["keys"]  # keys compared
        assert {k[:2] == "b-" for k in full[r]["keys"][:12]} == {True, False}  # stopped mid-mixture
        assert rest[r]["sources"] == full[r]["sources"] and rest[r]["skipped"] == full[r]["skipped"]
        assert sum(full[r]["sources"].values()) == full[r]["seen"]  # per-source counts add up
