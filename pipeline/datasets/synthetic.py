"""The procedural dataset: street sweeps (nuScenes-16) or indoor rooms (ScanNet-20) with exact ground truth.

Nothing is read from disk (``root`` is ignored); every frame is generated from ``seed``, ``split``, ``kind``
and its index, so the same options always give byte-identical arrays and different splits draw disjoint
random streams. Options may be given as strings (``--dataset-option num_scenes=4``). See docs/synthetic.md.
"""
from __future__ import annotations

import dataclasses
import zlib
from collections import OrderedDict

import numpy as np

from ..synthetic import indoor, street
from ..synthetic.palettes import CLASS_COLOUR_VERSION, wear_class_colours
from .base import DATASETS, DatasetAdapter, DatasetError, Frame, FrameInfo
from .classes import SCANNET20, nuscenes16

GENERATOR_VERSION = 1
KINDS = ("street", "indoor")


def _as_int(name: str, value, minimum: int) -> int:
    try:
        number = int(value)
        if isinstance(value, float) and number != value:
            raise ValueError
    except (TypeError, ValueError):
        raise DatasetError(f"synthetic option {name}={value!r} is not an integer") from None
    if number < minimum:
        raise DatasetError(f"synthetic option {name}={number} must be >= {minimum}")
    return number


def _as_number(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DatasetError(f"synthetic option {name}={value!r} is not a number") from None


def _as_positive(name: str, value) -> float:
    number = _as_number(name, value)
    if not number > 0 or not np.isfinite(number):
        raise DatasetError(f"synthetic option {name}={number} must be a positive number")
    return number


def _as_share(name: str, value) -> float:
    number = _as_number(name, value)
    if not 0.0 <= number <= 1.0:
        raise DatasetError(f"synthetic option {name}={number} must lie in [0, 1]")
    return number


def _as_bool(name: str, value) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise DatasetError(f"synthetic option {name}={value!r} is not a boolean (true/false)")


@DATASETS.register("synthetic")
class SyntheticDataset(DatasetAdapter):
    """Generated street or indoor scenes.

    Options (all accept strings):
      kind              "street" (nuScenes-16, LiDAR + 6 cameras) or "indoor" (ScanNet-20, RGB-D trajectory)
      num_scenes        number of streets or rooms (>= 1), default 4
      seed              base seed (integer), default 0; with ``split`` and ``kind`` it fixes every array
      sweeps_per_scene  street: LiDAR sweeps per street, 0.5 s apart (>= 1), default 1
      frames_per_room   indoor: posed RGB-D frames per room (>= 1), default 16
      native_resolution render at the sensors' sizes (street 1600x900; indoor colour 1296x968, depth
                        640x480) instead of directly at the training resolution; much slower
      rare_boost        street: make the rare classes (every vehicle but the car, pedestrians, cones, barriers,
                        bicycles) this many times as frequent (>= 1), default 1 = the default streets; for
                        benchmarks that must learn every class in a small budget
      room_mix          indoor: furnish every room with the furniture of this many distinct room kinds
                        (1..5), default 1 = the default rooms (one kind each); for benchmarks that must
                        learn every class from a few rooms
      class_colours     share of the objects (and ground regions) that wear their class's own colour, in
                        [0, 1], default 0 = the default scenes, whose classes share overlapping palettes on
                        purpose. The others keep their drawn colours; which ones is drawn per scene from a
                        stream of its own, so the geometry is the default's draw for draw. A stand-in, for
                        from-scratch CPU study networks, for the pretrained features that make classes
                        separable by appearance (docs/benchmark.md)
      point_spacing     indoor: the fused point cloud keeps one point per cube of this side, in metres (> 0),
                        default 0.03; coarser clouds make cheaper training steps (benchmarks on CPU)
      cache_size        generated frames kept in memory (>= 0), default 8; ``frames()`` generates every
                        frame once to count its points, so a cache as large as the dataset avoids
                        generating frames twice

    A frame is a street sweep (6 images) or a whole room (``frames_per_room`` images); frame ``i`` of a
    street dataset is sweep ``i % sweeps_per_scene`` of street ``i // sweeps_per_scene``. Each loaded
    :class:`Frame` carries exact instance ids and more in ``extra`` (see
    :func:`pipeline.synthetic.street.render_street_sweep` and :func:`pipeline.synthetic.indoor.render_room`).
    """

    name = "synthetic"
    image_gt_name = "synthetic_render"  # the generator's exact per-pixel labels
    extra_options = ("kind", "num_scenes", "seed", "sweeps_per_scene", "frames_per_room", "native_resolution",
                     "cache_size", "rare_boost", "point_spacing", "room_mix", "class_colours")

    #: random stream of a scene that picks the objects wearing their class colour (option class_colours);
    #: apart from the streams the geometry and the sensors draw from, so these stay the default's
    CLASS_COLOUR_STREAM = 1000

    def __init__(self, root=None, split: str = "train", **options):
        super().__init__(root, split, **options)
        self.root = None  # generated data has no root
        self.kind = str(options.get("kind", "street")).strip().lower()
        if self.kind not in KINDS:
            raise DatasetError(f"synthetic option kind={options.get('kind')!r} is unknown (choose street or indoor)")
        self.num_scenes = _as_int("num_scenes", options.get("num_scenes", 4), 1)
        self.seed = _as_int("seed", options.get("seed", 0), 0)
        self.sweeps_per_scene = _as_int("sweeps_per_scene", options.get("sweeps_per_scene", 1), 1)
        self.frames_per_room = _as_int("frames_per_room", options.get("frames_per_room", 16), 1)
        self.native_resolution = _as_bool("native_resolution", options.get("native_resolution", False))
        self.cache_size = _as_int("cache_size", options.get("cache_size", 8), 0)
        self.rare_boost = _as_int("rare_boost", options.get("rare_boost", 1), 1)
        if self.kind != "street" and self.rare_boost != 1:
            raise DatasetError(f"synthetic option rare_boost={self.rare_boost} applies to kind=street only")
        self.room_mix = _as_int("room_mix", options.get("room_mix", 1), 1)
        if self.kind != "indoor" and self.room_mix != 1:
            raise DatasetError(f"synthetic option room_mix={self.room_mix} applies to kind=indoor only")
        if self.room_mix > len(indoor.ROOM_TYPES):
            raise DatasetError(f"synthetic option room_mix={self.room_mix} exceeds the {len(indoor.ROOM_TYPES)} room "
                               f"kinds ({', '.join(indoor.ROOM_TYPES)})")
        self.class_colours = _as_share("class_colours", options.get("class_colours", 0.0))
        self.point_spacing = _as_positive("point_spacing", options.get("point_spacing", indoor.FUSION_VOXEL_M))
        if self.kind != "indoor" and "point_spacing" in options:
            raise DatasetError(f"synthetic option point_spacing={options['point_spacing']!r} applies to kind=indoor "
                               "only (street points come from the LiDAR's beams)")
        if not isinstance(split, str) or not split:
            raise DatasetError(f"synthetic split must be a non-empty name, got {split!r}")
        # the class attributes of the base depend on the kind, so they are set per instance
        if self.kind == "street":
            self.class_names = nuscenes16()
            self.image_size = street.TRAINING_HW
            self.point_features = ("intensity",)
            self.min_depth, self.occlusion_tolerance, self.voxel_size = 1.0, None, 0.1
        else:
            self.class_names = SCANNET20
            self.image_size = indoor.TRAINING_HW
            self.point_features = ("r", "g", "b")
            self.min_depth, self.occlusion_tolerance, self.voxel_size = 0.1, 0.1, 0.05
        self._cache: OrderedDict[int, Frame] = OrderedDict()

    @property
    def capabilities(self) -> list[str]:
        return ["point_gt", "image_gt"]

    def __len__(self) -> int:
        return self.num_scenes * (self.sweeps_per_scene if self.kind == "street" else 1)

    def config(self) -> dict:
        return {"root": None, "split": self.split, "kind": self.kind, "num_scenes": self.num_scenes,
                "seed": self.seed, "sweeps_per_scene": self.sweeps_per_scene if self.kind == "street" else None,
                "frames_per_room": self.frames_per_room if self.kind == "indoor" else None,
                "native_resolution": self.native_resolution,
                "rare_boost": self.rare_boost if self.kind == "street" else None,
                "point_spacing": self.point_spacing if self.kind == "indoor" else None,
                "generator_version": GENERATOR_VERSION,
                "min_depth": self.min_depth, "occlusion_tolerance": self.occlusion_tolerance,
                # only when set: the stores written before the option keep their fingerprints
                **({"room_mix": self.room_mix} if self.room_mix != 1 else {}),
                **({"class_colours": self.class_colours, "class_colour_version": CLASS_COLOUR_VERSION}
                   if self.class_colours else {})}

    def token(self, index: int) -> str:
        if self.kind == "street":
            scene, sweep = divmod(index, self.sweeps_per_scene)
            return f"synthetic-street-{self.split}-seed{self.seed}-{scene:05d}-{sweep:02d}"
        return f"synthetic-indoor-{self.split}-seed{self.seed}-{index:05d}"

    def points_file(self, index: int) -> str:
        return f"synthetic://{self.kind}/{self.split}/seed{self.seed}/{index:05d}"

    def frames(self) -> list[FrameInfo]:
        infos = []
        for i in range(len(self)):
            frame = self.load(i)
            infos.append(FrameInfo(frame.token, len(frame.xyz), [im.name for im in frame.images], frame.points_file))
        return infos

    def load(self, index: int) -> Frame:
        if not 0 <= index < len(self):
            raise DatasetError(f"frame index {index} is out of range (the dataset has {len(self)} frames)",
                               frame=str(index))
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        frame = self._generate(index)
        if self.cache_size:
            self._cache[index] = frame
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return frame

    def scene_rng(self, scene: int, stream: int) -> np.random.Generator:
        """Random stream ``stream`` of scene ``scene``; the split and kind select disjoint seed sequences."""
        entropy = [self.seed, zlib.crc32(self.split.encode()), zlib.crc32(self.kind.encode()), scene, stream]
        return np.random.default_rng(np.random.SeedSequence(entropy))

    def _generate(self, index: int) -> Frame:
        token, points_file = self.token(index), self.points_file(index)
        if self.kind == "street":
            scene_index, sweep = divmod(index, self.sweeps_per_scene)
            scene = street.build_street_scene(self.scene_rng(scene_index, 0), self.rare_boost)
            if self.class_colours:
                scene = self._wear_class_colours(scene, scene_index)
            hw = street.NATIVE_HW if self.native_resolution else street.TRAINING_HW
            return street.render_street_sweep(scene, sweep, self.scene_rng(scene_index, 1 + sweep), hw, token, points_file)
        room = indoor.build_room(self.scene_rng(index, 0), self.room_mix)
        if self.class_colours:
            room = self._wear_class_colours(room, index)
        return indoor.render_room(room, self.frames_per_room, self.scene_rng(index, 1), self.native_resolution, token,
                                  points_file, self.point_spacing)

    def _wear_class_colours(self, scene, index: int):
        """``scene`` (a street or a room) with a ``class_colours`` share of its instances recoloured
        (:func:`pipeline.synthetic.palettes.wear_class_colours`); one draw per instance id."""
        n = len(self.class_names)
        chosen = self.scene_rng(index, self.CLASS_COLOUR_STREAM).random(len(scene.instance_labels)) < self.class_colours
        prims = scene.prims
        albedo = wear_class_colours(prims.label.astype(np.int64), prims.albedo, chosen[prims.instance], n)
        changes = {"prims": dataclasses.replace(prims, albedo=albedo)}
        if getattr(scene, "ground", None) is not None:
            regions = scene.ground.regions
            albedo = wear_class_colours(np.array([r.label for r in regions], np.int64),
                                        np.array([r.albedo for r in regions], np.float64).reshape(-1, 3),
                                        chosen[[r.instance for r in regions]], n)
            changes["ground"] = dataclasses.replace(scene.ground, regions=[
                dataclasses.replace(r, albedo=tuple(a)) for r, a in zip(regions, albedo)])
        return dataclasses.replace(scene, **changes)
