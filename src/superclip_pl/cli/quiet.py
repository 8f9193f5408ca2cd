"""A quiet console for ``superclip fit|validate|test|predict``: a run prints its progress, its one-line
errors and where its outputs went, not the tips and deprecation notices of the libraries under it.

Each is filtered where it arises, by its message and the module that raises it, so that any other
warning still shows. Our own warnings print as one line (no file, line number and source line).
``SUPERCLIP_VERBOSE=1`` (or Lightning's own switches) brings everything back as the libraries print it.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

# (message regex, category, module regex) of the warnings a normal run has no use for
WARNINGS = [
    # torch 2.10+ deprecates LeafSpec, which Lightning's own _pytree still builds at every logged step
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        r"lightning\.pytorch\.utilities\._pytree",
    ),
    # torch deprecates the autograd all_gather behind Lightning's all_gather(sync_grads=True)
    (
        r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
        FutureWarning,
        r"lightning\.fabric\.utilities\.distributed",
    ),
]
# Lightning's advertisements, logged as info through its rank-zero loggers
TIPS = ("💡 Tip:",)
LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")
PACKAGE_DIR = str(Path(__file__).resolve().parent.parent)
_python_format = warnings.formatwarning


def verbose() -> bool:
    return os.environ.get("SUPERCLIP_VERBOSE", "") not in ("", "0")


def _no_tips(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(TIPS)


def _one_line(message, category, filename, lineno, line=None) -> str:
    """Our own warnings (shards that split unevenly over ranks, ...) as ``warning: <message>``."""
    if str(filename).startswith(PACKAGE_DIR):
        return f"warning: {message}\n"
    return _python_format(message, category, filename, lineno, line)


def quiet() -> None:
    """Filter the third-party noise of a run (a no-op with ``SUPERCLIP_VERBOSE=1``)."""
    if verbose():
        return
    for message, category, module in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if _no_tips not in logger.filters:
            logger.addFilter(_no_tips)
    warnings.formatwarning = _one_line
