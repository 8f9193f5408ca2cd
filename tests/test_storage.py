"""Remote data, checkpoints and logs: shards read over HTTP survive a dropped connection, and a whole
run (brace-pattern shards, checkpoints, logs, a resume, an export) lives in an S3-compatible store
served on 127.0.0.1 by moto's server mode."""

import http.server
import json
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from conftest import MICRO
from shards import write_shards
from superclip_pl.data import tars
from superclip_pl.data.sources import DataSource, expand_data_files, missing_local_patterns
from test_long_runs import SUPERCLIP, environment


def test_brace_patterns_and_double_colon_lists_expand_as_open_clip_does(tmp_path):
    assert expand_data_files("s3://b/shard-{000..002}.tar") == [f"s3://b/shard-00{i}.tar" for i in range(3)]
    assert expand_data_files("a/{x,y}.tar::b/*.tar") == ["a/x.tar", "a/y.tar", "b/*.tar"]
    assert expand_data_files({"train": "t-{0..1}.tar"}) == {"train": ["t-0.tar", "t-1.tar"]}
    assert expand_data_files("plain/*.tar") == "plain/*.tar"
    write_shards(tmp_path, num_shards=2, per_shard=2)
    names = sorted(p.name for p in tmp_path.glob("*.tar"))
    pattern = str(tmp_path / f"{{{names[0]},{names[1]},absent.tar}}")
    missing = missing_local_patterns(DataSource(path="webdataset", data_files=pattern))
    assert missing == [str(tmp_path / "absent.tar")]  # each expanded file is checked


class DropOnce(http.server.SimpleHTTPRequestHandler):
    """Serves files; the first GET of each sends its full length but only a third of its bytes."""

    dropped: set[str] = set()

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file() or self.path in self.dropped:
            return super().do_GET()
        self.dropped.add(self.path)
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 3])
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)  # connection reset mid-shard


def test_a_connection_dropped_mid_shard_is_retried_at_the_sample_reached(tmp_path, monkeypatch):
    write_shards(tmp_path, num_shards=2, per_shard=6)
    files = sorted(tmp_path.glob("*.tar"))
    handler = lambda *a, **k: DropOnce(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(tars, "BACKOFF", 0.01)
    try:
        port = server.server_address[1]
        urls = [f"http://127.0.0.1:{port}/{f.name}" for f in files]
        remote = list(tars.tar_samples(urls, ("png", "txt")))
    finally:
        server.shutdown()
    local = list(tars.tar_samples([str(f) for f in files], ("png", "txt")))
    assert len(DropOnce.dropped) == 2  # both shards were cut once
    assert [(s["__key__"], s["png"], s["txt"]) for s in remote] == [
        (s["__key__"], s["png"], s["txt"]) for s in local
    ]


@pytest.fixture
def s3(tmp_path):
    """(endpoint, environment) of an S3-compatible server on 127.0.0.1 (moto), with a bucket `runs`."""
    server_mod = pytest.importorskip("moto.server", reason="moto[server] (the dev extra) is not installed")
    pytest.importorskip("s3fs", reason="s3fs (the s3 extra) is not installed")
    try:
        server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
    except Exception as err:  # no socket, port refused, ...
        pytest.skip(f"moto's S3 server cannot start here: {err}")
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**environment(), "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    env |= {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    import s3fs

    fs = s3fs.S3FileSystem(key="test", secret="test", endpoint_url=endpoint)
    fs.mkdir("runs")
    yield endpoint, env, fs
    server.stop()


@pytest.mark.slow
def test_a_run_in_object_storage_trains_resumes_and_exports(tmp_path, s3, tokenizer_dir):
    endpoint, env, fs = s3
    write_shards(tmp_path / "shards", num_shards=3, per_shard=5)
    for i, f in enumerate(sorted((tmp_path / "shards").glob("*.tar"))):
        fs.put_file(str(f), f"runs/shards/shard-{i:05d}.tar")
    options = {"key": "test", "secret": "test", "endpoint_url": endpoint}
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 4,
            "limit_val_batches": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": "s3://runs/out",
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "s3://runs/out", "name": "run"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"save_last": True, "every_n_train_steps": 2},
                }
            ],
        },
        "model": {"backbone_config": MICRO, "warmup_steps": 0},
        "data": {
            "class_path": "superclip_pl.ImageTextDataModule",
            "init_args": {
                "tokenizer": tokenizer_dir,
                "train": {
                    "path": "webdataset",
                    "data_files": "s3://runs/shards/shard-{00000..00002}.tar",
                    "image_column": "png",
                    "storage_options": options,
                },
                "batch_size": 4,
                "num_workers": 0,
                "max_length": 16,
            },
        },
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    fit = [str(SUPERCLIP), "fit", "--config", str(tmp_path / "c.yaml"), "--ckpt_path", "last"]
    done = subprocess.run(fit, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    last = "runs/out/run/version_0/checkpoints/last.ckpt"
    assert fs.exists(last) and fs.exists("runs/out/run/version_0/metrics.csv")
    assert json.loads(fs.cat("runs/out/run/version_0/metrics.json"))["train/loss"] > 0

    done = subprocess.run(
        [*fit, "--trainer.max_steps", "6"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming step 4 of s3://runs/out/run/version_0: logging into it" in done.stdout
    assert fs.ls("runs/out/run") == ["runs/out/run/version_0"]

    export = [str(SUPERCLIP), "export", "--ckpt_path", f"s3://{last}", "--output_dir", str(tmp_path / "hf")]
    done = subprocess.run(export, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "hf" / "model.safetensors").is_file()
