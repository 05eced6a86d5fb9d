"""Text prompts for CLIP's dense labels: the prompt templates and the class names, per dataset, in one place.

``TEMPLATES`` are the 85 templates of MaskCLIP (Zhou et al., ECCV 2022): CLIP's 80 ImageNet templates
(Radford et al. 2021, the ``prompt engineering`` notebook) followed by five scene templates. A class's text
embedding is the normalised mean of its normalised prompt embeddings (:func:`pipeline.models.maskclip.
build_text_embeddings`).

The words put in the templates for a benchmark's canonical class name (``pipeline.datasets.classes``) are, by
default, the names CLIP2Scene used (:data:`pipeline.datasets.classes.PROMPT_NAMES`: ScanNet's
``otherfurniture`` is "other furniture"); with ``descriptive`` they may name what the class looks like in an
image (``driveable_surface`` -> ``road``, :data:`DESCRIPTIVE_NAMES`) and may list several synonyms, whose
prompts are all averaged into the one class embedding. Names in neither table (an open-vocabulary query) are
used as they are, underscores replaced by spaces. A dataset without its own table (``synthetic``, whose
classes are nuScenes-16 or ScanNet-20) and ``dataset=None`` look a name up in every table.
"""
from __future__ import annotations

from typing import Sequence

from pipeline.datasets.classes import PROMPT_NAMES

#: CLIP's 80 ImageNet prompt templates.
IMAGENET_TEMPLATES = (
    'a bad photo of a {}.',
    'a photo of many {}.',
    'a sculpture of a {}.',
    'a photo of the hard to see {}.',
    'a low resolution photo of the {}.',
    'a rendering of a {}.',
    'graffiti of a {}.',
    'a bad photo of the {}.',
    'a cropped photo of the {}.',
    'a tattoo of a {}.',
    'the embroidered {}.',
    'a photo of a hard to see {}.',
    'a bright photo of a {}.',
    'a photo of a clean {}.',
    'a photo of a dirty {}.',
    'a dark photo of the {}.',
    'a drawing of a {}.',
    'a photo of my {}.',
    'the plastic {}.',
    'a photo of the cool {}.',
    'a close-up photo of a {}.',
    'a black and white photo of the {}.',
    'a painting of the {}.',
    'a painting of a {}.',
    'a pixelated photo of the {}.',
    'a sculpture of the {}.',
    'a bright photo of the {}.',
    'a cropped photo of a {}.',
    'a plastic {}.',
    'a photo of the dirty {}.',
    'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.',
    'a photo of the {}.',
    'a good photo of the {}.',
    'a rendering of the {}.',
    'a {} in a video game.',
    'a photo of one {}.',
    'a doodle of a {}.',
    'a close-up photo of the {}.',
    'a photo of a {}.',
    'the origami {}.',
    'the {} in a video game.',
    'a sketch of a {}.',
    'a doodle of the {}.',
    'a origami {}.',
    'a low resolution photo of a {}.',
    'the toy {}.',
    'a rendition of the {}.',
    'a photo of the clean {}.',
    'a photo of a large {}.',
    'a rendition of a {}.',
    'a photo of a nice {}.',
    'a photo of a weird {}.',
    'a blurry photo of a {}.',
    'a cartoon {}.',
    'art of a {}.',
    'a sketch of the {}.',
    'a embroidered {}.',
    'a pixelated photo of a {}.',
    'itap of the {}.',
    'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.',
    'a plushie {}.',
    'a photo of the nice {}.',
    'a photo of the small {}.',
    'a photo of the weird {}.',
    'the cartoon {}.',
    'art of the {}.',
    'a drawing of the {}.',
    'a photo of the large {}.',
    'a black and white photo of a {}.',
    'the plushie {}.',
    'a dark photo of a {}.',
    'itap of a {}.',
    'graffiti of the {}.',
    'a toy {}.',
    'itap of my {}.',
    'a photo of a cool {}.',
    'a photo of a small {}.',
    'a tattoo of the {}.',
)

#: The five scene templates MaskCLIP adds.
SCENE_TEMPLATES = (
    'there is a {} in the scene.',
    'there is the {} in the scene.',
    'this is a {} in the scene.',
    'this is the {} in the scene.',
    'this is one {} in the scene.',
)

#: The 85 templates used for every class.
TEMPLATES = IMAGENET_TEMPLATES + SCENE_TEMPLATES

#: dataset -> canonical class name -> descriptive name(s). Classes missing here use their plain name.
DESCRIPTIVE_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "nuscenes": {
        "barrier": ("barrier", "concrete barrier"),
        "bicycle": ("bicycle",),
        "bus": ("bus",),
        "car": ("car",),
        "construction_vehicle": ("construction vehicle", "excavator"),
        "motorcycle": ("motorcycle",),
        "pedestrian": ("person", "pedestrian"),
        "traffic_cone": ("traffic cone",),
        "trailer": ("trailer",),
        "truck": ("truck",),
        "driveable_surface": ("road",),
        "other_flat": ("curb", "traffic island"),
        "sidewalk": ("sidewalk",),
        "terrain": ("grass", "terrain"),
        "manmade": ("building", "wall", "pole", "fence"),
        "vegetation": ("tree", "bush"),
    },
    "scannet": {
        "otherfurniture": ("furniture",),
        "bookshelf": ("bookshelf",),
        "picture": ("picture", "painting"),
        "counter": ("counter", "kitchen counter"),
        "refrigerator": ("refrigerator", "fridge"),
    },
}

DESCRIPTIVE_NAMES["nuimages"] = DESCRIPTIVE_NAMES["nuscenes"]  # nuImages is labelled with the nuScenes-16 classes


def plain_name(name: str) -> str:
    """The canonical class name made readable: ``traffic_cone`` -> ``traffic cone``."""
    return name.replace("_", " ").strip()


def class_texts(class_names: Sequence[str], descriptive: bool = False,
                dataset: str | None = None, own_names: dict | None = None) -> list[tuple[str, ...]]:
    """The word(s) to put in the templates for each class, in class order.

    Args:
        class_names: canonical class names (index = class).
        descriptive: use ``DESCRIPTIVE_NAMES`` where a class is listed there.
        dataset: which tables to use; ``None`` or a dataset without tables searches every dataset's (names
            are unambiguous across the benchmarks).
        own_names: the dataset's own prompt words per class (a folder dataset's ``prompt_names``); they win.
    Returns:
        One tuple of synonyms per class: the CLIP2Scene prompt name (a single one) unless ``descriptive``
        lists the class; else the plain name.
    """
    def lookup(table: dict, name: str):
        tables = [table[dataset]] if dataset in table else list(table.values())
        return next((t[name] for t in tables if name in t), None)

    out = []
    for name in class_names:
        if own_names and name in own_names:
            out.append((own_names[name],))
            continue
        words = lookup(DESCRIPTIVE_NAMES, name) if descriptive else None
        if not words:
            words = (lookup(PROMPT_NAMES, name) or plain_name(name),)
        out.append(tuple(words))
    return out


def prompts_for(words: str, templates: Sequence[str] = TEMPLATES) -> list[str]:
    """All prompts of one class word: ``templates`` filled with ``words``."""
    return [t.format(words) for t in templates]
