"""ScanNet v2 in the mmdetection3d export layout; a frame of the cache is a scene.

Layout under the data root::

    points/<scene>.bin                     float32 (N, 6): x y z (scene frame, metres), r g b (0..255)
    semantic_mask/<scene>.bin              NYU40 id per point (int64, mmdet3d), or
    labels/<scene>_sem_label_all.npy       NYU40 id per point (votenet-style export)
    posed_images/<scene>/NNNNN.jpg         colour image
    posed_images/<scene>/NNNNN.png         depth, uint16 millimetres, 0 = no reading
    posed_images/<scene>/NNNNN.txt         4x4 camera-to-world pose
    posed_images/<scene>/intrinsic.txt     4x4 colour intrinsics (intrinsic_depth.txt optional)
    meta_data/scannetv2_<split>.txt        scene list of a split (optional; ``--split all`` needs none)

Every posed frame of a scene becomes an image of the cache at 240x320; a point is paired with an image
only where the depth map confirms it (``occlusion_tolerance``, metres). Without ``intrinsic_depth.txt`` the
depth K is the colour K scaled to the depth resolution.

The images of a scene come from one of two sources (``--dataset-option image_source=...``). By default
(``auto``) they are ScanNet's 25k key frames where ``scannet_frames_25k/`` (or ``tasks/scannet_frames_25k/``)
exists under the data root -- the paper trains the 2D network on them ("we utilize 25,000 key frame images
to train the 2D network", section 4) -- and the posed images otherwise, with a note on stderr; the store's
``dataset_config.image_source`` records the source used.

* ``posed_images``: the mmdetection3d export above. Its 2D labels, when the raw scans are there,
  are ScanNet's filtered label images ``scans/<scene>/label-filt/<frame>.png`` (``<frame>`` = the posed
  frame's number without zero padding; the unzipped ``<scene>_2d-label-filt.zip``). ScanNet releases them as
  16-bit PNGs of ScanNet label ids, mapped to NYU40 with ``scannetv2-labels.combined.tsv`` (columns ``id``
  and ``nyu40id``; looked for in ``meta_data/`` and the root); label images already converted to NYU40
  (ScanNet's ``convert_scannet_label_image.py``) need ``--dataset-option label_filt_ids=nyu40``.
* ``frames_25k`` (the default where present): ScanNet's 25k-frame subset, ``scannet_frames_25k/<scene>/``
  (or ``tasks/scannet_frames_25k/<scene>/``) with ``color/NNNNNN.jpg``, ``depth/NNNNNN.png``,
  ``pose/NNNNNN.txt``, ``label/NNNNNN.png`` (NYU40 ids), ``intrinsics_color.txt`` (and optionally
  ``intrinsics_depth.txt``). The points still come from ``points/``.

NYU40 label images are mapped to ScanNet-20 with the table of the 3D labels and resized to 240x320 with
nearest neighbour by ``correspond`` into ``images/gt``; the store records ``image_gt_source =
"scannet_2d_labels"``. A label image must show the colour image's view: the same size, or the same aspect
ratio within 1 % (e.g. labels at the depth resolution). 2D labels are used when every scene of the split has
them; without them 2D evaluation falls back to projected 3D labels (``image_gt_source = "projected_3d"``).
"""
from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..projection import scale_intrinsics
from .base import (DATASETS, DatasetAdapter, DatasetError, Frame, FrameInfo, ImageRecord, check_points, check_rigid,
                   read_float_records, read_rgb, read_single_channel)
from .classes import SCANNET20, nyu40_to_scannet20_lut

POINT_COLUMNS = 6
DEPTH_SCALE = 1000.0  # ScanNet depth PNGs hold millimetres
IMAGE_SOURCES = ("posed_images", "frames_25k")
#: ``image_source=auto`` (the default): frames_25k where its folder exists under the data root, else posed_images.
AUTO_IMAGE_SOURCE = "auto"
LABEL_FILT_IDS = ("scannet", "nyu40")
LABEL_MAP_NAME = "scannetv2-labels.combined.tsv"
NYU40_MAX = 40
LABEL_ASPECT_TOLERANCE = 0.01


@dataclass(frozen=True)
class _ImageFiles:
    """The files of one posed frame of a scene."""

    name: str
    rgb: Path
    depth: Path
    pose: Path
    label: Path | None  # None: the scene has no 2D labels


@DATASETS.register("scannet")
class ScanNetDataset(DatasetAdapter):
    name = "scannet"
    class_names = SCANNET20
    image_size = (240, 320)
    point_features = ("r", "g", "b")
    min_depth = 0.1
    voxel_size = 0.05
    image_gt_name = "scannet_2d_labels"

    def __init__(self, root=None, split: str = "train", occlusion_tolerance: float = 0.1,
                 image_source: str = AUTO_IMAGE_SOURCE, label_filt_ids: str = "scannet", **options):
        if root is None:
            raise DatasetError("ScanNet needs a data root (--data-root / DATA_ROOT=/path/to/scannet)")
        super().__init__(root, split, **options)
        self.occlusion_tolerance = float(occlusion_tolerance)
        if image_source not in IMAGE_SOURCES + (AUTO_IMAGE_SOURCE,):
            raise DatasetError(f"unknown ScanNet image_source '{image_source}' (known: {AUTO_IMAGE_SOURCE}, "
                               f"{', '.join(IMAGE_SOURCES)})")
        if image_source == AUTO_IMAGE_SOURCE:
            image_source = self._default_image_source()
        if label_filt_ids not in LABEL_FILT_IDS:
            raise DatasetError(f"unknown ScanNet label_filt_ids '{label_filt_ids}' (known: "
                               f"{', '.join(LABEL_FILT_IDS)})")
        self.image_source = image_source
        self.label_filt_ids = label_filt_ids
        if not (self.root / "points").is_dir():
            raise DatasetError("not a ScanNet export: expected points/ and posed_images/ "
                               "(mmdetection3d layout)", file=self.root)
        if image_source == "posed_images" and not (self.root / "posed_images").is_dir():
            raise DatasetError("not a ScanNet export: expected points/ and posed_images/ "
                               "(mmdetection3d layout)", file=self.root)
        if image_source == "frames_25k" and self._frames_25k_root is None:
            raise DatasetError("image_source=frames_25k needs ScanNet's 25k frames in scannet_frames_25k/ or "
                               "tasks/scannet_frames_25k/ under the data root", file=self.root)

    def _default_image_source(self) -> str:
        """``frames_25k`` where ScanNet's 25k key frames are under the data root (the paper's 2D training
        images), else ``posed_images`` with a note on stderr."""
        if self._frames_25k_root is not None:
            return "frames_25k"
        print(f"note: ScanNet: no scannet_frames_25k/ under {self.root}; the 2D training images are the posed "
              "images of the mmdetection3d export (the paper trains the 2D network on the 25k key frames)",
              file=sys.stderr)
        return "posed_images"

    @property
    def capabilities(self) -> list[str]:
        caps = ["point_gt"] if all(self._label_file(s) is not None for s in self.scenes) else []
        return caps + (["image_gt"] if self._has_2d_labels else [])

    def config(self) -> dict:
        return {**super().config(), "depth_scale": DEPTH_SCALE, "image_source": self.image_source,
                "label_filt_ids": self.label_filt_ids}

    @cached_property
    def scenes(self) -> list[str]:
        available = sorted(p.name[:-4] for p in (self.root / "points").glob("*.bin"))
        if self.split == "all":
            scenes = available
        else:
            candidates = [self.root / "meta_data" / f"scannetv2_{self.split}.txt",
                          self.root / f"scannetv2_{self.split}.txt"]
            listing = next((p for p in candidates if p.exists()), None)
            if listing is None:
                raise DatasetError(f"no scene list for split '{self.split}' (looked for "
                                   f"{', '.join(str(c) for c in candidates)}); use --split all for every scene")
            scenes = [s.strip() for s in listing.read_text().split() if s.strip()]
            missing = sorted(set(scenes) - set(available))
            if missing:
                raise DatasetError(f"{len(missing)} scene(s) of split '{self.split}' have no point file, "
                                   f"first {missing[0]}", file=self.root / "points" / f"{missing[0]}.bin")
        if not scenes:
            raise DatasetError(f"no scenes for split '{self.split}'", file=self.root / "points")
        return scenes

    # -- the image source of a scene ------------------------------------------------------------------
    @cached_property
    def _frames_25k_root(self) -> Path | None:
        return next((p for p in (self.root / "scannet_frames_25k", self.root / "tasks" / "scannet_frames_25k")
                     if p.is_dir()), None)

    def _image_dir(self, scene: str) -> Path:
        if self.image_source == "frames_25k":
            return self._frames_25k_root / scene
        return self.root / "posed_images" / scene

    def _label_dir(self, scene: str) -> Path:
        if self.image_source == "frames_25k":
            return self._image_dir(scene) / "label"
        return self.root / "scans" / scene / "label-filt"

    def _intrinsics_files(self, scene: str) -> tuple[Path, Path]:
        """(colour K, depth K) files of a scene; the depth one may be absent."""
        d = self._image_dir(scene)
        if self.image_source == "frames_25k":
            return d / "intrinsics_color.txt", d / "intrinsics_depth.txt"
        return d / "intrinsic.txt", d / "intrinsic_depth.txt"

    @cached_property
    def _has_2d_labels(self) -> bool:
        """Every scene has its label folder (True), none has (False); some only is an error."""
        with_labels = [s for s in self.scenes if self._label_dir(s).is_dir()]
        if with_labels and len(with_labels) < len(self.scenes):
            first = next(s for s in self.scenes if not self._label_dir(s).is_dir())
            raise DatasetError(f"{len(with_labels)} of {len(self.scenes)} scenes have 2D labels: a store has them "
                               f"for every scene or for none (first scene without: {first})",
                               file=self._label_dir(first))
        if with_labels and self.image_source == "posed_images" and self.label_filt_ids == "scannet":
            self._scannet_to_nyu40  # the label map must exist before anything is planned
        return bool(with_labels)

    def _image_files(self, scene: str) -> list[_ImageFiles]:
        d = self._image_dir(scene)
        labels = self._label_dir(scene) if self._has_2d_labels else None
        if self.image_source == "frames_25k":
            return [_ImageFiles(i, d / "color" / f"{i}.jpg", d / "depth" / f"{i}.png", d / "pose" / f"{i}.txt",
                                labels / f"{i}.png" if labels else None)
                    for i in sorted(p.stem for p in (d / "color").glob("*.jpg"))]
        return [_ImageFiles(i, d / f"{i}.jpg", d / f"{i}.png", d / f"{i}.txt",
                            labels / f"{int(i)}.png" if labels else None)
                for i in sorted(p.stem for p in d.glob("*.jpg"))]

    def _image_ids(self, scene: str) -> list[str]:
        return [f.name for f in self._image_files(scene)]

    def _label_file(self, scene: str):
        for p in (self.root / "semantic_mask" / f"{scene}.bin", self.root / "labels" / f"{scene}_sem_label_all.npy"):
            if p.exists():
                return p
        return None

    def frames(self) -> list[FrameInfo]:
        out = []
        for scene in self.scenes:
            if not self._image_dir(scene).is_dir():
                raise DatasetError(f"scene {scene} has no {self.image_source} folder", scene, self._image_dir(scene))
            path = self.root / "points" / f"{scene}.bin"
            size = path.stat().st_size if path.exists() else 0
            out.append(FrameInfo(token=scene, num_points=size // (4 * POINT_COLUMNS),
                                 image_names=self._image_ids(scene), points_file=str(path)))
        return out

    def load(self, index: int) -> Frame:
        scene = self.scenes[index]
        path = self.root / "points" / f"{scene}.bin"
        raw = read_float_records(path, POINT_COLUMNS, scene)
        xyz = np.ascontiguousarray(raw[:, :3])
        check_points(xyz, scene, str(path))
        feat = (raw[:, 3:6] / 255.0).astype(np.float32)
        color_k_file, depth_k_file = self._intrinsics_files(scene)
        k_color = self._matrix(color_k_file, scene)[:3, :3]
        images = []
        for files in self._image_files(scene):
            rgb = read_rgb(files.rgb, scene)
            depth = self._depth(files.depth, scene)
            cam2world = self._matrix(files.pose, scene)
            check_rigid(cam2world, f"pose of image {files.name}", scene, str(files.pose))
            k_depth = (self._matrix(depth_k_file, scene)[:3, :3] if depth_k_file.exists()
                       else scale_intrinsics(k_color, rgb.shape[:2], depth.shape))
            gt = self._image_gt(files, rgb.shape[:2], scene) if files.label is not None else None
            images.append(ImageRecord(name=files.name, file=str(files.rgb), rgb=rgb, intrinsics=k_color,
                                      points_to_camera=np.linalg.inv(cam2world), gt=gt, depth=depth,
                                      depth_intrinsics=k_depth))
        if not images:
            raise DatasetError(f"the scene has no {self.image_source} frames", scene, self._image_dir(scene))
        return Frame(token=scene, points_file=str(path), xyz=xyz, feat=feat, images=images,
                     gt=self._load_gt(scene, len(xyz)))

    # -- 2D labels ------------------------------------------------------------------------------------
    @cached_property
    def _scannet_to_nyu40(self) -> np.ndarray:
        """ScanNet label id -> NYU40 id from ``scannetv2-labels.combined.tsv`` (-1 for ids it does not list)."""
        candidates = [self.root / "meta_data" / LABEL_MAP_NAME, self.root / LABEL_MAP_NAME]
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            raise DatasetError(f"label-filt/ images hold ScanNet label ids, which need ScanNet's {LABEL_MAP_NAME} "
                               f"(looked for {', '.join(str(c) for c in candidates)}); for label images already "
                               f"converted to NYU40 pass --dataset-option label_filt_ids=nyu40")
        try:
            with open(path, newline="") as f:
                rows = [(int(r["id"]), int(r["nyu40id"])) for r in csv.DictReader(f, delimiter="\t")]
        except (KeyError, ValueError, TypeError) as e:
            raise DatasetError(f"label map is malformed (needs integer columns 'id' and 'nyu40id'): {e}",
                               file=path) from None
        lut = np.full(1 << 16, -1, dtype=np.int16)
        lut[0] = 0  # 0 = unannotated
        for scannet_id, nyu40 in rows:
            lut[scannet_id] = nyu40
        return lut

    def _image_gt(self, files: _ImageFiles, rgb_hw, scene: str) -> np.ndarray:
        """The native-resolution ScanNet-20 label map of one posed frame (255 = unlabelled)."""
        path = files.label
        ids = read_single_channel(path, scene, f"2D label image of frame {files.name}")
        (h, w), (rh, rw) = ids.shape, rgb_hw
        if (h, w) != (rh, rw) and abs((w / h) / (rw / rh) - 1) > LABEL_ASPECT_TOLERANCE:
            raise DatasetError(f"2D label image of frame {files.name} is {w}x{h} but its colour image is "
                               f"{rw}x{rh}: not the same view", scene, path)
        ids = ids.astype(np.int64)
        if self.image_source == "posed_images" and self.label_filt_ids == "scannet":
            lut = self._scannet_to_nyu40
            nyu = lut[np.clip(ids, 0, len(lut) - 1)]
            nyu[ids >= len(lut)] = -1
            if (nyu < 0).any():
                bad = int(ids[nyu < 0][0])
                raise DatasetError(f"2D label image of frame {files.name} holds ScanNet label id {bad}, which "
                                   f"{LABEL_MAP_NAME} does not list", scene, path)
        else:
            nyu = ids
            if nyu.max() > NYU40_MAX:
                raise DatasetError(f"2D label image of frame {files.name} holds id {int(nyu.max())}, outside "
                                   f"NYU40 (0..{NYU40_MAX})", scene, path)
        return nyu40_to_scannet20_lut()[nyu]

    @staticmethod
    def _matrix(path, scene: str) -> np.ndarray:
        try:
            m = np.loadtxt(path, dtype=np.float64)
        except FileNotFoundError:
            raise DatasetError("matrix file is missing", scene, path) from None
        except ValueError as e:
            raise DatasetError(f"matrix file is malformed: {e}", scene, path) from None
        if m.shape != (4, 4):
            raise DatasetError(f"expected a 4x4 matrix, got shape {m.shape}", scene, path)
        if not np.isfinite(m).all():
            raise DatasetError("matrix has NaN/inf entries (ScanNet marks failed tracking with -inf)", scene, path)
        return m

    @staticmethod
    def _depth(path, scene: str) -> np.ndarray:
        return read_single_channel(path, scene, "depth image").astype(np.float32) / DEPTH_SCALE

    def _load_gt(self, scene: str, num_points: int) -> np.ndarray | None:
        path = self._label_file(scene)
        if path is None:
            return None
        nyu = np.load(path) if path.suffix == ".npy" else np.fromfile(path, dtype=np.int64)
        if len(nyu) != num_points:
            raise DatasetError(f"labels have {len(nyu)} entries for {num_points} points", scene, path)
        if nyu.min() < 0 or nyu.max() > 255:
            raise DatasetError(f"labels out of the NYU40 range ({nyu.min()}..{nyu.max()})", scene, path)
        return nyu40_to_scannet20_lut()[nyu.astype(np.int64)]
