"""What a bug report needs: the versions of the project and of the libraries it stands on (``cns-cli --version``).

Versions come from the installed distributions' metadata (``importlib.metadata``), so nothing heavy is
imported except torch, whose CUDA build (``torch.version.cuda``) and GPU visibility only torch can tell.
spconv ships one distribution per CUDA build (``spconv-cu118``, ``spconv-cu121``, ..., plain ``spconv`` for
CPU): the distribution's name is its build.
"""
from __future__ import annotations

import re
from importlib import metadata

PROJECT = "cns-label-free"
#: (label, distribution) of the libraries reported besides torch and spconv
LIBRARIES = (("torchvision", "torchvision"), ("open_clip", "open_clip_torch"), ("segment-anything", "segment-anything"),
             ("zarr", "zarr"), ("dask", "dask"))


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def spconv_builds() -> list[str]:
    """Every installed spconv distribution as ``name version (build)``, e.g. ``spconv-cu118 2.3.8 (CUDA 11.8)``."""
    found = []
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name == "spconv" or name.startswith("spconv-"):
            cuda = re.fullmatch(r"spconv-cu(\d+)(\d)", name)
            build = f" (CUDA {cuda[1]}.{cuda[2]})" if cuda else (" (CPU only)" if name == "spconv" else "")
            found.append(f"{name} {dist.version}{build}")
    return sorted(set(found)) or ["not installed"]


def version_lines() -> list[str]:
    """One ``label: value`` line per library, then whether torch sees a GPU (and which)."""
    lines = [f"{PROJECT}: {_version(PROJECT)}"]
    try:
        import torch
    except ImportError:
        lines.append("torch: not installed")
        gpu = "unknown (no torch)"
    else:
        lines.append(f"torch: {torch.__version__} (CUDA build: {torch.version.cuda or 'none, CPU only'})")
        gpu = (f"yes, {torch.cuda.device_count()} ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available()
               else "no")
    lines.append(f"spconv: {', '.join(spconv_builds())}")
    lines += [f"{label}: {_version(dist)}" for label, dist in LIBRARIES]
    lines.append(f"GPU visible: {gpu}")
    return lines
