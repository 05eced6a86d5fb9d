"""Class colours: the palettes people know, looked up by class name.

* nuScenes-lidarseg: the devkit's colours, ``LidarsegClassMapper.get_coarse2color`` for the 16 challenge
  classes and ``nuscenes.utils.color_map.get_colormap`` for the 32 general classes.
* ScanNet: the benchmark's NYU40 palette (``create_color_palette`` in ScanNet's ``BenchmarkScripts/util.py``),
  read at each ScanNet-20 class's NYU40 id.

A class list made only of names of one of these palettes gets those colours; any other list gets
matplotlib's ``tab20`` qualitative colours in class order. Unlabelled (255) is black in every palette.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from data_cache.schema import IGNORE_INDEX

UNLABELLED = (0, 0, 0)

#: ScanNet BenchmarkScripts/util.py ``create_color_palette()``: RGB per NYU40 id 0..40
SCANNET_NYU40_PALETTE = (
    (0, 0, 0), (174, 199, 232), (152, 223, 138), (31, 119, 180), (255, 187, 120), (188, 189, 34), (140, 86, 75),
    (255, 152, 150), (214, 39, 40), (197, 176, 213), (148, 103, 189), (196, 156, 148), (23, 190, 207),
    (178, 76, 76), (247, 182, 210), (66, 188, 102), (219, 219, 141), (140, 57, 197), (202, 185, 52),
    (51, 176, 203), (200, 54, 131), (92, 193, 61), (78, 71, 183), (172, 114, 82), (255, 127, 14),
    (91, 163, 138), (153, 98, 156), (140, 153, 101), (158, 218, 229), (100, 125, 154), (178, 127, 135),
    (120, 185, 128), (146, 111, 194), (44, 160, 44), (112, 128, 144), (96, 207, 209), (227, 119, 194),
    (213, 92, 176), (94, 106, 211), (82, 84, 163), (100, 85, 144),
)


@lru_cache(maxsize=None)
def nuscenes_colours() -> dict[str, tuple]:
    """Class name -> RGB for the nuScenes-lidarseg 16 challenge classes and the 32 general classes."""
    from nuscenes.utils.color_map import get_colormap

    from pipeline.datasets.classes import devkit_mapper
    coarse = devkit_mapper().get_coarse2color()
    coarse.pop(devkit_mapper().ignore_class["name"], None)
    return {**{k: tuple(v) for k, v in get_colormap().items()}, **{k: tuple(v) for k, v in coarse.items()}}


@lru_cache(maxsize=None)
def scannet_colours() -> dict[str, tuple]:
    """ScanNet-20 class name -> RGB (the benchmark palette at the class's NYU40 id)."""
    from pipeline.datasets.classes import SCANNET20, SCANNET20_NYU40_IDS
    return {name: SCANNET_NYU40_PALETTE[nyu] for name, nyu in zip(SCANNET20, SCANNET20_NYU40_IDS)}


@dataclass(frozen=True)
class Palette:
    """Colours of a class list: ``lut`` [256, 3] uint8 (index 255 and unused indices are black)."""

    name: str
    class_names: tuple
    lut: np.ndarray

    def colour(self, index: int) -> tuple:
        return tuple(int(c) for c in self.lut[index])

    def colourize(self, labels: np.ndarray) -> np.ndarray:
        """Class indices (any shape) -> uint8 RGB of the same shape + (3,)."""
        return self.lut[np.asarray(labels).astype(np.int64).clip(0, 255)]

    def hex(self, index: int) -> str:
        return "#%02x%02x%02x" % self.colour(index)


def palette_for(class_names) -> Palette:
    """The palette for a store's class list (see the module docstring)."""
    names = tuple(class_names)
    lut = np.tile(np.array(UNLABELLED, np.uint8), (256, 1))
    for title, colours in (("ScanNet benchmark", scannet_colours),
                           ("nuScenes-lidarseg (nuscenes-devkit)", nuscenes_colours)):
        table = colours()
        if all(n in table for n in names):
            for i, n in enumerate(names):
                lut[i] = table[n]
            return Palette(title, names, lut)
    import matplotlib
    cmap = matplotlib.colormaps["tab20"]
    for i in range(min(len(names), IGNORE_INDEX)):
        lut[i] = np.round(np.array(cmap(i % cmap.N)[:3]) * 255)
    return Palette("matplotlib tab20", names, lut)
