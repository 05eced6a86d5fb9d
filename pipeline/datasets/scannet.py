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
"""
from __future__ import annotations

from functools import cached_property

import numpy as np

from ..projection import scale_intrinsics
from .base import (DATASETS, DatasetAdapter, DatasetError, Frame, FrameInfo, ImageRecord, check_points, check_rigid,
                   read_float_records, read_rgb)
from .classes import SCANNET20, nyu40_to_scannet20_lut

POINT_COLUMNS = 6
DEPTH_SCALE = 1000.0  # ScanNet depth PNGs hold millimetres


@DATASETS.register("scannet")
class ScanNetDataset(DatasetAdapter):
    name = "scannet"
    class_names = SCANNET20
    image_size = (240, 320)
    point_features = ("r", "g", "b")
    min_depth = 0.1
    voxel_size = 0.05

    def __init__(self, root=None, split: str = "train", occlusion_tolerance: float = 0.1, **options):
        if root is None:
            raise DatasetError("ScanNet needs a data root (--data-root / DATA_ROOT=/path/to/scannet)")
        super().__init__(root, split, **options)
        self.occlusion_tolerance = float(occlusion_tolerance)
        if not (self.root / "points").is_dir() or not (self.root / "posed_images").is_dir():
            raise DatasetError("not a ScanNet export: expected points/ and posed_images/ "
                               "(mmdetection3d layout)", file=self.root)

    @property
    def capabilities(self) -> list[str]:
        return ["point_gt"] if all(self._label_file(s) is not None for s in self.scenes) else []

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

    def _image_ids(self, scene: str) -> list[str]:
        return sorted(p.stem for p in (self.root / "posed_images" / scene).glob("*.jpg"))

    def _label_file(self, scene: str):
        for p in (self.root / "semantic_mask" / f"{scene}.bin", self.root / "labels" / f"{scene}_sem_label_all.npy"):
            if p.exists():
                return p
        return None

    def frames(self) -> list[FrameInfo]:
        out = []
        for scene in self.scenes:
            path = self.root / "points" / f"{scene}.bin"
            size = path.stat().st_size if path.exists() else 0
            out.append(FrameInfo(token=scene, num_points=size // (4 * POINT_COLUMNS),
                                 image_names=self._image_ids(scene), points_file=str(path)))
        return out

    def config(self) -> dict:
        return {**super().config(), "depth_scale": DEPTH_SCALE}

    def load(self, index: int) -> Frame:
        scene = self.scenes[index]
        path = self.root / "points" / f"{scene}.bin"
        raw = read_float_records(path, POINT_COLUMNS, scene)
        xyz = np.ascontiguousarray(raw[:, :3])
        check_points(xyz, scene, str(path))
        feat = (raw[:, 3:6] / 255.0).astype(np.float32)
        image_dir = self.root / "posed_images" / scene
        k_color = self._matrix(image_dir / "intrinsic.txt", scene)[:3, :3]
        depth_k_file = image_dir / "intrinsic_depth.txt"
        images = []
        for image_id in self._image_ids(scene):
            rgb = read_rgb(image_dir / f"{image_id}.jpg", scene)
            depth = self._depth(image_dir / f"{image_id}.png", scene)
            pose_file = image_dir / f"{image_id}.txt"
            cam2world = self._matrix(pose_file, scene)
            check_rigid(cam2world, f"pose of image {image_id}", scene, str(pose_file))
            k_depth = (self._matrix(depth_k_file, scene)[:3, :3] if depth_k_file.exists()
                       else scale_intrinsics(k_color, rgb.shape[:2], depth.shape))
            images.append(ImageRecord(name=image_id, file=str(image_dir / f"{image_id}.jpg"), rgb=rgb,
                                      intrinsics=k_color, points_to_camera=np.linalg.inv(cam2world), depth=depth,
                                      depth_intrinsics=k_depth))
        if not images:
            raise DatasetError("the scene has no posed images", scene, image_dir)
        return Frame(token=scene, points_file=str(path), xyz=xyz, feat=feat, images=images,
                     gt=self._load_gt(scene, len(xyz)))

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
        from PIL import Image
        try:
            with Image.open(path) as im:
                im.load()
                d = np.asarray(im)
        except FileNotFoundError:
            raise DatasetError("depth image is missing", scene, path) from None
        except (OSError, SyntaxError, ValueError) as e:
            raise DatasetError(f"depth image is unreadable or truncated: {e}", scene, path) from None
        if d.ndim != 2:
            raise DatasetError(f"depth image must be single-channel, got shape {d.shape}", scene, path)
        return d.astype(np.float32) / DEPTH_SCALE

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
