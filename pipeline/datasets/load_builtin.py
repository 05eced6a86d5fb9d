"""Importing this module registers the built-in dataset adapters."""
import importlib

for _module in ("nuscenes", "nuimages", "scannet", "synthetic", "folder"):
    try:
        importlib.import_module(f"{__package__}.{_module}")
    except ModuleNotFoundError as e:  # a module of this package not written yet; never hide a missing dependency
        if e.name != f"{__package__}.{_module}":
            raise
