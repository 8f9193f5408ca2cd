"""What ``superclip fit|validate|test`` checks on the parsed config before building anything: the data
module's sizes, paths and tokenizer, and ``--ckpt_path`` (a missing or corrupt checkpoint is one line,
never torch's advice to load it unsafely)."""

from __future__ import annotations

from superclip_pl.data.checks import check_numbers, check_sources, check_tokenizer
from superclip_pl.errors import UserError


def _plain(value):
    """A jsonargparse Namespace (nested) as dicts and lists."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


ROLES = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


def check_data(data, subcommand: str | None) -> None:
    """The data module's arguments (``data.init_args``) of a parsed config (another class: no check);
    the files of the sources `subcommand` reads (none without one: the config is only instantiated)."""
    data = _plain(data)
    if not isinstance(data, dict) or not str(data.get("class_path", "")).endswith("ImageTextDataModule"):
        return
    values = data.get("init_args") or {}
    check_numbers(values)
    check_tokenizer(values.get("tokenizer"))
    check_sources(values, ROLES.get(subcommand, ()))


def check_ckpt_path(ckpt_path: str) -> int | None:
    """The checkpoint's global step, or a one-line error when it is not a SuperCLIP checkpoint."""
    if ckpt_path in ("last", "best", "hpc", "registry"):  # names Lightning resolves itself
        return None
    from superclip_pl.interop.export import read_checkpoint

    try:
        _, rest = read_checkpoint(ckpt_path)
    except (ValueError, OSError) as err:
        message = str(err).strip().splitlines()[0]
        raise UserError(
            f"ckpt_path: {message}; give a checkpoint `superclip fit` wrote "
            "(e.g. outputs/debug/superclip/version_0/checkpoints/last.ckpt)"
        ) from None
    step = rest.get("global_step")
    return int(step) if isinstance(step, int) else None
