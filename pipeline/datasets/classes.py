"""Class lists of the benchmarks, in one place (index = position; 255 = ignore everywhere).

nuScenes-16 comes from the nuscenes-devkit's lidarseg class mapper (its coarse index minus one, since the
devkit's index 0 is 'ignore'); ScanNet-20 is the benchmark's NYU40 subset as used by mmdetection3d.
"""
from __future__ import annotations

from functools import lru_cache

from data_cache.schema import IGNORE_INDEX


def devkit_mapper():
    """nuscenes-devkit's ``LidarsegClassMapper`` with its name and colour tables only (no dataroot needed)."""
    from nuscenes.eval.lidarseg.utils import LidarsegClassMapper
    # The mapper's name tables need no dataset; only its fine-index table does (built per dataroot).
    mapper = LidarsegClassMapper.__new__(LidarsegClassMapper)
    mapper.ignore_class = mapper.get_ignore_class()
    return mapper


@lru_cache(maxsize=None)
def nuscenes16() -> tuple[str, ...]:
    mapper = devkit_mapper()
    coarse = mapper.get_coarse2idx()
    ignore = mapper.ignore_class["index"]
    return tuple(name for name, idx in sorted(coarse.items(), key=lambda kv: kv[1]) if idx != ignore)


@lru_cache(maxsize=None)
def nuscenes_fine_to_16() -> dict[str, int]:
    """Fine lidarseg class name (e.g. 'vehicle.car') -> nuScenes-16 index or 255."""
    mapper = devkit_mapper()
    names = nuscenes16()
    out = {}
    for fine, coarse in mapper.get_fine2coarse().items():
        out[fine] = names.index(coarse) if coarse in names else IGNORE_INDEX
    return out


SCANNET20 = ("wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
             "picture", "counter", "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink",
             "bathtub", "otherfurniture")
SCANNET20_NYU40_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)

#: The words each class gets in CLIP's prompts, by dataset and canonical class name (index order as above):
#: the names CLIP2Scene (Chen et al., CVPR 2023) embedded for its text classifier, which the CNS paper builds
#: on -- ``nuscenes_classes`` and ``scannet_classes`` of ``utils/prompt_engineering.py`` in
#: github.com/runnanchen/CLIP2Scene (commit 875ce71), the script that wrote its ``nuscenes_ViT16_clip_text.pth``.
#: Verbatim: ``traffic_cone`` and ``other_flat`` keep their underscores there, and so here. The store's
#: ``class_names`` stay the dataset's own; :mod:`pipeline.models.prompts` uses these, and the ``maskclip``
#: stage records the names it used in its fingerprint.
PROMPT_NAMES: dict[str, dict[str, str]] = {
    "nuscenes": {
        "barrier": "barrier", "bicycle": "bicycle", "bus": "bus", "car": "car",
        "construction_vehicle": "construction vehicle", "motorcycle": "motorcycle", "pedestrian": "pedestrian",
        "traffic_cone": "traffic_cone", "trailer": "trailer", "truck": "truck",
        "driveable_surface": "driveable surface", "other_flat": "other_flat", "sidewalk": "sidewalk",
        "terrain": "terrain", "manmade": "manmade", "vegetation": "vegetation",
    },
    "scannet": {**{name: name for name in SCANNET20}, "otherfurniture": "other furniture"},
}


def nyu40_to_scannet20_lut():
    """A 256-entry uint8 lookup table NYU40 id -> ScanNet-20 index (255 for every other id)."""
    import numpy as np
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for idx, nyu in enumerate(SCANNET20_NYU40_IDS):
        lut[nyu] = idx
    return lut
