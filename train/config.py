"""Training configuration: YAML files shipped in ``train/configs/``, ``key=value`` overrides, the resolved dump.

A configuration is a nested dict. :data:`DEFAULTS` holds every key with its default; a YAML file overrides
some of them (and may name a ``_base_`` file in the same folder; ``_base_: "{like}.yaml"`` is the settings of
the benchmark a folder dataset's ``dataset.json`` says it is ``like``, as its store records them); command-line ``a.b=value`` overrides come
last (``value`` is parsed as YAML, so ``8``, ``true``, ``[clip2d, pred3d]`` and ``null`` work). Unknown keys
are an error, so a typo never silently trains with a default.

Ablation switches (paper Table 2) are ordinary keys; ``ablation=<name>`` is a shortcut that sets the keys
listed in :data:`ABLATIONS`. Both the name and the keys it set are in the dump, so every run records its
switches in ``RUN_DIR/config.yaml``.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable, Mapping

import yaml

from data_cache.schema import SCHEMA_VERSION
from pipeline.registry import resolve_shipped_config, shipped_config_dir, shipped_configs
from data_cache.errors import UserError

CONFIG_DIR = shipped_config_dir("train")

#: The four stage-2 label sources of Eq. 6 (paper section 3.2).
LABEL_SOURCES = ("clip2d", "clip3d", "pred2d", "pred3d")
#: Units of the Eq. 6 draw: ``pair`` (the paper's R*_i: one draw per pixel-point pair, shared by the 2D and
#: the 3D term) or ``frame`` (one draw per frame and network).
SWITCH_UNITS = ("pair", "frame")
#: ``labels.point_targets``: the 3D cross-entropy's terms (train/labels.py): one per pixel-point pair (the
#: paper's Eq. 5-6) or one per point from its first pair.
POINT_TARGETS = ("pairs", "first_pair")
#: ``labels.switch_gate``: where a network's own prediction may be drawn in stage 2 (train/labels.py):
#: everywhere (the paper), where its softmax confidence reaches ``labels.gate_confidence``, or where it agrees
#: with the SAM-refined CLIP label of the element.
SWITCH_GATES = ("none", "confidence", "agree_sam")
#: ``loss.class_balance``: how the classes of one batch's targets weigh in the cross-entropy (train/losses.py).
CLASS_BALANCE = ("none", "sqrt_inverse")
#: what a folder dataset's ``like`` may name: the configurations ``_base_: "{like}.yaml"`` resolves to
FOLDER_LIKE = ("nuscenes", "scannet")

DEFAULTS: dict = {
    "seed": 0,
    "ablation": "none",
    "init_from": None,              # set by --init-from: the parent checkpoint this run started from

    "data": {
        "voxel_size": 0.1,          # metres; 0.1 nuScenes / synthetic street, 0.05 ScanNet / synthetic indoor
        "images_per_frame": 0,      # 0 = every image of the frame (nuScenes: the 6 cameras); ScanNet: 8/16/32
        "image_size": None,         # [H, W] fed to the 2D net; null = the store's training resolution
        "use_xyz": True,            # append the (augmented) coordinates to points/feat
        "num_workers": 2,
        "batch_size": 2,            # frames per step and process
        "class_names": None,        # null = the first store's; fixed in the dump so a resume checks it
        "text_embed_sha256": None,  # idem for clip/text_embed
        "schema_version": SCHEMA_VERSION,
        "augment": {
            "rotate_z": True,       # random rotation about z in [0, 2 pi)
            "flip_xy": True,        # random flips of the x and y axes
            "scale": [0.95, 1.05],  # random isotropic scaling of the points
            "hflip": True,          # random horizontal image flip
            "crop_scale": [0.5, 1.0],   # random resized crop: area fraction; [1, 1] = no crop
            "crop_ratio": [0.75, 1.333],
            "color_jitter": None,   # [brightness, contrast, saturation, hue] of the images (ColorJitter); null = off
        },
    },
    "model": {
        "net2d": "deeplabv3_resnet50",   # registry MODELS_2D
        "net3d": "minkunet34",           # registry MODELS_3D; null = 2D only (nuImages): no 3D net, sources, loss
        "pretrained_2d": True,           # ImageNet backbone weights; a missing download is an error
        "sparse_backend": "spconv",      # spconv | spconv_triton (train/sparse.py): the 3D net's sparse convolutions
    },
    "schedule": {
        "epochs": 30,
        "warmup_epochs": 10,        # stage 1 (CLIP labels only); stage 2 afterwards
        "optimizer": "sgd",         # sgd (the paper's) | adamw (CPU studies: from-scratch small nets)
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "amp": True,                # mixed precision on CUDA only
        "max_steps_per_epoch": 0,   # 0 = the whole dataset (tests and benchmarks cap it)
        "log_interval": 10,
        "grad_clip": 0.0,
        "keep_checkpoints": 3,      # epoch_NNN.pth files kept besides last.pth (0 = all)
    },
    "labels": {
        "refine": True,             # SAM max-voting (Eq. 4) of every target; false = 'w/o refinement'
        "stage2_sources": list(LABEL_SOURCES),
        "cross_training": True,     # false: each net learns only from its own modality's sources
        "switch": "pair",           # Eq. 6 draw unit: pair (one draw per pixel-point pair, the paper) | frame
        "point_targets": "pairs",   # 3D CE terms: pairs (every pixel-point pair, the paper's Eq. 5-6) |
                                    # first_pair (a point's first pair only; the benchmark's committed runs)
        "switch_gate": "none",      # pred2d/pred3d drawn: everywhere (none, the paper) | confidence | agree_sam
        "gate_confidence": 0.5,     # switch_gate=confidence: the softmax probability a prediction must reach
                                    # (more than half the mass; 0.9 let nothing through in rooms, docs/results.md)
        "oracle": False,            # sanity row, not the method: every target is the store's ground truth
    },
    "loss": {
        "weight_2d": 1.0,
        "weight_3d": 1.0,
        "latent_target": "sam",     # Eq. 7 target: sam | clip (clip/feat) | sam+clip (both, concatenated) | none
        "weight_latent": 1.0,
        "class_balance": "none",    # CE class weights: none (the paper's) | sqrt_inverse (per batch; CPU studies)
    },
    "eval": {
        "post_refine": False,       # SAM max-voting of the predictions at inference (headline metric)
        "images_per_frame": 0,      # 0 = every image
        "interval": 1,              # evaluate every N epochs (0 = only at the end)
        "at_end": True,             # evaluate after the last epoch
        "bn_recalibration_images": 256,  # re-estimate BatchNorm statistics on this many training images
                                          # before each evaluation and the final checkpoint (0 = never)
    },
}

#: ``ablation=<name>`` -> the keys it sets: one preset per trained row of the paper's Table 2 (the rows
#: 'Baseline' and 'w/o CNS' train nothing: they are the ``clip_*`` and ``wo_cns_*`` rows of every evaluation).
ABLATIONS: dict[str, dict] = {
    "none": {},                     # the full method ('Ours')
    # 'Base+CLIP': both nets self-trained on the raw CLIP labels: no SAM refinement, no switching, no Eq. 7
    "base_clip": {"labels.refine": False, "labels.stage2_sources": ["clip2d"], "loss.latent_target": "none"},
    # 'Base+CLIP+LSC': the same plus the latent space consistency with SAM (Eq. 7)
    "base_clip_lsc": {"labels.refine": False, "labels.stage2_sources": ["clip2d"], "loss.latent_target": "sam"},
    "no_refine": {"labels.refine": False},
    "no_cross_training": {"labels.cross_training": False},
    "no_self_cross_training": {"labels.stage2_sources": ["clip2d", "clip3d"]},
    "no_clip_stage2": {"labels.stage2_sources": ["pred2d", "pred3d"]},
    # 'w 2D' / 'w 3D': one network's prediction supervises both networks in stage 2, no CLIP labels (the
    # paper's numbers collapse like 'w/o CLIP')
    "pred2d_only": {"labels.stage2_sources": ["pred2d"]},
    "pred3d_only": {"labels.stage2_sources": ["pred3d"]},
    "latent_sam": {"loss.latent_target": "sam"},
    "latent_clip": {"loss.latent_target": "clip"},
    "latent_sam_clip": {"loss.latent_target": "sam+clip"},
    "latent_none": {"loss.latent_target": "none"},
    "post_refine": {"eval.post_refine": True},
    "images_8": {"data.images_per_frame": 8},
    "images_16": {"data.images_per_frame": 16},
    "images_32": {"data.images_per_frame": 32},
    "switch_frame": {"labels.switch": "frame"},  # not a paper row: one draw per frame and network
    # not a paper row: a point's first pair as its 3D target instead of every pair (the reading before issue 26)
    "first_pair": {"labels.point_targets": "first_pair"},
    # not paper rows: stage 2 draws a network's prediction only where it is confident / agrees with the
    # SAM-refined CLIP label (labels.switch_gate; not measured yet)
    "gate_confidence": {"labels.switch_gate": "confidence"},
    "gate_agree_sam": {"labels.switch_gate": "agree_sam"},
    # not a paper row: the same networks and schedule trained on the ground truth (the upper bound a
    # benchmark must reach before its noisy rows mean anything)
    "oracle": {"labels.oracle": True},
}


#: Keys added after runs were dumped, with the value that reproduces what such a run computed: a ``config.yaml``
#: without one of them reads it as that value (:func:`backfill_added_keys`), so a resume of an older run is
#: checked against what it did -- and refused when the configuration now resolves the key otherwise.
#: (``gate_confidence`` acts only with ``switch_gate: confidence``, so any value reproduces an older run: the
#: default, so that the run digests of every other row stay as they were.)
ADDED_KEYS = {"labels.point_targets": "first_pair", "labels.switch_gate": "none", "labels.gate_confidence": 0.5}


def backfill_added_keys(dumped: dict) -> dict:
    """``dumped`` (a run's resolved configuration as written) with every :data:`ADDED_KEYS` key it lacks set to
    its value from before the key existed. Modifies and returns ``dumped``."""
    for dotted, before in ADDED_KEYS.items():
        section, key = dotted.split(".")
        if isinstance(dumped.get(section), dict):
            dumped[section].setdefault(key, copy.deepcopy(before))
    return dumped


class ConfigError(UserError, ValueError):
    pass


#: keys whose value may be null besides those whose default is null
NULLABLE = ("model.net3d", "data.augment.scale")  # 2D only; no point scaling
#: smallest allowed value of numeric keys (a number key not listed only has to be a number)
MINIMUM = {"data.batch_size": 1, "data.num_workers": 0, "data.images_per_frame": 0, "schedule.epochs": 0,
           "schedule.warmup_epochs": 0, "schedule.momentum": 0, "schedule.weight_decay": 0,
           "schedule.max_steps_per_epoch": 0, "schedule.log_interval": 1, "schedule.grad_clip": 0,
           "schedule.keep_checkpoints": 0, "loss.weight_2d": 0, "loss.weight_3d": 0, "loss.weight_latent": 0,
           "eval.images_per_frame": 0, "eval.interval": 0, "eval.bn_recalibration_images": 0}
#: numeric keys that must be above zero
POSITIVE = ("schedule.lr", "data.voxel_size")


def _what_it_takes(default) -> str:
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, str):
        return "a string"
    return "a list"


def _type_ok(value, default) -> bool:
    """Whether ``value`` has the type of ``default`` (an integer is a number; a bool is neither)."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def check_types(cfg: Mapping, defaults: Mapping = DEFAULTS, where: str = "") -> None:
    """Every key holds a value of its default's type (null only where the default is null or the key is
    :data:`NULLABLE`), within :data:`MINIMUM` / :data:`POSITIVE`; else one line naming the key and what it takes."""
    for key, default in defaults.items():
        dotted, value = f"{where}{key}", cfg.get(key)
        if isinstance(default, dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{dotted} must be a mapping of keys ({', '.join(sorted(default))}), got {value!r}")
            check_types(value, default, f"{dotted}.")
            continue
        if default is None or (value is None and dotted in NULLABLE):
            continue
        if not _type_ok(value, default):
            raise ConfigError(f"{dotted} takes {_what_it_takes(default)}{' or null' if dotted in NULLABLE else ''}, "
                              f"got {value!r}")
        if dotted in MINIMUM and value < MINIMUM[dotted]:
            raise ConfigError(f"{dotted} takes {_what_it_takes(default)} >= {MINIMUM[dotted]}, got {value!r}")
        if dotted in POSITIVE and value <= 0:
            raise ConfigError(f"{dotted} takes {_what_it_takes(default)} > 0, got {value!r}")


def _merge(base: dict, over: Mapping, where: str) -> dict:
    for k, v in over.items():
        if k == "_base_":
            continue
        if k not in base:
            raise ConfigError(f"unknown configuration key '{where}{k}' (known: {', '.join(sorted(base))})")
        if isinstance(base[k], dict) and isinstance(v, Mapping):
            _merge(base[k], v, f"{where}{k}.")
        else:
            base[k] = copy.deepcopy(v)
    return base


def _load_yaml_chain(path: Path, like: str | None = None) -> list[dict]:
    data = yaml.safe_load(path.read_text()) or {}
    chain = []
    if "_base_" in data:
        base = str(data["_base_"])
        if "{like}" in base:
            if like not in FOLDER_LIKE:
                raise ConfigError(f"{path.name} takes the settings of the benchmark the store's dataset.json names "
                                  f"in 'like' ({' or '.join(FOLDER_LIKE)}); the training store records "
                                  f"{like!r}: set \"like\" in dataset.json and rebuild the store, or pick a config")
            base = base.replace("{like}", like)
        chain += _load_yaml_chain((path.parent / base).resolve(), like)
    return chain + [data]


def set_key(cfg: dict, dotted: str, value) -> None:
    node = cfg
    parts = dotted.split(".")
    for i, p in enumerate(parts[:-1]):
        if not isinstance(node.get(p), dict):
            raise ConfigError(f"unknown configuration key '{'.'.join(parts[:i + 1])}' in override '{dotted}'")
        node = node[p]
    if parts[-1] not in node:
        raise ConfigError(f"unknown configuration key '{dotted}'")
    node[parts[-1]] = value


def get_key(cfg: dict, dotted: str):
    node = cfg
    for p in dotted.split("."):
        node = node[p]
    return node


def parse_overrides(items: Iterable[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def available_configs() -> list[str]:
    """The configurations shipped in ``train/configs`` (discovered from the folder)."""
    return shipped_configs(CONFIG_DIR)


def resolve_config_path(name_or_path: str | Path) -> Path:
    return resolve_shipped_config(CONFIG_DIR, name_or_path, ConfigError, "training configuration")


def store_like(store_paths) -> str | None:
    """The benchmark a folder dataset's store says it is like (``dataset_config.like``), else None."""
    from data_cache.store import Store
    return (Store(store_paths[0]).attrs.dataset_config or {}).get("like") if store_paths else None


def load_config(path: str | Path | None = None, overrides: Mapping | Iterable[str] = (), like: str | None = None) -> dict:
    """DEFAULTS, then the YAML chain of ``path``, then ``overrides``; ``like``: see the module docstring."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        for layer in _load_yaml_chain(resolve_config_path(path), like):
            _merge(cfg, layer, "")
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    overrides = dict(overrides)
    ablation = overrides.pop("ablation", cfg["ablation"])
    if ablation not in ABLATIONS:
        raise ConfigError(f"unknown ablation '{ablation}' (known: {', '.join(ABLATIONS)})")
    cfg["ablation"] = ablation
    for k, v in ABLATIONS[ablation].items():  # the preset first, explicit overrides win
        set_key(cfg, k, copy.deepcopy(v))
    for k, v in overrides.items():
        set_key(cfg, k, v)
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    check_types(cfg)
    bad = [s for s in cfg["labels"]["stage2_sources"] if s not in LABEL_SOURCES]
    if bad or not cfg["labels"]["stage2_sources"]:
        raise ConfigError(f"labels.stage2_sources must be a non-empty subset of {LABEL_SOURCES}, got "
                          f"{cfg['labels']['stage2_sources']}")
    if cfg["loss"]["latent_target"] not in ("sam", "clip", "sam+clip", "none"):
        raise ConfigError(f"loss.latent_target must be sam, clip, sam+clip or none, got "
                          f"'{cfg['loss']['latent_target']}'")
    if cfg["loss"]["class_balance"] not in CLASS_BALANCE:
        raise ConfigError(f"loss.class_balance must be one of {CLASS_BALANCE}, got '{cfg['loss']['class_balance']}'")
    if not cfg["model"]["net3d"]:
        three_d = [x for x in cfg["labels"]["stage2_sources"] if x in ("clip3d", "pred3d")]
        if three_d:
            raise ConfigError(f"model.net3d is null (2D only): labels.stage2_sources cannot hold {three_d}; "
                              "use [clip2d, pred2d] or a subset")
    if cfg["labels"]["point_targets"] not in POINT_TARGETS:
        raise ConfigError(f"labels.point_targets must be one of {POINT_TARGETS}, got "
                          f"'{cfg['labels']['point_targets']}'")
    if cfg["labels"]["switch_gate"] not in SWITCH_GATES:
        raise ConfigError(f"labels.switch_gate must be one of {SWITCH_GATES}, got '{cfg['labels']['switch_gate']}'")
    if not 0 <= float(cfg["labels"]["gate_confidence"]) <= 1:
        raise ConfigError(f"labels.gate_confidence must lie in [0, 1], got {cfg['labels']['gate_confidence']}")
    from .sparse import sparse_backend
    sparse_backend(cfg["model"]["sparse_backend"])  # a known backend (whether it loads is checked at build time)
    if cfg["labels"]["switch"] not in SWITCH_UNITS:
        raise ConfigError(f"labels.switch must be one of {SWITCH_UNITS}, got '{cfg['labels']['switch']}'")
    jitter = cfg["data"]["augment"].get("color_jitter")
    if jitter is not None and not (isinstance(jitter, (list, tuple)) and len(jitter) == 4
                                   and all(isinstance(v, (int, float)) and v >= 0 for v in jitter)
                                   and max(jitter[:3]) <= 1 and jitter[3] <= 0.5):
        raise ConfigError(f"data.augment.color_jitter must be null or [brightness, contrast, saturation, hue] with "
                          f"the first three in [0, 1] and hue in [0, 0.5], got {jitter}")
    s = cfg["schedule"]
    if s["optimizer"] not in ("sgd", "adamw"):
        raise ConfigError(f"schedule.optimizer must be sgd or adamw, got '{s['optimizer']}'")
    if not 0 <= s["warmup_epochs"] <= s["epochs"]:
        raise ConfigError(f"schedule.warmup_epochs ({s['warmup_epochs']}) must lie in 0..epochs ({s['epochs']})")


def dump_config(cfg: Mapping, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(dict(cfg), sort_keys=False, default_flow_style=None))
