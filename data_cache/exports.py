"""Lazy package exports (PEP 562): a package's ``__init__`` states its public names (``__all__``) and where
each lives, and a name's module is imported on first use, so ``import train`` stays cheap (no torch, zarr or
spconv until a name that needs them is touched)."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[list[str], Callable[[str], object]]:
    """``(__all__, __getattr__)`` for ``package``: ``exports`` maps each public name to its module."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return sorted(exports), __getattr__
