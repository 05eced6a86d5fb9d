"""A registry per kind (datasets, stages, ...), as in Pointcept/mmengine: ``@DATASETS.register("name")``."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from data_cache.errors import UnknownNameError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, object] = {}

    def register(self, name: str):
        def deco(obj):
            if name in self._items and self._items[name] is not obj:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj
        return deco

    def get(self, name: str):
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise UnknownNameError(f"unknown {self.kind} '{name}' (known: {known})") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


def shipped_config_dir(package: str, folder: str = "configs") -> Path:
    """The folder of YAML configurations shipped as package data inside ``package`` (``train/configs``,
    ``pipeline/simulate/configs``), found through ``importlib.resources`` so that a wheel installed anywhere
    finds them (open_clip ships its model configs the same way). Installed packages are directories."""
    return Path(str(files(package).joinpath(folder)))


def shipped_configs(folder: Path) -> list[str]:
    """The configurations shipped as ``*.yaml`` files in ``folder`` (configurations as data, open_clip style)."""
    return sorted(p.stem for p in Path(folder).glob("*.yaml"))


def resolve_shipped_config(folder: Path, name_or_path, error: type[Exception], what: str) -> Path:
    """A YAML file's path as given, else the file ``<name>.yaml`` shipped in ``folder``; ``error`` names both."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = Path(folder) / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise error(f"no {what} '{name_or_path}' (a YAML file, or one shipped in {folder}: "
                f"{', '.join(shipped_configs(folder))})")
