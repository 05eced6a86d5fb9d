"""Correspondences on the real fixtures: nuScenes against the devkit, ScanNet against its depth maps."""
from __future__ import annotations

import numpy as np
import pytest

from data_cache.store import Store
from data_cache.validate import validate_store
from pipeline.datasets import DatasetError, build_adapter
from pipeline.projection import project_points
from pipeline.runner import run_labels

# nusc.explorer.map_pointcloud_to_image on the fixture at 1600x900 (the fixture's README reference)
DEVKIT_COUNTS = {"CAM_FRONT": 3053, "CAM_FRONT_RIGHT": 3076, "CAM_FRONT_LEFT": 3696, "CAM_BACK": 4820,
                 "CAM_BACK_LEFT": 4089, "CAM_BACK_RIGHT": 3369}
# visible points per posed frame with a 0.10 m tolerance (the fixture's README verification table)
SCANNET_VISIBLE = {"00000": 2076, "00040": 4203, "00075": 2668, "00100": 4208, "00150": 4378, "00200": 2082,
                   "00225": 3678, "00275": 3630}


@pytest.fixture(scope="module")
def nusc_adapter(nuscenes_root):
    return build_adapter("nuscenes", nuscenes_root, split="all")


def test_nuscenes_counts_match_devkit(nusc_adapter):
    frame = nusc_adapter.load(0)
    sample = nusc_adapter.nusc.get("sample", nusc_adapter.nusc.get("sample_data", frame.token)["sample_token"])
    for im in frame.images:
        idx, uv, z = project_points(frame.xyz, im.points_to_camera, im.intrinsics, im.rgb.shape[:2], 1.0, border=1)
        devkit_points, devkit_depth, _ = nusc_adapter.nusc.explorer.map_pointcloud_to_image(
            frame.token, sample["data"][im.name])
        assert len(idx) == devkit_points.shape[1] == DEVKIT_COUNTS[im.name], im.name
        # same points at the same pixels: the devkit keeps the surviving columns in input order
        np.testing.assert_allclose(uv.T, devkit_points[:2], atol=0.05)  # the devkit computes in float32
        np.testing.assert_allclose(z, devkit_depth, atol=1e-3)


def test_nuscenes_replicated_keyframe(nuscenes_root, tmp_path, nusc_adapter):
    """The scale-rehearsal option: the keyframe three times under distinct tokens, the same data each time."""
    summary = run_labels("nuscenes", tmp_path, "correspond", data_root=nuscenes_root, split="all", shard_size=2,
                         dataset_options={"replicate": 3}, workers=0, progress=False)
    assert not summary.failed_frames and validate_store(summary.store).ok
    store = Store(summary.store)
    token = nusc_adapter.frames()[0].token
    assert list(store.array("frames/token")[:]) == [token, f"{token}~1", f"{token}~2"]
    assert store.attrs.dataset_config["replicate"] == 3 and "replicate" not in nusc_adapter.config()
    p, i, k = store.offsets("points"), store.offsets("images"), store.offsets("pairs")
    for name, off in (("points/xyz", p), ("images/rgb", i), ("pairs/point", k), ("pairs/uv", k)):
        arr = store.array(name)[:]
        for f in (1, 2):
            np.testing.assert_array_equal(arr[off[f]:off[f + 1]], arr[off[0]:off[1]], err_msg=name)
    np.testing.assert_array_equal(store.array("pairs/image")[k[2]:k[3]], store.array("pairs/image")[k[0]:k[1]] + 12)
    with pytest.raises(DatasetError, match="replicate=0 must be an integer >= 1"):
        build_adapter("nuscenes", nuscenes_root, split="all", replicate=0)


def test_nuscenes_store_pairs(nuscenes_root, tmp_path, nusc_adapter):
    summary = run_labels("nuscenes", tmp_path, "correspond", data_root=nuscenes_root, split="all", workers=0,
                         progress=False)
    assert not summary.failed_frames
    report = validate_store(summary.store)
    assert report.ok, report.errors
    store = Store(summary.store)
    assert store.array("images/rgb").shape == (6, 224, 416, 3)
    frame = nusc_adapter.load(0)
    pair_img = store.array("pairs/image")[:]
    uv = store.array("pairs/uv")[:].astype(np.float64)
    pts = store.array("pairs/point")[:]
    for i, im in enumerate(frame.images):
        idx, uv_native, _ = project_points(frame.xyz, im.points_to_camera, im.intrinsics, (900, 1600), 1.0)
        sel = pair_img == i
        np.testing.assert_array_equal(pts[sel], idx)
        # stored pixel = native coordinate scaled by 416/1600 (columns) and 224/900 (rows), floored
        expected_col = np.floor((uv_native[:, 0] + 0.5) * 416 / 1600)
        expected_row = np.floor((uv_native[:, 1] + 0.5) * 224 / 900)
        np.testing.assert_array_equal(uv[sel, 0], expected_col)
        np.testing.assert_array_equal(uv[sel, 1], expected_row)
    np.testing.assert_allclose(store.array("points/xyz")[:], frame.xyz)


@pytest.fixture(scope="module")
def scannet_frame(scannet_root):
    return build_adapter("scannet", scannet_root, split="all").load(0)


def test_scannet_visible_points_agree_with_depth(scannet_frame):
    frame = scannet_frame
    for im in frame.images:
        idx, uv, z = project_points(frame.xyz, im.points_to_camera, im.intrinsics, im.rgb.shape[:2], 0.1,
                                    depth=im.depth, depth_intrinsics=im.depth_intrinsics, tolerance=0.1)
        assert len(idx) == SCANNET_VISIBLE[im.name], im.name
        # every kept point agrees with the depth map at its depth pixel, within the tolerance
        cam = (im.points_to_camera @ np.c_[frame.xyz[idx], np.ones(len(idx))].T)[:3]
        duv = im.depth_intrinsics @ cam
        col, row = np.rint(duv[0] / duv[2]).astype(int), np.rint(duv[1] / duv[2]).astype(int)
        measured = im.depth[row, col]
        assert (measured > 0).all()
        assert np.abs(measured - z).max() <= 0.1
        assert np.median(np.abs(measured - z)) < 0.05


def test_scannet_wrong_pose_fails_occlusion_test(scannet_frame):
    frame = scannet_frame
    im0 = frame.images[0]
    true_n = len(project_points(frame.xyz, im0.points_to_camera, im0.intrinsics, im0.rgb.shape[:2], 0.1,
                                im0.depth, im0.depth_intrinsics, 0.1)[0])
    # another frame's pose with this frame's depth map
    other = frame.images[4]
    n_other = len(project_points(frame.xyz, other.points_to_camera, im0.intrinsics, im0.rgb.shape[:2], 0.1,
                                 im0.depth, im0.depth_intrinsics, 0.1)[0])
    # the true pose moved 0.3 m along the camera's x axis
    shifted = im0.points_to_camera.copy()
    shifted[0, 3] += 0.3
    n_shift = len(project_points(frame.xyz, shifted, im0.intrinsics, im0.rgb.shape[:2], 0.1,
                                 im0.depth, im0.depth_intrinsics, 0.1)[0])
    assert n_other < 0.2 * true_n
    assert n_shift < 0.6 * true_n


def test_scannet_store(scannet_root, tmp_path):
    summary = run_labels("scannet", tmp_path, ["correspond"], data_root=scannet_root, split="all", workers=0,
                         progress=False)
    assert not summary.failed_frames
    report = validate_store(summary.store)
    assert report.ok, report.errors
    store = Store(summary.store)
    assert store.array("images/rgb").shape == (8, 240, 320, 3)
    counts = np.bincount(store.array("pairs/image")[:], minlength=8)
    assert counts.tolist() == list(SCANNET_VISIBLE.values())
    gt = store.array("points/gt")[:]
    assert ((gt < 20) | (gt == 255)).all() and (gt < 20).mean() > 0.7  # 73.1 % map to ScanNet-20
