"""Streaming image-caption data: sources, decoding, sharding over ranks and workers, bad samples."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from shards import (
    BAD_SKIPS,
    IMAGE_SIZE,
    bomb_png,
    caption_of,
    image_of,
    loader,
    png,
    sample,
    wds,
    write_shards,
    write_tar,
)
from superclip_pl.data import DataSource
from superclip_pl.data.build import image_text_stream
from superclip_pl.data.datamodule import per_device_batch_size
from superclip_pl.data.decode import caption_candidates
from superclip_pl.data.skips import check_skip_fraction
from superclip_pl.data.sources import sharding_advice
from superclip_pl.transforms import eval_transform

# ---------------------------------------------------------------- sources decode to the right tensors


def assert_matches_originals(samples: list[dict], index_of: dict[str, int]) -> None:
    transform = eval_transform(IMAGE_SIZE)
    assert sorted(s["key"] for s in samples) == sorted(index_of)
    for s in samples:
        i = index_of[s["key"]]
        assert s["text"] == caption_of(i)
        torch.testing.assert_close(s["pixel_values"], transform(image_of(i)), rtol=0, atol=0)


def test_webdataset_shards_decode_to_the_transformed_originals(good_shards):
    pattern, keys = good_shards
    stream = image_text_stream(wds(pattern), image_size=IMAGE_SIZE, training=False)
    samples = list(stream)
    assert [s["key"] for s in samples] == list(keys)  # evaluation keeps the stream order
    assert_matches_originals(samples, keys)


def test_a_finite_stream_is_read_whole_on_every_pass(good_shards, tokenizer_dir):
    pattern, keys = good_shards
    stream = image_text_stream(wds(pattern), image_size=IMAGE_SIZE, training=False)
    validation = loader(stream, tokenizer_dir, num_workers=0)  # in-process: the same stream object
    passes = [[k for batch in validation for k in batch["keys"]] for _ in range(2)]
    assert passes[0] == passes[1] == list(keys)


def test_parquet_written_by_datasets_decodes(tmp_path):
    from datasets import Dataset
    from datasets import Image as ImageFeature

    indices = list(range(7))
    rows = {
        "image": [{"bytes": png(image_of(i)), "path": None} for i in indices],
        "caption": [caption_of(i) for i in indices],
        "key": [f"k{i}" for i in indices],
    }
    Dataset.from_dict(rows).cast_column("image", ImageFeature()).to_parquet(str(tmp_path / "a.parquet"))
    source = DataSource(path="parquet", data_files=str(tmp_path / "*.parquet"))
    samples = list(image_text_stream(source, image_size=IMAGE_SIZE, training=False))
    assert_matches_originals(samples, {f"k{i}": i for i in indices})


def test_plain_pyarrow_parquet_with_a_bytes_path_struct_and_json_captions(tmp_path):
    indices = list(range(5))
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "jpg": pa.array(
                [{"bytes": png(image_of(i)), "path": f"img{i}.png"} for i in indices], type=struct
            ),
            "txt": [json.dumps([caption_of(i), "another caption"]) for i in indices],
        }
    )
    pq.write_table(table, tmp_path / "plain.parquet")
    source = DataSource(path="parquet", data_files=str(tmp_path / "plain.parquet"))
    samples = list(image_text_stream(source, image_size=IMAGE_SIZE, training=False))
    # evaluation takes the first caption of a JSON list; the image path names the sample
    assert_matches_originals(samples, {f"img{i}.png": i for i in indices})


def test_imagefolder_with_a_metadata_file(tmp_path):
    for i in range(4):
        image_of(i).save(tmp_path / f"{i}.png")
    lines = [json.dumps({"file_name": f"{i}.png", "text": caption_of(i)}) for i in range(4)]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines))
    stream = image_text_stream(
        DataSource(path="imagefolder", data_dir=str(tmp_path)), image_size=IMAGE_SIZE, training=False
    )
    samples = list(stream)
    assert_matches_originals(samples, {str(tmp_path / f"{i}.png"): i for i in range(4)})


def test_caption_forms_and_random_choice_in_training(tmp_path):
    assert caption_candidates(' ["x", " ", {"caption": "y"}] ') == ["x", "y"]
    assert caption_candidates('{"text": ["p", "q"]}') == ["p", "q"]
    assert caption_candidates("[not json") == ["[not json"]
    assert caption_candidates({"other": "z"}) == [] and caption_candidates(None) == []
    # one caption per line (CLIP_benchmark retrieval sets): each line is a candidate
    assert caption_candidates("a red star\n\n  a small star \n") == ["a red star", "a small star"]

    options = [f"caption {c}" for c in range(4)]
    members = [m for i in range(40) for m in sample(i, png(image_of(i)), json.dumps(options))]
    write_tar(tmp_path / "s.tar", members)

    def captions(seed):
        stream = image_text_stream(
            wds(str(tmp_path / "s.tar")), image_size=IMAGE_SIZE, seed=seed, infinite=False
        )
        return [s["text"] for s in stream]

    assert set(captions(0)) == set(options)  # every option gets picked somewhere
    assert captions(0) == captions(0) and captions(0) != captions(1)  # seeded
    evaluation = image_text_stream(wds(str(tmp_path / "s.tar")), image_size=IMAGE_SIZE, training=False)
    assert {s["text"] for s in evaluation} == {options[0]}


# ---------------------------------------------------------------- sharding over ranks and workers


@pytest.mark.slow  # worker processes
@pytest.mark.parametrize("num_shards", [4, 3])  # 3: not divisible by 2 ranks x 2 workers
def test_two_ranks_with_two_workers_read_every_sample_exactly_once(tmp_path, tokenizer_dir, num_shards):
    keys = write_shards(tmp_path, num_shards=num_shards, per_shard=5)
    seen = []
    for rank in range(2):
        stream = image_text_stream(
            wds(str(tmp_path / "*.tar")),
            image_size=IMAGE_SIZE,
            rank=rank,
            world_size=2,
            shuffle_buffer=4,
            infinite=False,
        )
        for batch in loader(stream, tokenizer_dir, num_workers=2, batch_size=3):
            seen += batch["keys"]
    assert len(seen) == len(keys) and set(seen) == set(keys)


def test_sharding_advice():
    assert sharding_advice(8, world_size=2, num_workers=2) is None
    advice = sharding_advice(3, world_size=1, num_workers=4)
    assert advice == (
        "3 shards over 1 ranks x 4 workers: some workers will idle; "
        "use a multiple of 4 shards or set num_workers=3"
    )
    assert "workers get unequal shares" in sharding_advice(6, world_size=2, num_workers=2)
    assert sharding_advice(3, world_size=2, num_workers=1) == (
        "3 shards over 2 ranks x 1 workers: every rank reads all 3 shards and keeps 1 sample in 2; "
        "use a multiple of 2 shards"
    )


def test_per_device_batch_size():
    assert per_device_batch_size(256, world_size=4, accumulate_grad_batches=2) == 32
    with pytest.raises(ValueError, match="global_batch_size=100 is not divisible by world_size=3"):
        per_device_batch_size(100, world_size=3)


# ---------------------------------------------------------------- bad data


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("training", [False, True])
def test_bad_samples_are_skipped_and_counted_across_workers(bad_shards, tokenizer_dir, training, num_workers):
    pattern, good = bad_shards
    stream = image_text_stream(
        wds(pattern),
        image_size=IMAGE_SIZE,
        training=training,
        shuffle_buffer=4,
        infinite=False,
        max_image_pixels=64 * 64,
    )
    keys, skipped = [], Counter()
    for batch in loader(stream, tokenizer_dir, num_workers=num_workers, batch_size=3):
        keys += batch["keys"]
        skipped.update(batch["skipped"])
        assert batch["pixel_values"].shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert sorted(keys) == sorted(good)  # everything readable, including shard 3 after the cut
    assert dict(skipped) == BAD_SKIPS


def test_max_image_pixels_is_checked_before_decoding(tmp_path):
    members = sample(0, png(image_of(0, (100, 100))), "big") + sample(1, png(image_of(1)), "ok")
    members += sample(2, bomb_png(5000), "no pixel data: 'corrupt_image' if it were decoded")
    write_tar(tmp_path / "s.tar", members)
    source = wds(str(tmp_path / "s.tar"))
    samples = list(image_text_stream(source, image_size=IMAGE_SIZE, training=False, max_image_pixels=5000))
    assert [s["key"] for s in samples] == ["s.tar/000001"] and samples[0]["skipped"] == {"too_large": 2}


def test_check_skip_fraction():
    check_skip_fraction(100, {"corrupt_image": 50}, max_fraction=0.01, min_seen=1000)  # too early to judge
    check_skip_fraction(2000, {"corrupt_image": 20}, max_fraction=0.01, min_seen=1000)  # exactly at the limit
    with pytest.raises(
        RuntimeError, match=r"21 of 2000 samples skipped.*max_skip_fraction=0.01.*corrupt_image=21"
    ):
        check_skip_fraction(2000, {"corrupt_image": 21}, max_fraction=0.01, min_seen=1000)


def test_a_wrong_column_fails_at_once_naming_it_and_the_columns(good_shards):
    pattern, _ = good_shards
    with pytest.raises(ValueError, match=r"data.train.image_column: 'jpeg'.*columns found: \[.*'png'.*'txt'"):
        image_text_stream(wds(pattern, image_column="jpeg"))
    with pytest.raises(ValueError, match=r"data.train.text_column: 'caption'"):
        image_text_stream(wds(pattern, text_column="caption"))


def test_undetectable_columns_fail_naming_the_columns_found(tmp_path):
    pq.write_table(pa.table({"picture": [b"x"], "label": [1]}), tmp_path / "p.parquet")
    with pytest.raises(
        ValueError, match=r"no image column.*set data.val.image_column.*\['picture', 'label'\]"
    ):
        image_text_stream(DataSource(path="parquet", data_files=str(tmp_path / "p.parquet")), role="val")


def test_a_missing_path_fails_at_once_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"data.train.data_files: '.*nowhere/\*.tar' matches no file"):
        image_text_stream(wds(str(tmp_path / "nowhere/*.tar")))
    with pytest.raises(ValueError, match=r"data.train: cannot open path='someone/no-such-dataset'"):
        image_text_stream(DataSource(path="someone/no-such-dataset"))


# ---------------------------------------------------------------- evaluation loops without data


def test_without_val_or_test_source_the_loops_run_one_empty_step(good_shards, tokenizer_dir):
    from superclip_pl.data import ImageTextDataModule

    dm = ImageTextDataModule(tokenizer_dir, train=wds(good_shards[0]), image_size=IMAGE_SIZE)
    for stage, make_loader in (("validate", dm.val_dataloader), ("test", dm.test_dataloader)):
        dm.setup(stage)
        assert list(make_loader()) == [{}]  # Lightning skips a loop with no batch (and its callbacks)
        assert dm.on_before_batch_transfer({}, 0) == {}


def test_a_test_source_is_read_by_the_test_loop(good_shards, tokenizer_dir):
    from superclip_pl.data import ImageTextDataModule

    pattern, keys = good_shards
    dm = ImageTextDataModule(
        tokenizer_dir, test=wds(pattern), image_size=IMAGE_SIZE, batch_size=5, num_workers=0
    )
    dm.setup("test")
    seen = [k for batch in dm.test_dataloader() for k in batch["keys"]]
    assert sorted(seen) == sorted(keys)
