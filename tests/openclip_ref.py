"""open_clip (the reference implementation) for the tests, on a machine where torchvision cannot load.

The PyPI torchvision wheel does not import beside the CPU torch build of this project, and
open_clip imports torchvision at module level for two things only: its image transforms
(``open_clip.transform``) and one batch-norm class (``torchvision.ops.misc.FrozenBatchNorm2d``, also
imported by timm). Neither runs in these tests: they feed tensors to the model code. So while
open_clip is imported, ``torchvision`` is stubbed in ``sys.modules`` with placeholder classes; the
stubs are removed again right after, so that nothing else (transformers checks whether torchvision
is installed) sees them. open_clip's transforms are placeholders: calling one raises.
"""

from __future__ import annotations

import importlib
import sys
import types
from functools import lru_cache

STUBBED = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops")
STUBBED += ("torchvision.ops.misc",)


class _Placeholder:
    """Stands for any torchvision class or function: built freely, never run."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        raise RuntimeError("torchvision is stubbed in the tests: open_clip's image transforms do not run")


class _Enum(type):
    def __getattr__(cls, name):  # InterpolationMode.BICUBIC and the like
        return name


def _stub(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so that its submodules import

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Enum(attr, (_Placeholder,), {})

    module.__getattr__ = __getattr__
    return module


@lru_cache
def open_clip():
    """The ``open_clip`` module (installed with --no-deps by the Makefile), torchvision stubbed while
    it imports. A test dependency: `make install` and `make test` install it."""
    if importlib.util.find_spec("open_clip") is None:
        raise RuntimeError("open_clip_torch is not installed: `make install` puts it in .venv (--no-deps)")
    if importlib.util.find_spec("torchvision") is not None:
        try:  # a torchvision that loads beside this torch: nothing to stub
            importlib.import_module("torchvision")
            return importlib.import_module("open_clip")
        except Exception:  # installed but built for another torch
            for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
                del sys.modules[name]
    import transformers  # noqa: F401  (it checks for torchvision when imported: before the stubs)

    added = [name for name in STUBBED if name not in sys.modules]
    sys.modules.update({name: _stub(name) for name in added})
    try:
        return importlib.import_module("open_clip")
    finally:
        for name in added:
            sys.modules.pop(name, None)
