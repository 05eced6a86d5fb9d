"""nuScenes through the nuscenes-devkit: keyframe LiDAR sweeps with their 6 cameras.

* Splits are the official ones (``nuscenes.utils.splits.create_splits_scenes``); on ``v1.0-mini``
  ``train``/``val`` mean ``mini_train``/``mini_val``; ``all`` takes every scene of the version.
* Ground truth (when the dataroot has nuScenes-lidarseg) is mapped 32 -> 16 classes with the devkit's
  ``LidarsegClassMapper``; the devkit's coarse 'ignore' becomes 255.
* Geometry is the devkit's: ``transform_matrix`` with pyquaternion records, chained
  lidar -> ego(t_lidar) -> global -> ego(t_camera) -> camera, so the ego motion between the LiDAR and each
  camera's timestamp is compensated.
* Images (1600x900) are resized to the training resolution 224x416.
* ``replicate=N`` (a scale rehearsal, ``bench/bench_scale.py``): every keyframe of the split N times, copy ``r``
  under the distinct token ``<sample_data token>~<r>`` (copy 0 keeps its own token).
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
from pyquaternion import Quaternion

from .base import (DATASETS, DatasetAdapter, DatasetError, Frame, FrameInfo, ImageRecord, check_points, check_rigid,
                   read_float_records, read_rgb)
from .classes import nuscenes16, nuscenes_fine_to_16

CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
VERSIONS = ("v1.0-trainval", "v1.0-mini", "v1.0-test")
POINT_COLUMNS = 5  # x, y, z, intensity, ring


@DATASETS.register("nuscenes")
class NuScenesDataset(DatasetAdapter):
    name = "nuscenes"
    image_size = (224, 416)
    point_features = ("intensity",)
    min_depth = 1.0
    voxel_size = 0.1
    extra_options = ("replicate",)  # recorded when > 1

    def __init__(self, root=None, split: str = "train", version: str | None = None, replicate: int = 1, **options):
        if root is None:
            raise DatasetError("nuScenes needs a data root (--data-root / DATA_ROOT=/path/to/nuscenes)")
        try:
            self.replicate = int(replicate)
            if self.replicate != replicate or self.replicate < 1:
                raise ValueError
        except (TypeError, ValueError):
            raise DatasetError(f"nuScenes option replicate={replicate!r} must be an integer >= 1") from None
        if self.replicate > 1:
            options["replicate"] = self.replicate  # recorded in the store's dataset_config
        super().__init__(root, split, **options)
        if not self.root.is_dir():
            raise DatasetError("the nuScenes data root does not exist", file=self.root)
        self.version = version or self._detect_version()
        self.class_names = nuscenes16()

    def _detect_version(self) -> str:
        found = [v for v in VERSIONS if (self.root / v / "sample.json").exists()]
        if not found:
            raise DatasetError(f"not a nuScenes dataroot: none of {', '.join(VERSIONS)} with sample.json inside",
                               file=self.root)
        return found[0]

    @cached_property
    def nusc(self):
        from nuscenes.nuscenes import NuScenes
        try:
            return NuScenes(version=self.version, dataroot=str(self.root), verbose=False)
        except (FileNotFoundError, AssertionError, KeyError, ValueError) as e:
            raise DatasetError(f"nuscenes-devkit cannot load {self.version}: {e}", file=self.root) from None

    @property
    def capabilities(self) -> list[str]:
        return ["point_gt"] if getattr(self.nusc, "lidarseg", None) else []

    def config(self) -> dict:
        return {**super().config(), "version": self.version}

    def frame_alias(self, key: str) -> str | None:
        """A sample token -> its LIDAR_TOP sample_data token (the frame token); None for any other key."""
        try:
            sample = self.nusc.get("sample", key)
        except KeyError:  # the devkit's lookup of an unknown token
            return None
        return sample["data"].get("LIDAR_TOP")

    @classmethod
    def alias_from_config(cls, dataset_config: dict, key: str) -> str | None:
        root = dataset_config.get("root")
        if not root or not Path(root).is_dir():
            return None  # the store was written elsewhere: no tables to look the sample up in
        return cls(root, dataset_config.get("split", "all"), version=dataset_config.get("version")).frame_alias(key)

    @cached_property
    def _scene_names(self) -> set[str]:
        from nuscenes.utils.splits import create_splits_scenes
        if self.split == "all":
            return {s["name"] for s in self.nusc.scene}
        splits = create_splits_scenes()
        key = self.split
        if self.version == "v1.0-mini" and key in ("train", "val"):
            key = f"mini_{key}"
        if key not in splits:
            raise DatasetError(f"unknown nuScenes split '{self.split}' (known: all, {', '.join(sorted(splits))})")
        return set(splits[key])

    @cached_property
    def _lidar_tokens(self) -> list[str]:
        names = self._scene_names
        tokens = []
        for scene in sorted(self.nusc.scene, key=lambda s: s["name"]):
            if scene["name"] not in names:
                continue
            sample_token = scene["first_sample_token"]
            while sample_token:
                sample = self.nusc.get("sample", sample_token)
                tokens.append(sample["data"]["LIDAR_TOP"])
                sample_token = sample["next"]
        if not tokens:
            raise DatasetError(f"split '{self.split}' has no scenes in {self.version}", file=self.root)
        return tokens

    @cached_property
    def _frame_tokens(self) -> list[tuple[str, str]]:
        """(frame token, LiDAR sample_data token) of every frame (``replicate`` copies of each keyframe)."""
        return [(t if r == 0 else f"{t}~{r}", t) for r in range(self.replicate) for t in self._lidar_tokens]

    def frames(self) -> list[FrameInfo]:
        files = {}
        for token in self._lidar_tokens:
            path = self.root / self.nusc.get("sample_data", token)["filename"]
            files[token] = (path, path.stat().st_size if path.exists() else 0)
        return [FrameInfo(token=token, num_points=files[lidar][1] // (4 * POINT_COLUMNS), image_names=list(CAMERAS),
                          points_file=str(files[lidar][0])) for token, lidar in self._frame_tokens]

    # -- loading ------------------------------------------------------------------------------------
    def _pose(self, table: str, token: str, frame: str, inverse: bool = False) -> np.ndarray:
        from nuscenes.utils.geometry_utils import transform_matrix
        rec = self.nusc.get(table, token)
        q = np.asarray(rec["rotation"], dtype=np.float64)
        t = np.asarray(rec["translation"], dtype=np.float64)
        table_file = self.root / self.version / f"{table}.json"
        if q.shape != (4,) or t.shape != (3,) or not (np.isfinite(q).all() and np.isfinite(t).all()):
            raise DatasetError(f"{table} record {token} has a non-finite or malformed pose", frame, table_file)
        if abs(np.linalg.norm(q) - 1.0) > 1e-3:
            raise DatasetError(f"{table} record {token} has a non-unit rotation quaternion (|q| = "
                               f"{np.linalg.norm(q):.4f}), i.e. a non-orthonormal rotation", frame, table_file)
        return transform_matrix(t, Quaternion(q), inverse=inverse)

    def lidar_to_camera(self, lidar_sd: dict, cam_sd: dict, frame: str | None = None) -> np.ndarray:
        """4x4 transform from the LiDAR frame at its timestamp into the camera at the camera's timestamp
        (``frame``: the frame token errors name, by default the LiDAR sample_data token)."""
        frame = frame or lidar_sd["token"]
        lidar2ego = self._pose("calibrated_sensor", lidar_sd["calibrated_sensor_token"], frame)
        ego2global = self._pose("ego_pose", lidar_sd["ego_pose_token"], frame)
        global2ego_cam = self._pose("ego_pose", cam_sd["ego_pose_token"], frame, inverse=True)
        ego2cam = self._pose("calibrated_sensor", cam_sd["calibrated_sensor_token"], frame, inverse=True)
        return ego2cam @ global2ego_cam @ ego2global @ lidar2ego

    def load(self, index: int) -> Frame:
        token, lidar_token = self._frame_tokens[index]
        lidar_sd = self.nusc.get("sample_data", lidar_token)
        path = self.root / lidar_sd["filename"]
        raw = read_float_records(path, POINT_COLUMNS, token)
        xyz = np.ascontiguousarray(raw[:, :3])
        check_points(xyz, token, str(path))
        feat = raw[:, 3:4] / 255.0
        sample = self.nusc.get("sample", lidar_sd["sample_token"])
        images = []
        for cam in CAMERAS:
            if cam not in sample["data"]:
                raise DatasetError(f"sample has no {cam} image", token, self.root / self.version / "sample_data.json")
            cam_sd = self.nusc.get("sample_data", sample["data"][cam])
            cam_path = self.root / cam_sd["filename"]
            rgb = read_rgb(cam_path, token)
            cs = self.nusc.get("calibrated_sensor", cam_sd["calibrated_sensor_token"])
            k = np.asarray(cs["camera_intrinsic"], dtype=np.float64)
            if k.shape != (3, 3) or not np.isfinite(k).all():
                raise DatasetError(f"{cam} has malformed intrinsics", token, self.root / self.version /
                                   "calibrated_sensor.json")
            t = self.lidar_to_camera(lidar_sd, cam_sd, token)
            check_rigid(t, f"lidar->{cam} transform", token, str(cam_path))
            images.append(ImageRecord(name=cam, file=str(cam_path), rgb=rgb, intrinsics=k, points_to_camera=t))
        return Frame(token=token, points_file=str(path), xyz=xyz, feat=feat.astype(np.float32), images=images,
                     gt=self._load_gt(token, lidar_token, len(xyz)))

    def _load_gt(self, token: str, lidar_token: str, num_points: int) -> np.ndarray | None:
        if not getattr(self.nusc, "lidarseg", None):
            return None
        rec = self.nusc.get("lidarseg", lidar_token)
        path = self.root / rec["filename"]
        try:
            fine = np.fromfile(path, dtype=np.uint8)
        except FileNotFoundError:
            raise DatasetError("lidarseg label file is missing", token, path) from None
        if len(fine) != num_points:
            raise DatasetError(f"lidarseg labels have {len(fine)} entries for {num_points} points", token, path)
        return self._fine_lut[fine]

    @cached_property
    def _fine_lut(self) -> np.ndarray:
        lut = np.full(256, 255, dtype=np.uint8)
        fine_to_16 = nuscenes_fine_to_16()
        for name, idx in self.nusc.lidarseg_name2idx_mapping.items():
            lut[idx] = fine_to_16.get(name, 255)
        return lut
