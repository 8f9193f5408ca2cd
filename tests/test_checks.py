"""What is checked before anything is built: the data module's arguments (also from Python, where
sources may be plain dicts), checkpoints, and the log directory a resumed run continues in."""

import pytest
import torch

from shards import write_shards
from superclip_pl.cli.autoresume import resume_version
from superclip_pl.cli.checks import check_ckpt_path
from superclip_pl.data import DataSource, ImageTextDataModule
from superclip_pl.data.checks import check_numbers, check_sources, check_tokenizer
from superclip_pl.errors import UserError


def test_plain_dicts_are_sources_and_bad_fields_are_named(tokenizer_dir):
    dm = ImageTextDataModule(tokenizer_dir, train=[{"path": "webdataset", "weight": 2.0}], val={"path": "x"})
    assert dm.train == [DataSource(path="webdataset", weight=2.0)] and dm.val == DataSource(path="x")
    assert dm.image_size is None and dm.max_length is None  # the model's, at setup
    with pytest.raises(UserError, match=r"data.train.colum: not a source field; the fields are path, "):
        ImageTextDataModule(tokenizer_dir, train={"path": "webdataset", "colum": "txt"})
    with pytest.raises(UserError, match=r"data.val.path is required"):
        ImageTextDataModule(tokenizer_dir, val={"data_files": "a.tar"})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"batch_size": -4}, r"data.batch_size=-4: must be an integer >= 1"),
        ({"batch_size": 2.5}, r"data.batch_size=2.5: must be an integer"),
        ({"num_workers": -1}, r"data.num_workers=-1: must be an integer >= 0"),
        ({"max_skip_fraction": 1.5}, r"data.max_skip_fraction=1.5: must be between 0 and 1"),
    ],
)
def test_bad_numbers_are_named(values, message):
    with pytest.raises(UserError, match=message):
        check_numbers(values)


def test_missing_files_wrong_columns_and_tokenizer_dirs_are_named(tmp_path):
    write_shards(tmp_path, num_shards=1, per_shard=2)
    ok = {"path": "webdataset", "data_files": str(tmp_path / "*.tar")}
    check_sources({"train": [ok], "val": None})
    with pytest.raises(UserError, match=r"^data.val.text_column: 'caption' is not a column .*'txt'"):
        check_sources({"val": {**ok, "text_column": "caption"}}, roles=("val",))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.tar").write_bytes(b"")
    empty = {"path": "webdataset", "data_files": str(tmp_path / "empty" / "*.tar")}
    with pytest.raises(UserError, match=r"^data.train: .* has no example"):
        check_sources({"train": empty})
    missing = {"path": "webdataset", "data_files": str(tmp_path / "b/*.tar")}
    with pytest.raises(UserError, match=r"data.train\[1\].data_files='.*b/\*.tar' matches no file"):
        check_sources({"train": [ok, missing]})
    check_sources({"train": missing}, roles=("val",))  # validate reads no training data
    check_tokenizer("openai/clip-vit-base-patch16")  # a hub id is not checked here
    with pytest.raises(UserError, match=r"data.tokenizer='data/no/tokenizer': no such directory"):
        check_tokenizer("data/no/tokenizer")


def test_checkpoints_are_checked_without_unsafe_advice(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    for path, message in [(tmp_path / "none.ckpt", "does not exist"), (junk, "not a SuperCLIP checkpoint")]:
        with pytest.raises(UserError, match=rf"^ckpt_path: .*{message}") as err:
            check_ckpt_path(str(path))
        assert "weights_only=False" not in str(err.value)
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "global_step": 16}, good)
    assert check_ckpt_path(str(good)) == 16


def test_a_resumed_fit_logs_into_the_version_its_checkpoint_is_in(tmp_path):
    ckpt = tmp_path / "logs" / "superclip" / "version_3" / "checkpoints" / "last.ckpt"
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(tmp_path / "logs"), "name": "superclip", "version": None},
    }
    assert resume_version(logger, str(ckpt)) == "version_3"
    assert resume_version({**logger, "init_args": {**logger["init_args"], "version": "v"}}, str(ckpt)) is None
    assert resume_version(logger, str(tmp_path / "elsewhere" / "last.ckpt")) is None
    assert resume_version(False, str(ckpt)) is None
