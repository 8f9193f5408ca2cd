"""``--ckpt_path last``: the newest ``last.ckpt`` of the run's own log directory, found from the config
before anything is built; and the log directory a resumed fit continues in.

Lightning resolves ``last`` itself only in the checkpoint folder of the *new* run: the logger opens a
new ``version_N`` first, finds nothing there and trains from scratch with a warning. Here the run's
folder is read from the parsed config as Lightning would lay it out:
- a ``ModelCheckpoint`` with an explicit ``dirpath``: ``<dirpath>/last.ckpt``;
- else a logger with a ``save_dir`` (TensorBoard, CSV): ``<save_dir>/<name>/*/checkpoints/last.ckpt``
  (every version of the run, so the newest is found however many times it was restarted);
- else ``<default_root_dir>/lightning_logs/*/checkpoints/last.ckpt`` (Lightning's default logger), or
  ``<default_root_dir>/checkpoints/last.ckpt`` with ``logger: false``.
Paths may be fsspec URLs (``s3://bucket/runs``). The newest file (modification time) wins.
A fit then logs into the version directory its checkpoint came from (``resume_version``).
"""

from __future__ import annotations

import os

import fsspec

LAST = "last.ckpt"
LOGGERS = ("TensorBoardLogger", "CSVLogger")


def _plain(value):
    return value.as_dict() if hasattr(value, "as_dict") else value


def _first_logger(logger):
    logger = _plain(logger)
    if isinstance(logger, list):
        return _first_logger(logger[0]) if logger else False
    return logger


def _join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts if p)


def last_patterns(trainer: dict) -> list[str]:
    """Glob patterns (local paths or URLs) of the run's ``last.ckpt`` files, from ``config.trainer``."""
    trainer = _plain(trainer) or {}
    root = str(trainer.get("default_root_dir") or os.getcwd())
    for callback in _plain(trainer.get("callbacks")) or []:
        callback = _plain(callback)
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
            dirpath = (callback.get("init_args") or {}).get("dirpath")
            if dirpath:
                return [_join(str(dirpath), LAST)]
            break
    logger = _first_logger(trainer.get("logger"))
    if logger is False:
        return [_join(root, "checkpoints", LAST)]
    if isinstance(logger, dict) and str(logger.get("class_path", "")).endswith(LOGGERS):
        init = logger.get("init_args") or {}
        save_dir = str(init.get("save_dir") or root)
        name = init.get("name", "lightning_logs")
        version = init.get("version")
        version = f"version_{version}" if isinstance(version, int) else version
        return [_join(save_dir, str(name or ""), str(version or "*"), "checkpoints", LAST)]
    if logger is None or logger is True:
        return [_join(root, "lightning_logs", "*", "checkpoints", LAST)]
    return []  # another logger: its layout is its own


def _modified(fs, path: str) -> float:
    try:
        return fs.modified(path).timestamp()
    except (OSError, NotImplementedError, ValueError):  # an object store's "directory" has no date
        return 0.0


def find_last(trainer: dict) -> tuple[str | None, list[str]]:
    """(the newest ``last.ckpt`` of the run or None, the patterns searched)."""
    patterns, found = last_patterns(trainer), {}
    for pattern in patterns:
        fs, _ = fsspec.core.url_to_fs(pattern)
        protocol = pattern.split("://")[0] + "://" if "://" in pattern else ""
        for path in fs.glob(pattern) if any(c in pattern for c in "*?[") else [pattern]:
            path = path if protocol == "" or path.startswith(protocol) else protocol + path
            if fs.exists(path):  # a file, or the directory a sharded (FSDP2) checkpoint is
                found[path] = _modified(fs, path)
    return (max(found, key=found.get) if found else None), patterns


def resume_version(logger, ckpt_path: str) -> str | None:
    """The version directory ``ckpt_path`` sits in (``<save_dir>/<name>/<version>/checkpoints/x.ckpt``)
    when the run's logger writes to ``<save_dir>/<name>`` and names no version: a resumed fit then logs
    into the run it continues. None otherwise (a new version is made)."""
    logger = _first_logger(logger)
    if not isinstance(logger, dict) or not str(logger.get("class_path", "")).endswith(LOGGERS):
        return None
    init = logger.get("init_args") or {}
    if init.get("version") is not None or init.get("save_dir") is None:
        return None

    def parts(path: str) -> list[str]:
        if "://" not in path:
            path = os.path.realpath(path)
        return [p for p in path.split("/") if p]

    ckpt = parts(str(ckpt_path))
    run_dir = parts(_join(str(init["save_dir"]), str(init.get("name", "lightning_logs") or "")))
    if len(ckpt) < 3 or ckpt[-2] != "checkpoints" or ckpt[:-3] != run_dir:
        return None
    return ckpt[-3]
