"""Your own data (docs/own_data.md): every command of the page trains through the installed
`superclip` on the page's stand-ins; a CSV source in detail (columns, separator, relative paths,
bad rows, sharding, resume); a whole source on the command line replaces the config's."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from superclip_pl.cli.main import build_cli
from superclip_pl.cli.sources import whole_sources
from superclip_pl.data.build import image_text_stream, role_stream
from superclip_pl.data.checks import check_sources
from superclip_pl.data.sources import DataSource
from superclip_pl.errors import UserError
from test_cli import CONFIGS, shapes  # noqa: F401  (the module-scoped shapes data set fixture)

PAGE = Path(__file__).resolve().parent.parent / "docs" / "own_data.md"
SUPERCLIP = Path(sys.executable).parent / "superclip"
STAND_INS = ("my-csv", "my-parquet", "my-folder", "my-hub-copy")


def page_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PAGE.read_text(), flags=re.S)


def page_commands() -> list[str]:
    """The page's `superclip` commands, continuation lines joined."""
    return [b.replace("\\\n", " ").strip() for b in page_blocks("bash") if b.strip().startswith("superclip ")]


@pytest.fixture(scope="module")
def project(shapes):  # noqa: F811
    """The shapes project with the page's stand-ins, written by the page's own Python block."""
    here = os.getcwd()
    os.chdir(shapes)
    try:
        for block in page_blocks("python"):
            exec(compile(block, str(PAGE), "exec"), {})
    finally:
        os.chdir(here)
    return shapes


def in_project(project: Path, tmp_path: Path) -> Path:
    """A fresh directory that sees the project's data, stand-ins and configs (its own outputs/)."""
    for name in ("data", *STAND_INS):
        (tmp_path / name).symlink_to(project / name)
    (tmp_path / "configs").symlink_to(CONFIGS)
    return tmp_path


def write_csv(path: Path, rows: list[list[str]], separator: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f, delimiter=separator).writerows(rows)
    return path


def keys_and_skips(stream) -> tuple[list[str], dict[str, int]]:
    keys, skipped = [], {}
    for sample in stream:
        keys.append(sample["key"])
        for reason, n in sample["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    return keys, skipped


def images(project: Path) -> list[Path]:
    return sorted((project / "my-csv" / "images").glob("*.png"))


def page_sources() -> list[dict]:
    """The source of each of the page's commands (they differ in nothing else)."""
    return [yaml.safe_load(c.split(" --data.train ")[1].strip("'")) for c in page_commands()]


def test_the_pages_commands_differ_only_in_their_source():
    commands = page_commands()
    assert [s["path"] for s in page_sources()] == [
        "csv",
        "parquet",
        "imagefolder",
        "webdataset",
        "my-hub-copy",
    ]
    prefix = "superclip fit --config configs/debug.yaml --trainer.max_steps 2 --data.train "
    assert all(re.fullmatch(re.escape(prefix) + r"'\{[^']*\}'", " ".join(c.split())) for c in commands)


def fit(cwd: Path, command: str) -> tuple[Path, dict]:
    """Run `command` (a shell line) with the installed `superclip`; its log directory and data state."""
    env = {
        **os.environ,
        "PATH": f"{SUPERCLIP.parent}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (cwd / "outputs" / "debug" / "superclip").iterdir()
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["ImageTextDataModule"]
    (rank0,) = state["ranks"]
    return run, rank0


@pytest.mark.slow
def test_the_pages_csv_command_trains_as_written(project, tmp_path):
    (command, *_), (given, *_) = page_commands(), page_sources()
    run, rank0 = fit(in_project(project, tmp_path), command)
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]["init_args"]["train"]
    # the whole source replaced the config's (whose columns were png / txt, its files the demo's tars)
    assert saved == {**saved, **given} and saved["image_column"] is None and saved["text_column"] is None
    assert rank0["seen"] == 2 * 8 and not any(rank0["skipped"].values())  # 2 steps of 8, none skipped


@pytest.mark.slow
def test_every_source_of_the_page_trains_in_one_run(project, tmp_path):
    """The page's five sources as one list (one run instead of five): each is read and none skipped."""
    sources = [{**s, "name": f"s{i}"} for i, s in enumerate(page_sources())]
    command = page_commands()[0].split(" --data.train ")[0].replace("max_steps 2", "max_steps 4")
    _, rank0 = fit(in_project(project, tmp_path), f"{command} --data.train '{json.dumps(sources)}'")
    assert rank0["seen"] == 4 * 8 and not any(rank0["skipped"].values())
    read = rank0["sources"]["read"]
    assert sorted(read) == [f"s{i}" for i in range(5)] and all(read.values()), read


def test_a_csv_beside_its_images_reads_from_any_directory(project, tmp_path, monkeypatch):
    files = images(project)
    rows = [["filepath", "title"], *([f"images/{p.name}", f"caption {i}"] for i, p in enumerate(files[:5]))]
    rows.append([str(files[5]), "an absolute path"])
    table = write_csv(project / "my-csv" / "relative.csv", rows)
    monkeypatch.chdir(tmp_path)  # not the CSV's directory
    stream = image_text_stream(DataSource(path="csv", data_files=str(table)), image_size=16, training=False)
    assert stream.decoder.columns.images == ("filepath",) and stream.decoder.columns.texts == (
        ("title", 1.0),
    )
    keys, skipped = keys_and_skips(stream)
    assert keys == [str(p) for p in files[:6]] and skipped == {}
    sample = next(iter(stream))
    assert sample["pixel_values"].shape == (3, 16, 16) and sample["text"] == "caption 0"


@pytest.mark.parametrize(
    ("name", "separator", "given"),
    [("rows.tsv", "\t", None), ("rows.csv", ";", ";"), ("rows.txt", "\t", "tab"), ("rows.csv", "\t", "\t")],
)
def test_the_separator_is_the_extensions_unless_given(project, name, separator, given):
    files = images(project)
    rows = [
        ["file_name", "caption"],
        *([p.name, f"a caption, with a comma {i}"] for i, p in enumerate(files[:3])),
    ]
    table = write_csv(project / "my-csv" / "images" / name, rows, separator)
    source = DataSource(path="csv", data_files=str(table), separator=given)
    samples = list(image_text_stream(source, image_size=8, training=False))
    assert [s["text"] for s in samples] == [f"a caption, with a comma {i}" for i in range(3)]


def test_a_wrong_separator_or_column_is_one_line(project):
    files = images(project)
    tsv = write_csv(
        project / "my-csv" / "tabs.csv", [["filepath", "title"], ["images/" + files[0].name, "x"]], "\t"
    )
    with pytest.raises(
        UserError, match=r"^data\.train\.separator: the header of .*tabs\.csv reads as one column"
    ):
        check_sources({"train": DataSource(path="csv", data_files=str(tsv))})
    with pytest.raises(UserError, match=r"data\.train\.separator: '::' must be one character"):
        check_sources({"train": DataSource(path="csv", data_files=str(tsv), separator="::")})
    table = project / "my-csv" / "captions.csv"
    with pytest.raises(UserError) as err:
        check_sources({"train": DataSource(path="csv", data_files=str(table), text_column="caption")})
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.train.text_column: 'caption' is not a column")
    assert message.endswith("columns found: ['filepath', 'title']")
    with pytest.raises(UserError, match=r"data\.val\.separator: applies to CSV / TSV files only"):
        check_sources(
            {"val": DataSource(path="imagefolder", data_dir=str(project / "my-folder"), separator=",")}
        )


def test_missing_images_and_bad_rows_are_skipped_and_counted(project):
    files = images(project)
    rows = [
        ["filepath", "title"],
        [f"images/{files[0].name}", "good"],
        ["images/no-such-file.png", "missing"],
        [f"images/{files[1].name}", "one", "field too many"],  # an unquoted separator
        [f"images/{files[2].name}", ""],
        [f"images/{files[3].name}"],  # a field short: no caption
        [f"images/{files[4].name}", "good again"],
    ]
    table = write_csv(project / "my-csv" / "bad.csv", rows)
    stream = image_text_stream(DataSource(path="csv", data_files=str(table)), image_size=8, training=False)
    samples = list(stream)
    assert [s["text"] for s in samples] == ["good", "good again"]
    skipped = {r: sum(s["skipped"].get(r, 0) for s in samples) for r in ("missing_image", "bad_row")}
    assert skipped == {"missing_image": 1, "bad_row": 2}
    assert sum(s["skipped"].get("empty_caption", 0) for s in samples) == 1


def test_images_not_found_at_all_fail_before_the_run_in_one_line(project, tmp_path):
    # paths written relative to another directory (open_clip reads them from the current one)
    table = write_csv(
        tmp_path / "elsewhere.csv", [["filepath", "title"], ["my-csv/images/s0000000.png", "x"]]
    )
    with pytest.raises(
        UserError, match=r"^data\.train\.image_column: no image of the first 1 rows .* is a file"
    ):
        check_sources({"train": DataSource(path="csv", data_files=str(table))})


def test_a_wrong_column_exits_2_through_the_installed_command(project, tmp_path):
    cwd = in_project(project, tmp_path)
    source = "{path: csv, data_files: my-csv/captions.csv, image_column: path}"
    args = [str(SUPERCLIP), "fit", "--config", "configs/debug.yaml", "--data.train", source]
    proc = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "superclip fit: error: data.train.image_column: 'path' is not a column of path='csv', "
        "data_files='my-csv/captions.csv', split='train', image_column='path'; "
        "columns found: ['filepath', 'title']"
    )
    assert "Traceback" not in proc.stderr


def test_one_csv_feeds_two_ranks_and_their_workers_each_row_once(project, recwarn):
    files = images(project)[:11]  # 11 rows over 2 ranks x 2 workers: no even split
    rows = [["filepath", "title"], *([f"images/{p.name}", p.stem] for p in files)]
    table = write_csv(project / "my-csv" / "eleven.csv", rows)
    source = DataSource(path="csv", data_files=str(table))
    seen = []
    for rank in (0, 1):
        stream, _ = role_stream(
            source, "val", training=False, rank=rank, world_size=2, num_workers=2, image_size=8
        )
        assert stream.source_shards == 4  # the file's rows dealt out over 2 ranks x 2 workers
        loader = DataLoader(stream, batch_size=None, num_workers=2)
        seen += [sample["text"] for sample in loader]
    assert sorted(seen) == sorted(p.stem for p in files)
    assert not [w for w in recwarn if "shards over" in str(w.message)]  # no sharding advice


def test_a_csv_stream_resumes_at_the_next_row(project):
    source = DataSource(path="csv", data_files=str(project / "my-csv" / "captions.csv"))
    stream = image_text_stream(source, image_size=8, shuffle_buffer=8, seed=3)
    samples = iter(stream)
    first = [next(samples)["key"] for _ in range(13)]
    state = stream.state_dict()
    expected = [next(samples)["key"] for _ in range(5)]
    again = image_text_stream(source, image_size=8, shuffle_buffer=8, seed=3)
    again.load_state_dict(state)
    assert [s["key"] for _, s in zip(range(5), again, strict=False)] == expected and len(set(first)) == 13


def test_whole_sources_get_a_null_before_them():
    argv = ["fit", "--config", "c.yaml", "--data.train", "{path: csv}", "--data.train.split", "x"]
    assert whole_sources(argv) == [*argv[:3], "--data.train=null", *argv[3:]]
    argv = ["--data.init_args.val=[{path: a}]", "--data.test", "null", "--data.predict", "s.yaml"]
    expected = ["--data.init_args.val=null", argv[0], "--data.test", "null", "--data.predict=null", *argv[3:]]
    assert whole_sources(argv) == expected


def test_a_whole_source_replaces_the_configs_and_a_field_overrides_its_own(project, monkeypatch):
    monkeypatch.chdir(project)
    debug = ["--config", str(CONFIGS / "debug.yaml")]
    cli = build_cli([*debug, "--data.train", "{path: imagefolder, data_dir: my-folder}"], run=False)
    assert cli.datamodule.train == DataSource(path="imagefolder", data_dir="my-folder")
    cli = build_cli([*debug, "--data.train.data_files", "data/shapes/train/shard-00001.tar"], run=False)
    train = cli.datamodule.train
    assert (train.path, train.data_files, train.image_column) == (
        "webdataset",
        "data/shapes/train/shard-00001.tar",
        "png",
    )
    two = "[{path: csv, data_files: my-csv/captions.csv, name: a}, {path: my-hub-copy, name: b}]"
    cli = build_cli(
        [*debug, "--data.train", two, "--data.val", "{path: parquet, data_files: my-parquet/*.parquet}"],
        run=False,
    )
    assert cli.datamodule.train == [
        DataSource(path="csv", data_files="my-csv/captions.csv", name="a"),
        DataSource(path="my-hub-copy", name="b"),
    ]
    assert cli.datamodule.val == DataSource(path="parquet", data_files="my-parquet/*.parquet")
