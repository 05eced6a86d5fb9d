"""The dataset adapter interface: what every dataset (real or generated) hands to the pipeline.

An adapter lists its frames cheaply (:meth:`DatasetAdapter.frames`, no heavy I/O, so the runner can plan
the store) and loads one frame on demand (:meth:`DatasetAdapter.load`). A loaded :class:`Frame` carries
everything the ``correspond`` stage needs: points, per-point features and labels, and for each image its
pixels, its intrinsics and the rigid transform from the point frame into the camera (OpenCV axes: x right,
y down, z forward). Geometry (projection, occlusion) is shared code in :mod:`pipeline.projection`; an
adapter only builds the transforms, with its dataset's own tools (nuscenes-devkit for nuScenes).
"""
from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..registry import Registry
from data_cache.errors import UserError

DATASETS = Registry("dataset")


class DatasetError(UserError, RuntimeError):
    """Bad input: names the frame and the file at fault."""

    def __init__(self, message: str, frame: str | None = None, file: str | os.PathLike | None = None):
        self.frame = frame
        self.file = str(file) if file is not None else None
        where = []
        if frame is not None:
            where.append(f"frame {frame}")
        if file is not None:
            where.append(f"file {file}")
        super().__init__(f"{message}" + (f" [{'; '.join(where)}]" if where else ""))



@dataclass
class FrameInfo:
    """What the planner needs about a frame without loading it."""

    token: str
    num_points: int
    image_names: list[str]
    points_file: str = ""


@dataclass
class ImageRecord:
    """One image of a frame at its native resolution.

    ``points_to_camera`` (4x4) maps the frame's point coordinates into this camera (``None`` in a dataset
    without points); ``intrinsics`` (3x3) is K at native resolution. ``depth`` (metres, 0 = no reading) with ``depth_intrinsics`` enables the
    occlusion test; ``gt`` is an optional native-resolution label map (class indices, 255 = unlabelled).
    """

    name: str
    file: str
    rgb: np.ndarray
    intrinsics: np.ndarray
    points_to_camera: np.ndarray | None
    gt: np.ndarray | None = None
    depth: np.ndarray | None = None
    depth_intrinsics: np.ndarray | None = None


@dataclass
class Frame:
    token: str
    points_file: str
    xyz: np.ndarray | None  # (N, 3) float32; None in a dataset without points (modalities = ("images",))
    feat: np.ndarray | None  # (N, C) float32
    images: list[ImageRecord]
    gt: np.ndarray | None = None  # (N,) uint8, 255 = unlabelled
    extra: dict = field(default_factory=dict)


class DatasetAdapter:
    """Base class. Subclasses set the class attributes and implement ``frames`` and ``load``."""

    name: str = ""
    class_names: tuple[str, ...] = ()
    image_size: tuple[int, int] = (0, 0)  # training resolution (H, W)
    point_features: tuple[str, ...] = ()
    min_depth: float = 0.0  # metres; points closer to a camera are not paired with it
    occlusion_tolerance: float | None = None  # metres; None = no depth test
    voxel_size: float = 0.1
    modalities: tuple[str, ...] = ("points", "images")  # ("images",): a 2D-only dataset, no points or pairs
    image_gt_name: str = ""  # the 2D ground truth's name when the adapter has "image_gt" (see image_gt_source)
    #: options an adapter records in ``self.options`` (the store's dataset_config) beyond the keyword
    #: parameters of its ``__init__``; anything else a subclass passes on here is an unknown option
    extra_options: tuple[str, ...] = ()

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train", **options):
        unknown = sorted(set(options) - set(self.extra_options))
        if unknown:  # a misspelt --dataset-option would otherwise be recorded and silently do nothing
            raise DatasetError(f"unknown {self.name} dataset option(s) {', '.join(unknown)} (known: "
                               f"{', '.join(self.known_options()) or 'none'})")
        self.root = Path(root) if root is not None else None
        self.split = split
        self.options = options

    @classmethod
    def known_options(cls) -> list[str]:
        """The ``--dataset-option`` keys this adapter takes."""
        params = inspect.signature(cls.__init__).parameters
        named = [n for n, p in params.items() if n not in ("self", "root", "split")
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        return sorted(set(named) | set(cls.extra_options))

    # capabilities recorded in the store: "point_gt", "image_gt"
    @property
    def capabilities(self) -> list[str]:
        return []

    @property
    def image_gt_source(self) -> str | None:
        """Which 2D ground truth a store of this adapter has (``cns.image_gt_source``): the adapter's own
        label images (``image_gt_name``), else ``"projected_3d"`` where only points are labelled, else None."""
        caps = self.capabilities
        if "image_gt" in caps:
            return self.image_gt_name or self.name
        return "projected_3d" if "point_gt" in caps else None

    def frames(self) -> list[FrameInfo]:
        raise NotImplementedError

    def load(self, index: int) -> Frame:
        raise NotImplementedError

    def source_images(self, index: int, token: str | None = None) -> list[np.ndarray]:
        """Frame ``index``'s images at their source resolution (uint8 RGB [h, w, 3]), in the frame's image order.

        ``token``, the store's token of that frame, is checked against the dataset's. The default loads the
        whole frame; an adapter may override it with a cheaper read of the images alone.
        """
        frame = self.load(index)
        if token is not None and str(frame.token) != str(token):
            raise DatasetError(f"the dataset's frame {index} is {frame.token}, the store planned {token} there "
                               f"(the dataset changed since the store was created)", token, frame.points_file)
        return [im.rgb for im in frame.images]

    def frame_alias(self, key: str) -> str | None:
        """The frame token that another name of a frame stands for (nuScenes: a sample token), else None."""
        return None

    @classmethod
    def alias_from_config(cls, dataset_config: dict, key: str) -> str | None:
        """:meth:`frame_alias` for a store written with ``dataset_config`` (None where no alias exists)."""
        return None

    def config(self) -> dict:
        """The adapter's configuration, recorded in the store (and compared on rerun)."""
        return {"root": str(self.root) if self.root else None, "split": self.split, **self.options,
                "min_depth": self.min_depth, "occlusion_tolerance": self.occlusion_tolerance}


def check_points(xyz: np.ndarray, frame: str, file: str) -> None:
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise DatasetError(f"points must be (N, 3), got {xyz.shape}", frame, file)
    check_finite_rows(xyz, "coordinates", frame, file)


def check_finite_rows(values: np.ndarray, what: str, frame: str, file) -> None:
    """``values`` [N, C] of a frame's points: at least one row, every value finite."""
    if len(values) == 0:
        raise DatasetError("the frame has no points", frame, file)
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise DatasetError(f"{int(bad.sum())} point(s) have NaN/inf {what} (first at row "
                           f"{int(np.flatnonzero(bad)[0])})", frame, file)


def check_rigid(matrix: np.ndarray, what: str, frame: str, file: str, atol: float = 1e-4) -> None:
    """A 4x4 rigid transform: finite, orthonormal rotation with determinant +1, last row 0 0 0 1."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4) or not np.isfinite(m).all():
        raise DatasetError(f"{what} is not a finite 4x4 matrix", frame, file)
    r = m[:3, :3]
    err = np.abs(r @ r.T - np.eye(3)).max()
    if err > atol or not math.isclose(np.linalg.det(r), 1.0, abs_tol=atol):
        raise DatasetError(f"{what} has a non-orthonormal rotation (|R R^T - I| = {err:.2e}, "
                           f"det = {np.linalg.det(r):.4f})", frame, file)
    if np.abs(m[3] - [0, 0, 0, 1]).max() > atol:
        raise DatasetError(f"{what} has a last row {m[3].tolist()}, expected [0, 0, 0, 1]", frame, file)


def read_float_records(path: Path, columns: int, frame: str) -> np.ndarray:
    """A raw little-endian float32 point file of ``columns`` values per point; truncation is an error.

    The byte size is checked, not the float count: a file cut inside a float (e.g. 1001 bytes of 20-byte
    nuScenes records) would otherwise read as a whole number of points.
    """
    record = 4 * columns
    try:
        size = path.stat().st_size
        raw = np.fromfile(path, dtype="<f4")
    except FileNotFoundError:
        raise DatasetError("point file is missing", frame, path) from None
    except OSError as e:
        raise DatasetError(f"cannot read point file: {e}", frame, path) from None
    if size == 0 or size % record or raw.size * 4 != size:
        raise DatasetError(f"point file is truncated or not float32 x{columns}: {size} bytes is not a whole "
                           f"number of {record}-byte points", frame, path)
    return raw.reshape(-1, columns)


def read_rgb(path: Path, frame: str) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError("image file is missing", frame, path) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"image file is unreadable or truncated: {e}", frame, path) from None


def read_single_channel(path: Path, frame: str, what: str) -> np.ndarray:
    """A single-channel image (depth map, label map) as it is stored; ``what`` names it in errors."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            a = np.asarray(im)
    except FileNotFoundError:
        raise DatasetError(f"{what} is missing", frame, path) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{what} is unreadable or truncated: {e}", frame, path) from None
    if a.ndim != 2:
        raise DatasetError(f"{what} must be single-channel, got shape {a.shape}", frame, path)
    return a


def build_adapter(name: str, root=None, split: str | None = None, **options) -> DatasetAdapter:
    """Construct a registered dataset adapter; the dataset modules register themselves on import."""
    from . import load_builtin  # noqa: F401  (registers nuscenes, nuimages, scannet, synthetic)
    try:
        cls = DATASETS.get(name)
    except KeyError as e:
        raise DatasetError(str(e.args[0])) from None
    kwargs = dict(options)
    if split is not None:
        kwargs["split"] = split
    return cls(root, **kwargs)


def frame_alias(name: str, dataset_config: dict, key: str) -> str | None:
    """The frame token ``key`` names in a store of dataset ``name`` (``cns.dataset_config``), else None."""
    from . import load_builtin  # noqa: F401
    return DATASETS.get(name).alias_from_config(dataset_config or {}, key) if name in DATASETS else None
