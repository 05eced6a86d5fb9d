"""The simulator's knobs: one YAML file with a seed (``pipeline/simulate/configs/*.yaml``), checked key by key.

The defaults live in one place, ``pipeline/simulate/configs/default.yaml``; a user's file is merged over it, so it
may give only the knobs it changes. Every key must be known and every value in its range: a bad file is a
:class:`SimulationConfigError` that names the file and the key (``maskclip.accuracy``, ...).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

from pipeline.registry import resolve_shipped_config, shipped_config_dir, shipped_configs
from data_cache.errors import UserError

CONFIG_DIR = shipped_config_dir("pipeline.simulate")
DEFAULT_CONFIG = "default"


class SimulationConfigError(UserError, ValueError):
    """A simulator configuration with an unknown key or an out-of-range value (the message names both)."""


def _number(kind, lo=None, hi=None, lo_open=False, hi_open=False):
    """A check for an int/float knob in [lo, hi] (open ends where asked)."""
    def check(key, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not (
                isinstance(value, int) or float(value).is_integer())):
            raise SimulationConfigError(f"{key}: {value!r} is not {'an integer' if kind is int else 'a number'}")
        value = kind(value)
        if not math.isfinite(value):
            raise SimulationConfigError(f"{key}: {value!r} is not finite")
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise SimulationConfigError(f"{key}: {value!r} must be {'>' if lo_open else '>='} {lo}")
        if hi is not None and (value > hi or (hi_open and value == hi)):
            raise SimulationConfigError(f"{key}: {value!r} must be {'<' if hi_open else '<='} {hi}")
        return value
    return check


PROBABILITY = _number(float, 0.0, 1.0)


def _groups(key, value):
    from ..datasets.classes import SCANNET20, nuscenes16
    known = set(SCANNET20) | set(nuscenes16())
    if not isinstance(value, list):
        raise SimulationConfigError(f"{key}: expected a list of class-name lists, got {value!r}")
    out = []
    for i, group in enumerate(value):
        if not isinstance(group, list) or len(group) < 2 or not all(isinstance(n, str) for n in group):
            raise SimulationConfigError(f"{key}[{i}]: a group is a list of at least two class names, got {group!r}")
        unknown = [n for n in group if n not in known]
        if unknown:
            raise SimulationConfigError(f"{key}[{i}]: unknown class name(s) {unknown} (nuScenes-16 and ScanNet-20 "
                                        f"names)")
        out.append(list(group))
    return out


#: Every knob and its check (the values themselves are in pipeline/simulate/configs/default.yaml).
KNOBS = {
    "seed": _number(int, 0),
    "ground_truth": {
        "fill_max_distance_px": _number(float, 0.0),
    },
    "maskclip": {
        "patch_size": _number(int, 1),
        "accuracy": PROBABILITY,
        "group_confusion": PROBABILITY,
        "uniform_confusion": PROBABILITY,
        "correlation_patches": _number(float, 0.0),
        "confusion_groups": _groups,
        "embed_dim": _number(int, 2),
        "text_group_similarity": _number(float, 0.0, 1.0, hi_open=True),
        "feat_noise": _number(float, 0.0),
        "feat_dim": _number(int, 1),
        "pca_sample_images": _number(int, 1),
        "logit_scale": _number(float, 0.0, lo_open=True),
    },
    "sam": {
        "min_region_px": _number(int, 0),
        "split_prob": PROBABILITY,
        "split_min_px": _number(int, 2),
        "split_max_parts": _number(int, 2),
        "merge_prob": PROBABILITY,
        "drop_prob": PROBABILITY,
        "boundary_jitter_px": _number(float, 0.0),
        "boundary_jitter_scale_px": _number(float, 0.0, lo_open=True),
        "embed_dim": _number(int, 1),
        "feat_class_weight": PROBABILITY,
        "feat_noise": _number(float, 0.0),
        "feat_dim": _number(int, 1),
        "pca_sample_images": _number(int, 1),
    },
}


def available_configs() -> list[str]:
    return shipped_configs(CONFIG_DIR)


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a file shipped in ``pipeline/simulate/configs`` (``default``)."""
    return resolve_shipped_config(CONFIG_DIR, name_or_path, SimulationConfigError, "simulator configuration")


def _read_yaml(path: Path) -> dict:
    import yaml
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SimulationConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SimulationConfigError(f"{path}: expected a mapping of knobs, got {type(data).__name__}")
    return data


def _merge(base: dict, over: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in base:
            raise SimulationConfigError(f"unknown key '{name}' (known: {', '.join(sorted(base))})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise SimulationConfigError(f"{name}: expected a mapping, got {value!r}")
            out[key] = _merge(base[key], value, name)
        else:
            out[key] = copy.deepcopy(value)
    return out


def validate(cfg: dict, spec: dict = KNOBS, where: str = "") -> dict:
    """Check every knob of ``cfg`` (all must be present and known); returns the values normalised."""
    if not isinstance(cfg, dict):
        raise SimulationConfigError(f"{where or 'configuration'}: expected a mapping, got {cfg!r}")
    unknown = sorted(set(cfg) - set(spec))
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise SimulationConfigError(f"unknown key '{name}' (known: {', '.join(sorted(spec))})")
    out = {}
    for key, check in spec.items():
        name = f"{where}.{key}" if where else key
        if key not in cfg:
            raise SimulationConfigError(f"missing key '{name}'")
        out[key] = validate(cfg[key], check, name) if isinstance(check, dict) else check(name, cfg[key])
    mc = out.get("maskclip")
    if mc is not None:
        total = mc["accuracy"] + mc["group_confusion"] + mc["uniform_confusion"]
        if abs(total - 1.0) > 1e-6:
            raise SimulationConfigError(f"maskclip.accuracy + maskclip.group_confusion + maskclip.uniform_confusion "
                                        f"must sum to 1 (a confusion-matrix row), got {total:g}")
        if mc["feat_dim"] > mc["embed_dim"]:
            raise SimulationConfigError(f"maskclip.feat_dim {mc['feat_dim']} exceeds maskclip.embed_dim "
                                        f"{mc['embed_dim']}")
    sam = out.get("sam")
    if sam is not None and sam["feat_dim"] > sam["embed_dim"]:
        raise SimulationConfigError(f"sam.feat_dim {sam['feat_dim']} exceeds sam.embed_dim {sam['embed_dim']}")
    return out


def load_config(name_or_path: str | Path = DEFAULT_CONFIG, overrides: dict | None = None) -> dict:
    """The validated knobs: ``pipeline/simulate/configs/default.yaml`` with the file ``name_or_path`` (and then
    ``overrides``, a nested dict) merged over it."""
    default = _read_yaml(CONFIG_DIR / f"{DEFAULT_CONFIG}.yaml")
    path = resolve_config_path(name_or_path)
    try:
        cfg = _merge(default, _read_yaml(path), "")
        if overrides:
            cfg = _merge(cfg, overrides, "")
        return validate(cfg)
    except SimulationConfigError as e:
        raise SimulationConfigError(f"{path}: {e}") from None
