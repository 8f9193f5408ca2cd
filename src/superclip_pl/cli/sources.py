"""A whole data source given on the command line replaces the config's source.

jsonargparse merges a value given to a dataclass-typed key into the one the config set, field by
field: `--data.train '{path: imagefolder, data_dir: DIR}'` after a config naming webdataset shards
would keep the config's `data_files` (and columns), and the source would match no file. A whole
value (a mapping, a list of sources, or a file holding them) is meant as the source, so each one is
preceded here by a `null` for the same key: the config's source is dropped, then the new one set.
A single field (`--data.train.data_files X`) still overrides just that field.
"""

from __future__ import annotations

ROLES = ("train", "val", "test", "predict")
# the keys that take a whole source: --data.train and its long form --data.init_args.train
KEYS = {f"--data.{infix}{role}": role for role in ROLES for infix in ("", "init_args.")}


def whole_sources(argv: list[str]) -> list[str]:
    """`argv` with `--data.<role> null` before each whole source given to `--data.<role>`."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        key, equals, value = arg.partition("=")
        if key in KEYS:
            if not equals:
                value = argv[i + 1] if i + 1 < len(argv) else "null"
            if value.strip().lower() not in ("null", "none", "~", ""):
                out += [f"{key}=null"]
        out.append(arg)
    return out
