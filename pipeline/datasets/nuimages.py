"""nuImages through the nuscenes-devkit's ``nuimages`` package: 2D only, a frame of the cache is a sample.

* A version folder (``v1.0-train``, ``v1.0-val``, ``v1.0-test``, ``v1.0-mini``) is one split: ``--split
  train|val|test|mini`` picks it (``--dataset-option version=...`` names one directly). Its tables are loaded by
  the devkit's :class:`nuimages.NuImages`; a version folder missing any of them is refused, naming them.
* Each sample contributes its key-camera image (``sample.key_camera_token``), resized to 224x416 like the
  nuScenes cameras, with the camera's K from ``calibrated_sensor``.
* Ground truth per pixel: the surface annotations (``flat.driveable_surface``) first, then the object
  annotations in token order on top, each mask decoded with the devkit's ``mask_decode`` -- the drawing
  order of ``NuImages.get_segmentation``, against which a test checks it. Category names are mapped to the
  nuScenes-16 classes with the devkit's lidarseg class mapper (the names nuImages shares with
  nuScenes-lidarseg), so ``vehicle.emergency.police``, ``vehicle.ego``, ... and unannotated pixels are 255.
  nuImages annotates only objects and the driveable surface: ``other_flat``, ``sidewalk``, ``terrain``,
  ``manmade`` and ``vegetation`` never appear in its ground truth.
* No points: the store's modalities are ``["images"]`` (no ``points/*``, no ``pairs/*``).

The adapter has been tested on a nuImages-format fixture built in the tests, not yet on real nuImages data.
"""
from __future__ import annotations

import base64
from collections import defaultdict
from functools import cached_property

import numpy as np

from .base import DATASETS, DatasetAdapter, DatasetError, Frame, FrameInfo, ImageRecord, read_rgb
from .classes import nuscenes16, nuscenes_fine_to_16

SPLIT_VERSIONS = {"train": "v1.0-train", "val": "v1.0-val", "test": "v1.0-test", "mini": "v1.0-mini"}
#: the tables of a nuImages version folder (those ``NuImages`` loads)
TABLES = ("attribute", "calibrated_sensor", "category", "ego_pose", "log", "object_ann", "sample", "sample_data",
          "sensor", "surface_ann")


@DATASETS.register("nuimages")
class NuImagesDataset(DatasetAdapter):
    name = "nuimages"
    image_size = (224, 416)
    modalities = ("images",)
    image_gt_name = "nuimages_annotations"

    def __init__(self, root=None, split: str = "train", version: str | None = None, **options):
        if root is None:
            raise DatasetError("nuImages needs a data root (--data-root / DATA_ROOT=/path/to/nuimages)")
        super().__init__(root, split, **options)
        if not self.root.is_dir():
            raise DatasetError("the nuImages data root does not exist", file=self.root)
        if version is None:
            if split not in SPLIT_VERSIONS:
                raise DatasetError(f"unknown nuImages split '{split}' (known: {', '.join(SPLIT_VERSIONS)}; or "
                                   f"--dataset-option version=v1.0-...)")
            version = SPLIT_VERSIONS[split]
        self.version = version
        self.class_names = nuscenes16()
        table_dir = self.root / version
        if not table_dir.is_dir():
            found = sorted(p.name for p in self.root.glob("v1.0-*") if p.is_dir())
            raise DatasetError(f"not a nuImages dataroot for split '{split}': no {version}/ folder (found: "
                               f"{', '.join(found) or 'none'})", file=table_dir)
        missing = [t for t in TABLES if not (table_dir / f"{t}.json").exists()]
        if missing:
            raise DatasetError(f"not a nuImages dataroot: {version}/ lacks the table(s) "
                               f"{', '.join(m + '.json' for m in missing)}", file=table_dir / f"{missing[0]}.json")

    def config(self) -> dict:
        return {**super().config(), "version": self.version}

    @cached_property
    def nuim(self):
        from nuimages import NuImages
        nuim = NuImages(version=self.version, dataroot=str(self.root), lazy=True, verbose=False)
        for table in TABLES:
            try:
                nuim.load_tables([table])
            except (OSError, ValueError, AssertionError) as e:  # json.JSONDecodeError is a ValueError
                raise DatasetError(f"nuimages-devkit cannot load table {table}: {e}",
                                   file=self._table_file(table)) from None
        return nuim

    def _table_file(self, table: str):
        return self.root / self.version / f"{table}.json"

    @property
    def capabilities(self) -> list[str]:
        return ["image_gt"] if (self.nuim.object_ann or self.nuim.surface_ann) else []

    @cached_property
    def _samples(self) -> list[dict]:
        """The samples in a fixed order: by log file, then time."""
        logs = {rec["token"]: rec.get("logfile", "") for rec in self.nuim.log}
        samples = sorted(self.nuim.sample, key=lambda s: (logs.get(s["log_token"], ""), s["timestamp"], s["token"]))
        if not samples:
            raise DatasetError(f"{self.version} has no samples", file=self._table_file("sample"))
        return samples

    def _key_camera(self, sample: dict) -> dict:
        try:
            sd = self.nuim.get("sample_data", sample["key_camera_token"])
        except KeyError:
            raise DatasetError(f"key camera {sample['key_camera_token']} of the sample is not in sample_data",
                               sample["token"], self._table_file("sample_data")) from None
        return sd

    def _channel(self, sd: dict, frame: str) -> str:
        try:
            return self.nuim.shortcut("sample_data", "sensor", sd["token"])["channel"]
        except KeyError as e:
            raise DatasetError(f"sample_data {sd['token']} has no calibrated sensor/sensor record ({e})", frame,
                               self._table_file("calibrated_sensor")) from None

    def frames(self) -> list[FrameInfo]:
        return [FrameInfo(token=s["token"], num_points=0, image_names=[self._channel(self._key_camera(s), s["token"])])
                for s in self._samples]

    # -- loading ------------------------------------------------------------------------------------
    def load(self, index: int) -> Frame:
        sample = self._samples[index]
        token = sample["token"]
        sd = self._key_camera(sample)
        path = self.root / sd["filename"]
        rgb = read_rgb(path, token)
        if (sd.get("height"), sd.get("width")) != rgb.shape[:2]:
            raise DatasetError(f"image is {rgb.shape[1]}x{rgb.shape[0]} but sample_data {sd['token']} says "
                               f"{sd.get('width')}x{sd.get('height')}", token, path)
        cs = self.nuim.get("calibrated_sensor", sd["calibrated_sensor_token"])
        k = np.asarray(cs.get("camera_intrinsic"), dtype=np.float64)
        if k.shape != (3, 3) or not np.isfinite(k).all():
            raise DatasetError(f"calibrated_sensor {cs['token']} has malformed camera intrinsics", token,
                               self._table_file("calibrated_sensor"))
        gt = self.image_gt(sd, rgb.shape[:2], token) if "image_gt" in self.capabilities else None
        image = ImageRecord(name=self._channel(sd, token), file=str(path), rgb=rgb, intrinsics=k,
                            points_to_camera=None, gt=gt)
        return Frame(token=token, points_file="", xyz=None, feat=None, images=[image])

    # -- ground truth -------------------------------------------------------------------------------
    @cached_property
    def _annotations(self) -> dict:
        """sample_data token -> (surface annotations in table order, object annotations in token order)."""
        surfaces, objects = defaultdict(list), defaultdict(list)
        for ann in self.nuim.surface_ann:
            surfaces[ann["sample_data_token"]].append(ann)
        for ann in self.nuim.object_ann:
            objects[ann["sample_data_token"]].append(ann)
        return {sd: (surfaces.get(sd, []), sorted(objects.get(sd, []), key=lambda a: a["token"]))
                for sd in set(surfaces) | set(objects)}

    @cached_property
    def category_to_class(self) -> dict[str, int]:
        """nuImages category name -> nuScenes-16 index (255 = ignored), via the devkit's lidarseg mapper."""
        fine_to_16 = nuscenes_fine_to_16()
        return {c["name"]: fine_to_16.get(c["name"], 255) for c in self.nuim.category}

    def image_gt(self, sd: dict, image_hw, frame: str) -> np.ndarray:
        """The native-resolution nuScenes-16 label map of a key-camera image (255 = unlabelled)."""
        from nuimages.utils.utils import mask_decode
        h, w = int(image_hw[0]), int(image_hw[1])
        out = np.full((h, w), 255, dtype=np.uint8)
        surfaces, objects = self._annotations.get(sd["token"], ([], []))
        for table, anns in (("surface_ann", surfaces), ("object_ann", objects)):
            for ann in anns:
                if ann.get("mask") is None:
                    continue  # as NuImages.get_segmentation: an annotation without a mask draws nothing
                where = f"mask of {table} {ann['token']}"
                size = list(ann["mask"].get("size") or [])
                if size != [h, w]:
                    raise DatasetError(f"{where} is {size} (height, width) but the image is [{h}, {w}]", frame,
                                       self._table_file(table))
                try:
                    runs = rle_run_lengths(base64.b64decode(ann["mask"]["counts"], validate=True))
                    if min(runs, default=0) < 0 or sum(runs) != h * w:
                        raise ValueError(f"its run lengths cover {sum(runs)} pixels, not {h}x{w} = {h * w}")
                    mask = mask_decode(ann["mask"])
                except Exception as e:  # noqa: BLE001 — base64 or RLE errors of any kind: name the annotation
                    raise DatasetError(f"{where} cannot be decoded: {type(e).__name__}: {e}", frame,
                                       self._table_file(table)) from None
                if mask.shape != (h, w) or mask.max(initial=0) > 1:
                    raise DatasetError(f"{where} decodes to a {mask.shape} mask with values up to "
                                       f"{int(mask.max(initial=0))}, not a binary {h}x{w} mask", frame,
                                       self._table_file(table))
                try:
                    name = self.nuim.get("category", ann["category_token"])["name"]
                except KeyError:
                    raise DatasetError(f"{table} {ann['token']} has an unknown category token "
                                       f"{ann['category_token']}", frame, self._table_file(table)) from None
                out[mask == 1] = self.category_to_class.get(name, 255)
        return out


def rle_run_lengths(counts: bytes) -> list[int]:
    """The run lengths of a COCO compressed-RLE string (pycocotools' ``rleFrString``, in Python).

    pycocotools decodes without bounds checks (runs longer than the mask overrun its buffer, shorter ones leave
    it uninitialised), so a mask's runs are checked against its size before the devkit's ``mask_decode``.
    """
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x = k = 0
        more = True
        while more:
            if p >= len(counts):
                raise ValueError("the RLE string ends inside a run length")
            c = counts[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"byte {counts[p]!r} at {p} is not an RLE character")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs
