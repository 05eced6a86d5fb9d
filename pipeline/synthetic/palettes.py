"""Named base colours shared between classes, and per-instance colour variation.

Classes draw their colours from overlapping lists on purpose (grey asphalt, grey walls, grey cars, green
grass and green cars), so a model cannot separate classes by colour alone.
"""
from __future__ import annotations

import colorsys

import numpy as np

COLOURS = {
    "white": (0.86, 0.86, 0.84), "light_grey": (0.66, 0.67, 0.67), "grey": (0.47, 0.48, 0.49),
    "dark_grey": (0.27, 0.27, 0.29), "black": (0.09, 0.09, 0.10), "red": (0.62, 0.13, 0.11),
    "dark_red": (0.40, 0.10, 0.09), "blue": (0.16, 0.27, 0.56), "light_blue": (0.58, 0.68, 0.78),
    "yellow": (0.86, 0.72, 0.18), "orange": (0.90, 0.46, 0.12), "green": (0.22, 0.45, 0.19),
    "dark_green": (0.13, 0.28, 0.12), "olive": (0.42, 0.44, 0.22), "brown": (0.43, 0.31, 0.20),
    "wood": (0.60, 0.44, 0.28), "beige": (0.79, 0.71, 0.56), "brick": (0.60, 0.31, 0.23),
    "cream": (0.90, 0.87, 0.76), "pale_green": (0.70, 0.78, 0.66), "navy": (0.12, 0.15, 0.32),
}


def pick_colour(rng: np.random.Generator, names: tuple[str, ...], spread: float = 0.12) -> np.ndarray:
    """One of the named colours, varied per instance in brightness and per channel by about ``spread``."""
    base = np.array(COLOURS[names[rng.integers(len(names))]])
    varied = base * rng.uniform(1 - spread, 1 + spread) * rng.uniform(1 - spread / 3, 1 + spread / 3, 3)
    return np.clip(varied, 0.0, 1.0)


#: version of the class colours (:func:`class_colour_table` and the brightness :func:`wear_class_colours`
#: keeps); in the fingerprint of every store with class colours, so a store of another version is never reused.
#: 1: hues a golden-ratio step apart at two brightness levels, drawn brightness kept within x0.6-1.4 -- left
#: same-brightness class pairs 20 degrees of hue apart and the levels blurred by the drawn brightness (rooms:
#: bed/counter; streets: car/other flat), so even a network trained on ground truth missed such classes.
#: 2: classes apart in chromaticity, which neither the drawn brightness nor the shading changes.
CLASS_COLOUR_VERSION = 2
#: saturation levels of the class colours (version 2) and the range the drawn brightness is kept in
CLASS_SATURATIONS = (0.85, 0.4)
CLASS_BRIGHTNESS_RANGE = (0.8, 1.2)


def class_colour_table(num_classes: int) -> np.ndarray:
    """One colour per class [L, 3], apart in chromaticity: ceil(L / 2) hues evenly round the wheel, each at the
    two saturations of ``CLASS_SATURATIONS`` (value 0.75). Class ids take the (hue, saturation) slots in
    golden-ratio order, so neighbouring ids (often similar classes) are far apart on the wheel. With 20 classes
    any two colours differ by 36 degrees of hue or by 0.45 of saturation."""
    hues = -(-num_classes // len(CLASS_SATURATIONS))
    slot_of_class = np.argsort(np.argsort([(i * 0.618034) % 1.0 for i in range(num_classes)]))
    table = np.zeros((num_classes, 3))
    for cls, slot in enumerate(slot_of_class):
        hue, level = divmod(int(slot), len(CLASS_SATURATIONS))
        table[cls] = colorsys.hsv_to_rgb(hue / hues, CLASS_SATURATIONS[level], 0.75)
    return table


def wear_class_colours(labels: np.ndarray, albedo: np.ndarray, chosen: np.ndarray, num_classes: int) -> np.ndarray:
    """``albedo`` [N, 3] with the rows where ``chosen`` [N] holds recoloured to their class's colour of
    :func:`class_colour_table`; each keeps its drawn brightness (mean albedo / 0.5, clipped to
    ``CLASS_BRIGHTNESS_RANGE``) so instances still vary. Rows of unlabelled parts (``labels`` >= ``num_classes``:
    ceilings) are kept."""
    table = class_colour_table(num_classes)
    out = np.array(albedo, dtype=np.float64, copy=True)
    rows = np.flatnonzero(chosen & (labels < num_classes))
    brightness = np.clip(out[rows].mean(1, keepdims=True) / 0.5, *CLASS_BRIGHTNESS_RANGE)
    out[rows] = np.clip(table[labels[rows]] * brightness, 0.0, 1.0)
    return out.astype(np.asarray(albedo).dtype)
