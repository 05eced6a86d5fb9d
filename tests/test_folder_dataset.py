"""The folder dataset (pipeline/datasets/folder.py): converters that reproduce the real adapters' pairs exactly,
and one line naming file, field and expectation for every bad layout."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from pipeline.datasets import DatasetError, build_adapter
from pipeline.datasets.folder_from import write_folder
from pipeline.stages.correspond import CorrespondStage


def _pairs(adapter, index: int) -> dict:
    """The correspond stage's pairs of one frame (every (image, point, pixel) with its depth)."""
    return CorrespondStage._pairs(adapter.load(index), adapter, tuple(adapter.image_size), 0)


def _same_pairs(source, folder):
    assert [f.token for f in folder.frames()] == [f.token for f in source.frames()]
    assert [f.num_points for f in folder.frames()] == [f.num_points for f in source.frames()]
    assert folder.class_names == source.class_names and folder.image_size == source.image_size
    total = 0
    for i in range(len(source.frames())):
        a, b = source.load(i), folder.load(i)
        np.testing.assert_array_equal(a.xyz, b.xyz)
        np.testing.assert_array_equal(a.feat, b.feat)
        assert (a.gt is None) == (b.gt is None)
        if a.gt is not None:
            np.testing.assert_array_equal(a.gt, b.gt)
        pa, pb = _pairs(source, i), _pairs(folder, i)
        for key in pa:
            np.testing.assert_array_equal(pa[key], pb[key], err_msg=key)
        total += len(pa["pairs/point"])
    assert total > 0
    return total


def test_folder_from_nuscenes_gives_the_nuscenes_pairs(nuscenes_root, tmp_path):
    source = build_adapter("nuscenes", nuscenes_root, "all")
    folder = build_adapter("folder", write_folder(source, tmp_path / "nus", progress=False), "all")
    assert _same_pairs(source, folder) > 1000
    assert folder.min_depth == source.min_depth and folder.occlusion_tolerance is None


def test_folder_from_scannet_gives_the_scannet_pairs_depth_test_included(scannet_root, tmp_path):
    source = build_adapter("scannet", scannet_root, "all")
    folder = build_adapter("folder", write_folder(source, tmp_path / "scan", progress=False), "all")
    frame = folder.load(0)
    assert all(im.depth is not None for im in frame.images)  # the occlusion test runs on the folder too
    assert folder.occlusion_tolerance == source.occlusion_tolerance == 0.1
    assert _same_pairs(source, folder) > 1000
    assert "point_gt" in folder.capabilities


def test_moving_rig_poses_compose_as_nuscenes_does(nuscenes_root, tmp_path):
    """Per-sensor ego poses instead of the composed transform: the same pairs as the nuscenes adapter."""
    from pyquaternion import Quaternion
    from nuscenes.utils.geometry_utils import transform_matrix
    source = build_adapter("nuscenes", nuscenes_root, "all")
    root = write_folder(source, tmp_path / "rig", progress=False)
    nusc = source.nusc
    lidar = nusc.get("sample_data", source.frames()[0].token)
    sample = nusc.get("sample", lidar["sample_token"])

    def pose(table, token):
        rec = nusc.get(table, token)
        return transform_matrix(rec["translation"], Quaternion(rec["rotation"])).tolist()

    calib_file = root / "frames" / lidar["token"] / "calib.json"
    calib = json.loads(calib_file.read_text())
    calib["points"] = {"sensor_to_ego": pose("calibrated_sensor", lidar["calibrated_sensor_token"]),
                       "ego_pose": pose("ego_pose", lidar["ego_pose_token"]), "timestamp": lidar["timestamp"]}
    for entry in calib["images"]:
        cam = nusc.get("sample_data", sample["data"][entry["name"]])
        del entry["points_to_camera"]
        entry.update(sensor_to_ego=pose("calibrated_sensor", cam["calibrated_sensor_token"]),
                     ego_pose=pose("ego_pose", cam["ego_pose_token"]), timestamp=cam["timestamp"])
    calib_file.write_text(json.dumps(calib))
    folder = build_adapter("folder", root, "all")
    a, b = _pairs(source, 0), _pairs(folder, 0)
    np.testing.assert_array_equal(a["pairs/point"], b["pairs/point"])
    np.testing.assert_array_equal(a["pairs/uv"], b["pairs/uv"])


# -- bad layouts: a tiny hand-written folder, broken one way at a time ---------------------------------------

def _tiny_folder(root, fmt: str = "npy"):
    """One frame, 200 points in front of one 32x24 camera, ground truth per point and per pixel."""
    rng = np.random.default_rng(0)
    frame = root / "frames" / "f0"
    frame.mkdir(parents=True)
    xyz = np.c_[rng.uniform(-1, 1, (200, 2)), rng.uniform(2, 5, 200)].astype(np.float32)
    pts = np.c_[xyz, rng.uniform(0, 1, 200)].astype(np.float32)
    if fmt == "npy":
        np.save(frame / "points.npy", pts)
    elif fmt == "bin":
        pts.tofile(frame / "points.bin")
    else:
        from plyfile import PlyData, PlyElement
        v = np.array([tuple(p) for p in pts], dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("intensity", "f4")])
        PlyData([PlyElement.describe(v, "vertex")]).write(str(frame / "points.ply"))
    np.save(frame / "points_gt.npy", rng.integers(0, 2, 200).astype(np.uint8))
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(frame / "cam.png")
    Image.fromarray(np.ones((24, 32), np.uint8)).save(frame / "cam_gt.png")
    calib = {"images": [{"name": "cam", "file": "cam.png", "width": 32, "height": 24, "gt": "cam_gt.png",
                         "intrinsics": [[20, 0, 16], [0, 20, 12], [0, 0, 1]],
                         "points_to_camera": np.eye(4).tolist()}]}
    (frame / "calib.json").write_text(json.dumps(calib))
    meta = {"classes": ["road", "car"], "image_size": [24, 32], "point_fields": ["intensity"],
            "splits": {"train": ["f0"]}}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.mark.parametrize("fmt", ["npy", "bin", "ply"])
def test_tiny_folder_reads_every_point_format(tmp_path, fmt):
    ds = build_adapter("folder", _tiny_folder(tmp_path, fmt))
    assert ds.frames()[0].num_points == 200
    frame = ds.load(0)
    assert frame.xyz.dtype == np.float32 and frame.feat.shape == (200, 1)
    assert ds.capabilities == ["point_gt", "image_gt"]
    assert len(_pairs(ds, 0)["pairs/point"]) > 0


def _edit_calib(root, **changes):
    path = root / "frames" / "f0" / "calib.json"
    calib = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            del calib["images"][0][k]
        else:
            calib["images"][0][k] = v
    path.write_text(json.dumps(calib))


def _error(root) -> str:
    with pytest.raises(DatasetError) as e:
        build_adapter("folder", root).load(0)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_intrinsics(tmp_path):
    root = _tiny_folder(tmp_path)
    _edit_calib(root, intrinsics=None)
    msg = _error(root)
    assert "'intrinsics' is missing" in msg and "3x3" in msg and "calib.json" in msg


def test_3x4_where_4x4_is_needed(tmp_path):
    root = _tiny_folder(tmp_path)
    _edit_calib(root, points_to_camera=np.eye(4)[:3].tolist())
    msg = _error(root)
    assert "'points_to_camera' is 3x4, expected 4x4" in msg and "calib.json" in msg


def test_points_not_float32(tmp_path):
    root = _tiny_folder(tmp_path)
    path = root / "frames" / "f0" / "points.npy"
    np.save(path, np.load(path).astype(np.float64))
    msg = _error(root)
    assert "float64, expected float32" in msg and "points.npy" in msg


def test_points_with_nan(tmp_path):
    root = _tiny_folder(tmp_path)
    path = root / "frames" / "f0" / "points.npy"
    pts = np.load(path)
    pts[7, 1] = np.nan
    np.save(path, pts)
    msg = _error(root)
    assert "NaN" in msg and "row 7" in msg and "points.npy" in msg


def test_image_of_another_size_than_its_calibration(tmp_path):
    root = _tiny_folder(tmp_path)
    _edit_calib(root, width=64)
    msg = _error(root)
    assert "image is 32x24" in msg and "64x24" in msg and "cam.png" in msg


@pytest.mark.parametrize("which", ["points", "pixels"])
def test_gt_id_outside_the_class_list(tmp_path, which):
    root = _tiny_folder(tmp_path)
    if which == "points":
        ids = np.zeros(200, np.uint8)
        ids[3] = 5
        np.save(root / "frames" / "f0" / "points_gt.npy", ids)
    else:
        Image.fromarray(np.full((24, 32), 9, np.uint8)).save(root / "frames" / "f0" / "cam_gt.png")
    msg = _error(root)
    assert "outside the class list" in msg and ("points_gt.npy" in msg if which == "points" else "cam_gt.png" in msg)


def test_dataset_json_errors_name_the_field(tmp_path):
    root = _tiny_folder(tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "image_size": [24]}))
    with pytest.raises(DatasetError, match=r"field 'image_size' .*expected \[H, W\].*dataset.json"):
        build_adapter("folder", root)
    (root / "dataset.json").write_text(json.dumps({**meta, "like": "kitti"}))
    with pytest.raises(DatasetError, match="field 'like'"):
        build_adapter("folder", root)
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="no split 'val'"):
        build_adapter("folder", root, "val").frames()


def test_shared_rig_file(tmp_path):
    """Without a calib.json the frame takes rig.json of the root."""
    root = _tiny_folder(tmp_path)
    shutil.move(root / "frames" / "f0" / "calib.json", root / "rig.json")
    assert len(_pairs(build_adapter("folder", root), 0)["pairs/point"]) > 0


def test_config_folder_takes_the_settings_of_like():
    from train.config import ConfigError, load_config
    indoor, street = load_config("folder", like="scannet"), load_config("folder", like="nuscenes")
    assert indoor["data"]["voxel_size"] == 0.05 and indoor["data"]["images_per_frame"] == 16
    assert street["data"]["voxel_size"] == 0.1 and street["schedule"]["epochs"] == 20
    with pytest.raises(ConfigError, match="'like'"):
        load_config("folder", like=None)


def test_prompt_names_of_dataset_json_reach_clip():
    from pipeline.models.prompts import class_texts
    assert class_texts(["road", "car"], dataset="folder", own_names={"road": "asphalt road"}) == \
        [("asphalt road",), ("car",)]
