"""A tiny nuImages-format dataroot for the tests (no nuImages data exist on this machine).

Three samples of one log, each with a key-camera JPEG of 448x832 (twice the training resolution) and one
sweep record whose file is absent (as when the sweeps are not downloaded); the ten tables ``NuImages`` loads,
with the real nuImages category names; surface and object annotations whose masks are RLE-encoded the way
the devkit's ``mask_decode`` reads them (pycocotools RLE, base64 counts).

Every mask is drawn at the training resolution (224x416) and upsampled 2x by pixel replication, so a
nearest-neighbour downsampling returns it exactly: ``EXPECTED_TRAINING_GT`` is the ground truth the store
must hold, computed here from the shapes, independently of the adapter.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as cocomask

VERSION = "v1.0-mini"
TRAIN_HW = (224, 416)
NATIVE_HW = (448, 832)
# the nuImages categories (23 object classes, the driveable surface and the ego vehicle)
CATEGORIES = ("animal", "flat.driveable_surface", "human.pedestrian.adult", "human.pedestrian.child",
              "human.pedestrian.construction_worker", "human.pedestrian.personal_mobility",
              "human.pedestrian.police_officer", "human.pedestrian.stroller", "human.pedestrian.wheelchair",
              "movable_object.barrier", "movable_object.debris", "movable_object.pushable_pullable",
              "movable_object.trafficcone", "static_object.bicycle_rack", "vehicle.bicycle", "vehicle.bus.bendy",
              "vehicle.bus.rigid", "vehicle.car", "vehicle.construction", "vehicle.emergency.ambulance",
              "vehicle.emergency.police", "vehicle.motorcycle", "vehicle.trailer", "vehicle.truck", "vehicle.ego")
CHANNELS = ("CAM_FRONT", "CAM_BACK_LEFT", "CAM_FRONT")
# nuScenes-16 indices (pipeline.datasets.classes.nuscenes16 order) of the categories the fixture draws
CLASS_INDEX = {"movable_object.barrier": 0, "vehicle.car": 3, "human.pedestrian.adult": 6,
               "human.pedestrian.police_officer": 6, "vehicle.truck": 9, "flat.driveable_surface": 10}


def encode_mask(mask: np.ndarray) -> dict:
    """A binary mask as nuImages stores it: pycocotools RLE with base64 counts (inverse of ``mask_decode``)."""
    rle = cocomask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": base64.b64encode(rle["counts"]).decode("ascii")}


def _rect(top, left, bottom, right):
    m = np.zeros(TRAIN_HW, dtype=bool)
    m[top:bottom, left:right] = True
    return m


def _disk(cy, cx, r):
    yy, xx = np.mgrid[:TRAIN_HW[0], :TRAIN_HW[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _shapes(i: int):
    """(surface anns, object anns) of sample i as (token, category, training-resolution mask or None)."""
    road = _rect(120 + 4 * i, 0, 224, 416)
    ego = _rect(205, 40, 224, 380)
    surfaces = [(f"surf-{i}-road", "flat.driveable_surface", road), (f"surf-{i}-ego", "vehicle.ego", ego)]
    objects = [  # drawn in token order: later tokens win overlaps
        (f"obj-{i}-a-car", "vehicle.car", _rect(90, 60 + 20 * i, 170, 200 + 20 * i)),
        (f"obj-{i}-b-ped", "human.pedestrian.adult", _disk(140, 190 + 20 * i, 25)),
        (f"obj-{i}-c-police", "vehicle.emergency.police", _rect(100, 280, 180, 360)),  # lidarseg: ignored
        (f"obj-{i}-d-cone", "movable_object.trafficcone", None),  # an annotation without a mask draws nothing
        (f"obj-{i}-e-barrier", "movable_object.barrier", _rect(150, 0, 200, 50 + 10 * i)),
    ]
    if i == 1:
        objects.append((f"obj-{i}-f-truck", "vehicle.truck", _disk(60, 330, 40)))
    return surfaces, objects


def expected_training_gt(i: int) -> np.ndarray:
    """The nuScenes-16 map of sample i at 224x416: surfaces, then objects in token order; 255 elsewhere."""
    surfaces, objects = _shapes(i)
    out = np.full(TRAIN_HW, 255, dtype=np.uint8)
    for _, category, mask in surfaces + sorted(objects):
        if mask is not None:
            out[mask] = CLASS_INDEX.get(category, 255)
    return out


def build_nuimages(root: Path, num_samples: int = 3) -> Path:
    """Write the dataroot under ``root`` and return it."""
    rng = np.random.default_rng(0)
    tables: dict[str, list] = {t: [] for t in ("attribute", "calibrated_sensor", "category", "ego_pose", "log",
                                               "object_ann", "sample", "sample_data", "sensor", "surface_ann")}
    tables["category"] = [{"token": f"cat-{n}", "name": n, "description": n} for n in CATEGORIES]
    tables["attribute"] = [{"token": "attr-parked", "name": "vehicle.parked", "description": "parked"}]
    tables["log"] = [{"token": "log-0", "logfile": "n008-2018-08-01-00-00-00-0400", "vehicle": "n008",
                      "date_captured": "2018-08-01", "location": "boston-seaport"}]
    k = [[1266.4, 0.0, 816.3], [0.0, 1266.4, 491.5], [0.0, 0.0, 1.0]]
    for channel in sorted(set(CHANNELS)):
        tables["sensor"].append({"token": f"sensor-{channel}", "channel": channel, "modality": "camera"})
        tables["calibrated_sensor"].append({
            "token": f"cs-{channel}", "sensor_token": f"sensor-{channel}", "translation": [1.7, 0.0, 1.5],
            "rotation": [0.5, -0.5, 0.5, -0.5], "camera_intrinsic": (np.asarray(k) * [[0.52], [0.455], [1]]).tolist(),
            "camera_distortion": [0.0] * 5})
    cat = {n: f"cat-{n}" for n in CATEGORIES}
    for i in range(num_samples):
        channel = CHANNELS[i % len(CHANNELS)]
        t = 1533096000000000 + i * 10_000_000
        key, sweep = f"sd-{i}-key", f"sd-{i}-sweep"
        filename = f"samples/{channel}/n008-2018-08-01__{channel}__{t}.jpg"
        tables["sample"].append({"token": f"sample-{i}", "timestamp": t, "log_token": "log-0",
                                 "key_camera_token": key})
        for tok, ts, fname, is_key, prev, nxt in ((sweep, t - 500_000, f"sweeps/{channel}/sweep-{i}.jpg", False,
                                                   "", key),
                                                  (key, t, filename, True, sweep, "")):
            tables["ego_pose"].append({"token": f"ego-{tok}", "translation": [100.0 + i, 200.0, 0.0],
                                       "rotation": [1.0, 0.0, 0.0, 0.0], "timestamp": ts,
                                       "rotation_rate": [0.0, 0.0, 0.0], "acceleration": [0.0, 0.0, 9.8],
                                       "speed": 5.0})
            tables["sample_data"].append({
                "token": tok, "sample_token": f"sample-{i}", "ego_pose_token": f"ego-{tok}",
                "calibrated_sensor_token": f"cs-{channel}", "filename": fname, "fileformat": "jpg",
                "width": NATIVE_HW[1], "height": NATIVE_HW[0], "timestamp": ts, "is_key_frame": is_key,
                "prev": prev, "next": nxt})
        surfaces, objects = _shapes(i)
        for token, category, mask in surfaces:
            tables["surface_ann"].append({"token": token, "sample_data_token": key, "category_token": cat[category],
                                          "mask": encode_mask(_native(mask))})
        for token, category, mask in objects:
            native = _native(mask) if mask is not None else None
            bbox = _bbox(native) if native is not None else [10, 10, 20, 20]
            tables["object_ann"].append({
                "token": token, "sample_data_token": key, "category_token": cat[category],
                "attribute_tokens": ["attr-parked"] if category.startswith("vehicle") else [], "bbox": bbox,
                "mask": encode_mask(native) if native is not None else None})
        path = root / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, size=(TRAIN_HW[0] // 8, TRAIN_HW[1] // 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize(NATIVE_HW[::-1], Image.BILINEAR).save(path, quality=90)
    (root / VERSION).mkdir(parents=True, exist_ok=True)
    for name, records in tables.items():
        (root / VERSION / f"{name}.json").write_text(json.dumps(records, indent=1))
    return root


def _native(mask: np.ndarray) -> np.ndarray:
    return np.kron(mask.astype(np.uint8), np.ones((2, 2), dtype=np.uint8))


def _bbox(mask: np.ndarray) -> list[int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]
