"""Your own recordings: a documented folder layout any sensor rig can be written to (``--dataset folder``).

Layout under the data root (docs/own_data.md has a complete example)::

    dataset.json                      the dataset (keys below)
    rig.json                          optional: one calibration shared by every frame (same keys as calib.json)
    splits/<split>.txt                optional: frame tokens of a split, one a line
    frames/<token>/points.npy         float32 [N, 3 + F]: x y z, then the F fields of dataset.json "point_fields"
                  /points.bin         or raw little-endian float32, dataset.json "bin_fields" values per point
                  /points.ply         or a PLY with vertex properties x, y, z and the point_fields
                  /points_gt.npy      optional: integer class id per point (index into "classes"; 255 = none)
                  /calib.json         per-frame calibration (else rig.json; neither: a frame without images)
                  /<files the calibration names>   images (any PIL format), depth maps, label PNGs

``dataset.json``: ``classes`` (list of names, index = class id; required), ``prompt_names`` (optional: class
name -> the words CLIP reads), ``image_size`` ([H, W] training resolution; required), ``splits`` (split name ->
list of tokens or a file of tokens relative to the root; ``--split all`` = every folder in ``frames/``),
``point_fields`` (names of the F feature columns, e.g. ``["intensity"]``; default none), ``bin_fields`` (values per
point of ``.bin`` files, >= 3 + F; default 3 + F), ``like`` (``nuscenes`` | ``scannet``: defaults for
``min_depth``, ``occlusion_tolerance``, ``voxel_size`` below, and the base of ``--config folder``),
``min_depth`` (metres), ``occlusion_tolerance`` (metres, the depth test), ``voxel_size`` (metres),
``depth_scale`` (depth PNG units per metre; default 1000 = millimetres). Point features are used as stored.

An IMAGE of the calibration: ``name``, ``file`` (relative to the frame folder), ``width`` and ``height`` (the
image's pixels; checked), ``intrinsics`` (3x3 K), and either ``points_to_camera`` (4x4 rigid, point frame ->
OpenCV camera: x right, y down, z forward) or, for a moving rig, ``sensor_to_ego`` (4x4 camera -> ego) and
``ego_pose`` (4x4 ego -> world at the image's ``timestamp``) together with the calibration's ``points`` entry
(``sensor_to_ego`` and ``ego_pose`` of the point sensor at its own ``timestamp``): the transform is then
composed as nuScenes does, ``inv(cam sensor_to_ego) @ inv(cam ego_pose) @ points ego_pose @ points
sensor_to_ego``. Optional: ``depth`` (a depth map: ``.png`` in ``depth_scale`` units or ``.npy`` float32
metres; 0 = no reading) enables the occlusion test, with ``depth_intrinsics`` (3x3; default: ``intrinsics``
scaled to the depth map's size) and ``gt`` (a single-channel PNG of class ids, 255 = unlabelled).

Every malformed entry is one :class:`DatasetError` naming the file, the field and what was expected.
"""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np

from data_cache.schema import IGNORE_INDEX

from ..projection import scale_intrinsics
from .base import (DATASETS, DatasetAdapter, DatasetError, Frame, FrameInfo, ImageRecord, check_finite_rows, check_rigid,
                   read_float_records, read_rgb, read_single_channel)

POINT_FILES = ("points.npy", "points.bin", "points.ply")
#: the settings a dataset "like" a benchmark takes by default (the adapters' own values)
LIKE = {
    "nuscenes": {"min_depth": 1.0, "occlusion_tolerance": None, "voxel_size": 0.1},
    "scannet": {"min_depth": 0.1, "occlusion_tolerance": 0.1, "voxel_size": 0.05},
    None: {"min_depth": 0.1, "occlusion_tolerance": 0.1, "voxel_size": 0.1},
}
DATASET_KEYS = ("classes", "prompt_names", "image_size", "splits", "point_fields", "bin_fields", "like", "min_depth",
                "occlusion_tolerance", "voxel_size", "depth_scale")


def read_json(path: Path, frame: str | None = None) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DatasetError("file is missing", frame, path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"not valid JSON: {e}", frame, path) from None
    if not isinstance(data, dict):
        raise DatasetError(f"expected a JSON object, got {type(data).__name__}", frame, path)
    return data


def matrix_field(entry: dict, key: str, shape: tuple, where: str, frame: str | None, path) -> np.ndarray:
    """``entry[key]`` as a finite float64 matrix of ``shape``; a missing or misshapen one names ``where.key``."""
    if key not in entry:
        raise DatasetError(f"{where}: field '{key}' is missing (expected a {shape[0]}x{shape[1]} matrix)", frame, path)
    try:
        m = np.asarray(entry[key], dtype=np.float64)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: field '{key}' is not a numeric matrix (expected {shape[0]}x{shape[1]})",
                           frame, path) from None
    if m.shape != shape:
        got = "x".join(map(str, m.shape)) or "a scalar"
        raise DatasetError(f"{where}: field '{key}' is {got}, expected {shape[0]}x{shape[1]}", frame, path)
    if not np.isfinite(m).all():
        raise DatasetError(f"{where}: field '{key}' has NaN/inf entries", frame, path)
    return m


@DATASETS.register("folder")
class FolderDataset(DatasetAdapter):
    """A dataset in the folder layout of this module's docstring; frames are the folders of ``frames/``."""

    name = "folder"

    def __init__(self, root=None, split: str = "train", **options):
        if root is None:
            raise DatasetError("the folder dataset needs a data root (--data-root DIR with DIR/dataset.json)")
        super().__init__(root, split, **options)
        self.meta_file = self.root / "dataset.json"
        meta = read_json(self.meta_file)
        unknown = sorted(set(meta) - set(DATASET_KEYS))
        if unknown:
            raise DatasetError(f"unknown field(s) {', '.join(unknown)} (known: {', '.join(DATASET_KEYS)})",
                               file=self.meta_file)
        self.meta = meta
        self.class_names = self._classes()
        self.prompt_names = self._prompt_names()
        self.image_size = self._image_size()
        self.point_features = tuple(self._string_list("point_fields", meta.get("point_fields", [])))
        self.bin_fields = int(meta.get("bin_fields", 3 + len(self.point_features)))
        if self.bin_fields < 3 + len(self.point_features):
            raise DatasetError(f"field 'bin_fields' is {self.bin_fields}, expected >= 3 + {len(self.point_features)} "
                               f"(x y z and the point_fields)", file=self.meta_file)
        self.like = meta.get("like")
        if self.like not in LIKE:
            raise DatasetError(f"field 'like' is {self.like!r}, expected one of nuscenes, scannet (or absent)",
                               file=self.meta_file)
        settings = {**LIKE[self.like], **{k: meta[k] for k in LIKE[None] if k in meta}}
        self.min_depth = self._number("min_depth", settings["min_depth"])
        self.voxel_size = self._number("voxel_size", settings["voxel_size"])
        tol = settings["occlusion_tolerance"]
        self.occlusion_tolerance = None if tol is None else self._number("occlusion_tolerance", tol)
        self.depth_scale = self._number("depth_scale", meta.get("depth_scale", 1000.0))

    # -- dataset.json ------------------------------------------------------------------------------------
    def _string_list(self, key: str, value) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise DatasetError(f"field '{key}' must be a list of non-empty strings", file=self.meta_file)
        return value

    def _classes(self) -> tuple[str, ...]:
        if "classes" not in self.meta:
            raise DatasetError("field 'classes' is missing (expected the list of class names)", file=self.meta_file)
        names = self._string_list("classes", self.meta["classes"])
        if not 0 < len(names) < IGNORE_INDEX or len(set(names)) != len(names):
            raise DatasetError(f"field 'classes' must hold 1..{IGNORE_INDEX - 1} distinct names, got {len(names)}",
                               file=self.meta_file)
        return tuple(names)

    def _prompt_names(self) -> dict[str, str]:
        prompts = self.meta.get("prompt_names", {})
        if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
            raise DatasetError("field 'prompt_names' must map class names to strings", file=self.meta_file)
        stray = sorted(set(prompts) - set(self.class_names))
        if stray:
            raise DatasetError(f"field 'prompt_names' names {stray[0]!r}, which is not in 'classes'", file=self.meta_file)
        return dict(prompts)

    def _image_size(self) -> tuple[int, int]:
        size = self.meta.get("image_size")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise DatasetError(f"field 'image_size' is {size!r}, expected [H, W] (positive integers: the training "
                               f"resolution)", file=self.meta_file)
        return tuple(size)

    def _number(self, key: str, value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise DatasetError(f"field '{key}' is {value!r}, expected a positive number", file=self.meta_file)
        return float(value)

    def config(self) -> dict:
        return {**super().config(), "like": self.like, "voxel_size": self.voxel_size, "depth_scale": self.depth_scale,
                "point_fields": list(self.point_features), "bin_fields": self.bin_fields,
                **({"prompt_names": self.prompt_names} if self.prompt_names else {})}

    # -- frames ------------------------------------------------------------------------------------------
    @cached_property
    def tokens(self) -> list[str]:
        frames_dir = self.root / "frames"
        if not frames_dir.is_dir():
            raise DatasetError("no frames/ folder (one sub-folder per frame)", file=frames_dir)
        if self.split == "all":
            tokens = sorted(p.name for p in frames_dir.iterdir() if p.is_dir())
        else:
            splits = self.meta.get("splits", {})
            if self.split not in splits:
                raise DatasetError(f"field 'splits' has no split '{self.split}' (known: all, "
                                   f"{', '.join(sorted(splits)) or 'none'})", file=self.meta_file)
            listing = splits[self.split]
            if isinstance(listing, str):
                path = self.root / listing
                if not path.is_file():
                    raise DatasetError(f"split '{self.split}' names a token file that does not exist", file=path)
                tokens = path.read_text().split()
            else:
                tokens = self._string_list(f"splits.{self.split}", listing)
            missing = [t for t in tokens if not (frames_dir / t).is_dir()]
            if missing:
                raise DatasetError(f"split '{self.split}' lists {len(missing)} frame(s) without a folder, first "
                                   f"{missing[0]}", file=frames_dir / missing[0])
        if not tokens:
            raise DatasetError(f"split '{self.split}' has no frames", file=frames_dir)
        return tokens

    def frame_dir(self, token: str) -> Path:
        return self.root / "frames" / token

    def points_file(self, token: str) -> Path:
        found = [self.frame_dir(token) / n for n in POINT_FILES if (self.frame_dir(token) / n).exists()]
        if len(found) != 1:
            what = "none" if not found else " and ".join(p.name for p in found)
            raise DatasetError(f"expected exactly one of {', '.join(POINT_FILES)}, found {what}", token,
                               self.frame_dir(token))
        return found[0]

    def calibration(self, token: str) -> tuple[dict, Path | None]:
        """The frame's calibration (``calib.json``, else the shared ``rig.json``) and its file; a frame with
        neither has no images (a LiDAR sweep alone: ``cns-cli predict`` labels its points)."""
        path = self.frame_dir(token) / "calib.json"
        if not path.exists():
            path = self.root / "rig.json"
            if not path.exists():
                return {"images": []}, None
        calib = read_json(path, token)
        images = calib.get("images", [])
        if not isinstance(images, list) or not all(isinstance(e, dict) for e in images):
            raise DatasetError("field 'images' must be a list of objects", token, path)
        return calib, path

    @property
    def capabilities(self) -> list[str]:
        caps = []
        if any((self.frame_dir(t) / "points_gt.npy").exists() for t in self.tokens):
            caps.append("point_gt")
        if any("gt" in im for t in self.tokens for im in self.calibration(t)[0].get("images", [])):
            caps.append("image_gt")
        return caps

    def frames(self) -> list[FrameInfo]:
        out = []
        for token in self.tokens:
            path = self.points_file(token)
            calib, _ = self.calibration(token)
            names = [str(e.get("name", i)) for i, e in enumerate(calib.get("images", []))]
            out.append(FrameInfo(token=token, num_points=self._count_points(path, token), image_names=names,
                                 points_file=str(path)))
        return out

    def _count_points(self, path: Path, token: str) -> int:
        if path.suffix == ".npy":
            return int(np.load(path, mmap_mode="r").shape[0])
        if path.suffix == ".bin":
            return path.stat().st_size // (4 * self.bin_fields)
        return len(self._read_ply(path, token))

    # -- loading -----------------------------------------------------------------------------------------
    def load(self, index: int) -> Frame:
        token = self.tokens[index]
        path = self.points_file(token)
        xyz, feat = self.read_points(path, token)
        calib, calib_path = self.calibration(token)
        images = [self._image(e, i, calib, calib_path, token) for i, e in enumerate(calib.get("images", []))]
        return Frame(token=token, points_file=str(path), xyz=xyz, feat=feat, images=images,
                     gt=self._point_gt(token, len(xyz)))

    def read_points(self, path: Path, token: str) -> tuple[np.ndarray, np.ndarray]:
        """``xyz`` float32 [N, 3] and ``feat`` float32 [N, F] of a point file; NaN/inf or float64 are errors."""
        nf = len(self.point_features)
        if path.suffix == ".npy":
            try:
                raw = np.load(path)
            except (OSError, ValueError) as e:
                raise DatasetError(f"cannot read the point array: {e}", token, path) from None
            if raw.dtype != np.float32:
                raise DatasetError(f"points are {raw.dtype}, expected float32 [N, {3 + nf}]", token, path)
            if raw.ndim != 2 or raw.shape[1] != 3 + nf:
                raise DatasetError(f"points have shape {raw.shape}, expected [N, {3 + nf}] (x y z"
                                   f"{''.join(' ' + f for f in self.point_features)})", token, path)
        elif path.suffix == ".bin":
            raw = read_float_records(path, self.bin_fields, token)[:, :3 + nf]
        else:
            raw = self._read_ply(path, token)
        check_finite_rows(raw, "values (expected finite float32)", token, path)
        return np.ascontiguousarray(raw[:, :3]), np.ascontiguousarray(raw[:, 3:3 + nf])

    def _read_ply(self, path: Path, token: str) -> np.ndarray:
        from plyfile import PlyData, PlyElementParseError, PlyHeaderParseError
        try:
            vertex = PlyData.read(str(path))["vertex"]
        except (PlyHeaderParseError, PlyElementParseError, KeyError, OSError, ValueError) as e:
            raise DatasetError(f"cannot read a PLY 'vertex' element: {e}", token, path) from None
        fields = ("x", "y", "z") + self.point_features
        have = [p.name for p in vertex.properties]
        missing = [f for f in fields if f not in have]
        if missing:
            raise DatasetError(f"PLY vertex has no propert(ies) {', '.join(missing)} (has {', '.join(have)})",
                               token, path)
        return np.stack([np.asarray(vertex[f], dtype=np.float32) for f in fields], axis=1)

    def _point_gt(self, token: str, num_points: int) -> np.ndarray | None:
        path = self.frame_dir(token) / "points_gt.npy"
        if not path.exists():
            return None
        ids = np.load(path)
        if ids.shape != (num_points,) or not np.issubdtype(ids.dtype, np.integer):
            raise DatasetError(f"ground truth is {ids.dtype} {ids.shape}, expected integer ids ({num_points},)",
                               token, path)
        self._check_ids(ids, token, path)
        return ids.astype(np.uint8)

    def _check_ids(self, ids: np.ndarray, token: str, path) -> None:
        bad = (ids != IGNORE_INDEX) & ((ids < 0) | (ids >= len(self.class_names)))
        if bad.any():
            raise DatasetError(f"ground-truth id {int(ids[bad].flat[0])} is outside the class list (0.."
                               f"{len(self.class_names) - 1} of dataset.json 'classes', or {IGNORE_INDEX} = "
                               f"unlabelled)", token, path)

    def _image(self, entry: dict, i: int, calib: dict, calib_path: Path, token: str) -> ImageRecord:
        name = str(entry.get("name", i))
        where = f"images[{i}] ({name})"
        if "file" not in entry:
            raise DatasetError(f"{where}: field 'file' is missing (the image, relative to the frame folder)", token,
                               calib_path)
        file = self.frame_dir(token) / entry["file"]
        k = matrix_field(entry, "intrinsics", (3, 3), where, token, calib_path)
        size = [entry.get("height"), entry.get("width")]
        if not all(isinstance(v, int) and v > 0 for v in size):
            raise DatasetError(f"{where}: fields 'width' and 'height' must be positive integers (the image's "
                               f"pixels), got width={entry.get('width')!r} height={entry.get('height')!r}", token,
                               calib_path)
        rgb = read_rgb(file, token)
        if list(rgb.shape[:2]) != size:
            raise DatasetError(f"image is {rgb.shape[1]}x{rgb.shape[0]}, but {calib_path.name} {where} says "
                               f"width x height {size[1]}x{size[0]}", token, file)
        t = self._points_to_camera(entry, calib, where, token, calib_path)
        check_rigid(t, f"{calib_path.name} {where} points->camera transform", token, str(calib_path))
        depth = k_depth = gt = None
        if "depth" in entry:
            depth = self._depth(self.frame_dir(token) / entry["depth"], token)
            if self.occlusion_tolerance is None:
                raise DatasetError(f"{where} has a depth map but dataset.json sets no 'occlusion_tolerance' "
                                   f"(like nuscenes has none): set one", token, calib_path)
            k_depth = (matrix_field(entry, "depth_intrinsics", (3, 3), where, token, calib_path)
                       if "depth_intrinsics" in entry else scale_intrinsics(k, rgb.shape[:2], depth.shape))
        if "gt" in entry:
            gt = self._image_gt(self.frame_dir(token) / entry["gt"], rgb.shape[:2], token)
        return ImageRecord(name=name, file=str(file), rgb=rgb, intrinsics=k, points_to_camera=t, gt=gt, depth=depth,
                           depth_intrinsics=k_depth)

    def _points_to_camera(self, entry: dict, calib: dict, where: str, token: str, path: Path) -> np.ndarray:
        if "points_to_camera" in entry or "sensor_to_ego" not in entry:
            return matrix_field(entry, "points_to_camera", (4, 4), where, token, path)
        points = calib.get("points")
        if not isinstance(points, dict):
            raise DatasetError(f"{where} gives sensor_to_ego and ego_pose (a moving rig), which needs the field "
                               f"'points' with the point sensor's sensor_to_ego and ego_pose", token, path)
        cam_to_ego = matrix_field(entry, "sensor_to_ego", (4, 4), where, token, path)
        ego_cam_to_world = matrix_field(entry, "ego_pose", (4, 4), where, token, path)
        lidar_to_ego = matrix_field(points, "sensor_to_ego", (4, 4), "points", token, path)
        ego_lidar_to_world = matrix_field(points, "ego_pose", (4, 4), "points", token, path)
        return np.linalg.inv(cam_to_ego) @ np.linalg.inv(ego_cam_to_world) @ ego_lidar_to_world @ lidar_to_ego

    def _depth(self, path: Path, token: str) -> np.ndarray:
        """A depth map in metres (float32 [h, w], 0 = no reading) from a PNG in depth_scale units or a .npy."""
        if path.suffix == ".npy":
            try:
                d = np.load(path)
            except FileNotFoundError:
                raise DatasetError("depth map is missing", token, path) from None
            d = d.astype(np.float32) if np.issubdtype(d.dtype, np.floating) else None
        else:
            d = read_single_channel(path, token, "depth image")
            d = d.astype(np.float32) / self.depth_scale
        if d is None or d.ndim != 2 or not np.isfinite(d).all():
            raise DatasetError("depth map must be a finite single-channel array (PNG in depth_scale units or "
                               ".npy float32 metres)", token, path)
        return d

    def _image_gt(self, path: Path, rgb_hw, token: str) -> np.ndarray:
        ids = read_single_channel(path, token, "label image")
        if ids.shape != tuple(rgb_hw):
            raise DatasetError(f"label image is {ids.shape[1]}x{ids.shape[0]}, its colour image "
                               f"{rgb_hw[1]}x{rgb_hw[0]}: expected the same size", token, path)
        self._check_ids(ids.astype(np.int64), token, path)
        return ids.astype(np.uint8)

