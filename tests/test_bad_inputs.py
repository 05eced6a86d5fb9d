"""Bad input: a clear error naming the frame and the file, nothing half-written marked done, other shards finish."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from data_cache.store import Store
from data_cache.validate import validate_store
from pipeline.datasets import DatasetError, build_adapter
from pipeline.runner import run_labels

GOOD, BAD = "scene0000_00", "scene0001_00"


@pytest.fixture()
def two_scenes(scannet_root, tmp_path):
    """A ScanNet root with the real scene twice (as two scenes), in a temporary folder."""
    root = tmp_path / "scannet"
    for scene in (GOOD, BAD):
        (root / "points").mkdir(parents=True, exist_ok=True)
        (root / "labels").mkdir(exist_ok=True)
        shutil.copy(scannet_root / "points" / "scene0000_00.bin", root / "points" / f"{scene}.bin")
        shutil.copy(scannet_root / "labels" / "scene0000_00_sem_label_all.npy",
                    root / "labels" / f"{scene}_sem_label_all.npy")
        shutil.copytree(scannet_root / "posed_images" / "scene0000_00", root / "posed_images" / scene)
    for p in root.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return root


def _run(root, cache):
    return run_labels("scannet", cache, "correspond", data_root=root, split="all", shard_size=1, workers=0,
                      progress=False)


def _assert_bad_scene_failed(summary, cache, message, file_part):
    failed = summary.failed_frames
    assert [f["token"] for f in failed] == [BAD]
    assert message in failed[0]["error"]
    assert file_part in failed[0]["error"] or file_part in (failed[0]["file"] or "")
    store = Store(summary.store)
    assert store.is_done("correspond", 0) and not store.is_done("correspond", 1)
    assert not store.stage_complete("correspond")
    assert (summary.store / "_failed" / "correspond" / "00001.json").exists()
    report = validate_store(summary.store)
    assert not report.ok  # nothing is complete, so nothing validates


def test_truncated_point_file(two_scenes, tmp_path):
    path = two_scenes / "points" / f"{BAD}.bin"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    summary = _run(two_scenes, tmp_path / "cache")
    _assert_bad_scene_failed(summary, tmp_path / "cache", "truncated", f"{BAD}.bin")


def test_nan_coordinates(two_scenes, tmp_path):
    path = two_scenes / "points" / f"{BAD}.bin"
    pts = np.fromfile(path, dtype="<f4").reshape(-1, 6)
    pts[123, 1] = np.nan
    pts.tofile(path)
    summary = _run(two_scenes, tmp_path / "cache")
    _assert_bad_scene_failed(summary, tmp_path / "cache", "NaN/inf", f"{BAD}.bin")
    assert "row 123" in summary.failed_frames[0]["error"]


def test_non_orthonormal_pose(two_scenes, tmp_path):
    pose_file = two_scenes / "posed_images" / BAD / "00075.txt"
    pose = np.loadtxt(pose_file)
    pose[:3, :3] *= 1.2
    np.savetxt(pose_file, pose)
    summary = _run(two_scenes, tmp_path / "cache")
    _assert_bad_scene_failed(summary, tmp_path / "cache", "non-orthonormal", "00075.txt")


def test_frame_without_visible_points(two_scenes, tmp_path):
    for pose_file in (two_scenes / "posed_images" / BAD).glob("*.txt"):
        if pose_file.name == "intrinsic.txt":
            continue
        pose = np.loadtxt(pose_file)
        pose[:3, 3] += 500.0  # the camera 500 m away: nothing within the depth map's reach agrees
        np.savetxt(pose_file, pose)
    summary = _run(two_scenes, tmp_path / "cache")
    _assert_bad_scene_failed(summary, tmp_path / "cache", "no point of the frame is visible", f"{BAD}.bin")


def test_missing_depth_then_resume(two_scenes, tmp_path):
    depth = two_scenes / "posed_images" / BAD / "00100.png"
    saved = depth.read_bytes()
    depth.unlink()
    summary = _run(two_scenes, tmp_path / "cache")
    _assert_bad_scene_failed(summary, tmp_path / "cache", "depth image is missing", "00100.png")
    done_before = (summary.store / "_done" / "correspond" / "00000.json").stat().st_mtime_ns
    depth.write_bytes(saved)
    summary = _run(two_scenes, tmp_path / "cache")
    assert not summary.failed_frames
    assert summary.reports["correspond"].shards_done == 1  # only the failed shard ran again
    assert (summary.store / "_done" / "correspond" / "00000.json").stat().st_mtime_ns == done_before
    assert validate_store(summary.store).ok
    store = Store(summary.store)
    off = store.offsets("pairs")
    pairs = store.array("pairs/point")[:]
    np.testing.assert_array_equal(pairs[off[0]:off[1]], pairs[off[1]:off[2]])  # the two copies agree


def test_truncated_image(two_scenes, tmp_path):
    image = two_scenes / "posed_images" / BAD / "00040.jpg"
    image.write_bytes(image.read_bytes()[:5000])
    summary = _run(two_scenes, tmp_path / "cache")
    _assert_bad_scene_failed(summary, tmp_path / "cache", "unreadable or truncated", "00040.jpg")


def test_cli_reports_failures_and_exits_nonzero(two_scenes, tmp_path):
    (two_scenes / "posed_images" / BAD / "00200.png").unlink()
    result = CliRunner().invoke(main, ["labels", "--dataset", "scannet", "--data-root", str(two_scenes),
                                       "--split", "all", "--cache", str(tmp_path / "c"), "--stages", "correspond",
                                       "--workers", "0", "--shard-size", "1", "--no-progress"])
    assert result.exit_code == 1
    assert f"frame 1 ({BAD})" in result.output and "00200.png" in result.output


def _nuscenes_copy(nuscenes_root, tmp_path):
    root = tmp_path / "nuscenes"
    shutil.copytree(nuscenes_root, root)
    for p in root.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return root


def test_nuscenes_non_unit_quaternion(nuscenes_root, tmp_path):
    root = _nuscenes_copy(nuscenes_root, tmp_path)
    table = root / "v1.0-mini" / "calibrated_sensor.json"
    records = json.loads(table.read_text())
    records[0]["rotation"] = [2 * q for q in records[0]["rotation"]]
    table.write_text(json.dumps(records))
    summary = run_labels("nuscenes", tmp_path / "c", "correspond", data_root=root, split="all", workers=0,
                         progress=False)
    (failure,) = summary.failed_frames
    assert "non-orthonormal" in failure["error"] and "calibrated_sensor.json" in failure["error"]
    assert failure["token"] == "9d9bf11fb0e144c8b446d54a8a00184f"


def test_nuscenes_missing_files(nuscenes_root, tmp_path):
    root = _nuscenes_copy(nuscenes_root, tmp_path)
    next((root / "samples" / "CAM_BACK").glob("*.jpg")).unlink()
    summary = run_labels("nuscenes", tmp_path / "c", "correspond", data_root=root, split="all", workers=0,
                         progress=False)
    (failure,) = summary.failed_frames
    assert "image file is missing" in failure["error"] and "CAM_BACK" in failure["error"]
    next((root / "samples" / "LIDAR_TOP").glob("*.bin")).unlink()
    summary = run_labels("nuscenes", tmp_path / "c2", "correspond", data_root=root, split="all", workers=0,
                         progress=False)
    (failure,) = summary.failed_frames
    assert "point file is missing" in failure["error"] and "LIDAR_TOP" in failure["error"]


def test_point_file_size_is_checked_in_bytes(tmp_path):
    from pipeline.datasets.base import read_float_records
    path = tmp_path / "sweep.pcd.bin"
    np.arange(250, dtype="<f4").tofile(path)  # 1000 bytes: 50 whole 20-byte points
    assert read_float_records(path, 5, "tok").shape == (50, 5)
    path.write_bytes(path.read_bytes() + b"\0")  # 1001 bytes: still 250 whole floats, but not 50 points
    with pytest.raises(DatasetError, match=r"1001 bytes is not a whole number of 20-byte points "
                                           r"\[frame tok; file .*sweep\.pcd\.bin\]"):
        read_float_records(path, 5, "tok")


def test_nuscenes_lidar_cut_inside_a_float(nuscenes_root, tmp_path):
    root = _nuscenes_copy(nuscenes_root, tmp_path)
    lidar = next((root / "samples" / "LIDAR_TOP").glob("*.bin"))
    lidar.write_bytes(lidar.read_bytes()[:1001])  # read as float32 this used to be 50 points, and succeed
    summary = run_labels("nuscenes", tmp_path / "c", "correspond", data_root=root, split="all", workers=0,
                         progress=False)
    (failure,) = summary.failed_frames
    assert "1001 bytes is not a whole number of 20-byte points" in failure["error"]
    assert failure["token"] == "9d9bf11fb0e144c8b446d54a8a00184f" and failure["file"] == str(lidar)
    assert not Store(summary.store).stage_complete("correspond")


def test_unknown_dataset_and_not_a_dataset(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'kitti'.*nuscenes"):
        build_adapter("kitti", tmp_path)
    with pytest.raises(DatasetError, match="not a nuScenes dataroot"):
        build_adapter("nuscenes", tmp_path)
    with pytest.raises(DatasetError, match="not a ScanNet export"):
        build_adapter("scannet", tmp_path)
    result = CliRunner().invoke(main, ["labels", "--dataset", "kitti", "--cache", str(tmp_path / "c"),
                                       "--stages", "correspond", "--workers", "0"])
    assert result.exit_code != 0 and "unknown dataset 'kitti'" in result.output


def test_unknown_dataset_option_is_refused_naming_the_known_ones(tmp_path):
    """A misspelt --dataset-option is an error, not an option recorded in the store that does nothing."""
    with pytest.raises(DatasetError, match=r"unknown nuscenes dataset option\(s\) replicat \(known: replicate, version\)"):
        build_adapter("nuscenes", tmp_path, replicat=2)
    with pytest.raises(DatasetError, match=r"unknown scannet dataset option\(s\) image_sorce \(known: image_source, "
                                           r"label_filt_ids, occlusion_tolerance\)"):
        build_adapter("scannet", tmp_path, image_sorce="frames_25k")
    with pytest.raises(DatasetError, match=r"unknown nuimages dataset option\(s\) versoin \(known: version\)"):
        build_adapter("nuimages", tmp_path, versoin="v1.0-mini")
    result = CliRunner().invoke(main, ["labels", "--dataset", "nuscenes", "--data-root", str(tmp_path),
                                       "--cache", str(tmp_path / "c"), "--stages", "correspond", "--workers", "0",
                                       "--dataset-option", "replicat=2"])
    assert result.exit_code != 0 and "unknown nuscenes dataset option(s) replicat" in result.output
