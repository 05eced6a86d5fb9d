"""Importing this module registers the built-in stages."""
import importlib

for _module in ("correspond", "maskclip", "import_labels", "sam", "refine"):
    try:
        importlib.import_module(f"{__package__}.{_module}")
    except ModuleNotFoundError as e:  # a stage module not written yet; never hide a missing dependency
        if e.name != f"{__package__}.{_module}":
            raise
