"""A synthetic dataset written out as a folder goes through labels, train, eval and predict; predict on a
correspond-only store, through an adapter, on a LiDAR sweep without cameras, and with nuScenes sample tokens."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from data_cache.store import Store
from pipeline.datasets import build_adapter
from pipeline.datasets.folder_from import write_folder


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A synthetic street as a folder, its store (tiny CLIP/SAM), a run trained both stages (a step each) on it."""
    tmp = tmp_path_factory.mktemp("folder_e2e")
    root = write_folder(build_adapter("synthetic", None, "train", num_scenes=1), tmp / "streets", progress=False)
    runner = CliRunner()
    labels = runner.invoke(main, ["labels", "--dataset", "folder", "--data-root", str(root), "--split", "train",
                                  "--cache", str(tmp / "cache"), "--workers", "0", "--test-tiny-models",
                                  "--no-progress"])
    assert labels.exit_code == 0, labels.output
    store = tmp / "cache" / "folder-train.zarr"
    run = tmp / "run"
    train = runner.invoke(main, ["train", "--cache", str(store), "--config", "synthetic_street_cpu", "--out", str(run),
                                 "schedule.epochs=2", "schedule.warmup_epochs=1", "eval.interval=0",
                                 "eval.at_end=false", "eval.bn_recalibration_images=0"])
    assert train.exit_code == 0, train.output
    stages = {json.loads(line).get("stage") for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert {1, 2} <= stages, stages  # both training stages ran
    return {"root": root, "store": store, "run": run, "tmp": tmp, "runner": runner}


def test_folder_dataset_through_labels_train_eval(folder_run):
    store = Store(folder_run["store"])
    assert store.attrs.dataset == "folder" and store.attrs.dataset_config["like"] == "nuscenes"
    assert "point_gt" in store.attrs.capabilities and "image_gt" in store.attrs.capabilities
    evaluation = folder_run["runner"].invoke(main, ["eval", "--cache", str(folder_run["store"]), "--run",
                                                    str(folder_run["run"])])
    assert evaluation.exit_code == 0, evaluation.output
    assert "CNS 3D net" in evaluation.output and "CNS 2D net" in evaluation.output


def test_predict_on_a_correspond_only_store_labels_every_point(folder_run):
    from plyfile import PlyData
    tmp, runner = folder_run["tmp"], folder_run["runner"]
    only = runner.invoke(main, ["labels", "--dataset", "folder", "--data-root", str(folder_run["root"]), "--split",
                                "train", "--cache", str(tmp / "corr"), "--stages", "correspond", "--workers", "0",
                                "--no-progress"])
    assert only.exit_code == 0, only.output
    store_path = tmp / "corr" / "folder-train.zarr"
    store = Store(store_path)
    assert "clip/text_embed" not in store and "sam/mask_id" not in store
    out = tmp / "pred_store"
    res = runner.invoke(main, ["predict", "--run", str(folder_run["run"]), "--cache", str(store_path), "--out",
                               str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    index = json.loads((out / "predictions.json").read_text())
    assert index["class_names"] == list(store.attrs.class_names)
    assert index["teacher"]["dataset"] == "folder" and index["teacher"]["text_tower"]["tiny"] is True
    offsets = store.offsets("points")
    assert sum(e["points"] for e in index["frames"]) == int(offsets[-1])  # a label for every point of the store
    for f, entry in enumerate(index["frames"]):
        labels = np.load(out / entry["points_file"])
        assert labels.shape == (int(offsets[f + 1] - offsets[f]),)
        assert labels["class_id"].max() < len(index["class_names"])
        assert ((labels["confidence"] > 0) & (labels["confidence"] <= 1)).all()
        ply = PlyData.read(str(out / entry["ply"]))["vertex"]
        assert len(ply["x"]) == len(labels)
        np.testing.assert_array_equal(np.asarray(ply["class_id"]), labels["class_id"])
        np.testing.assert_allclose(np.asarray(ply["x"]), store.array("points/xyz")[offsets[f]:offsets[f + 1], 0])
        assert len(entry["images"]) == 6 and all((out / im["file"]).exists() for im in entry["images"])


def test_predict_through_the_adapter_and_on_a_sweep_without_cameras(folder_run):
    tmp, runner = folder_run["tmp"], folder_run["runner"]
    root = tmp / "lidar_only"
    shutil.copytree(folder_run["root"], root)
    for calib in (root / "frames").glob("*/calib.json"):
        calib.unlink()  # no cameras: the deployment case, the 3D network alone
    out = tmp / "pred_lidar"
    res = runner.invoke(main, ["predict", "--run", str(folder_run["run"]), "--dataset", "folder", "--data-root",
                               str(root), "--split", "train", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    index = json.loads((out / "predictions.json").read_text())
    ds = build_adapter("folder", root, "train")
    assert [e["points"] for e in index["frames"]] == [fi.num_points for fi in ds.frames()]
    assert all(e["images"] == [] for e in index["frames"])
    assert index["source"]["dataset"] == "folder"


def test_predict_open_vocabulary_and_user_errors(folder_run):
    tmp, runner = folder_run["tmp"], folder_run["runner"]
    out = tmp / "pred_ov"
    res = runner.invoke(main, ["predict", "--run", str(folder_run["run"]), "--cache", str(folder_run["store"]),
                               "--out", str(out), "--classes", "car,road,tree", "--no-progress"])
    assert res.exit_code == 0, res.output
    index = json.loads((out / "predictions.json").read_text())
    assert index["open_vocabulary"] and index["class_names"] == ["car", "road", "tree"]
    assert max(np.load(out / e["points_file"])["class_id"].max() for e in index["frames"]) < 3
    both = runner.invoke(main, ["predict", "--run", str(folder_run["run"]), "--cache", str(folder_run["store"]),
                                "--dataset", "folder", "--out", str(tmp / "x")])
    assert both.exit_code == 2 and "either as --cache" in both.output and "Traceback" not in both.output
    bad = runner.invoke(main, ["predict", "--run", str(folder_run["run"]), "--cache", str(folder_run["store"]),
                               "--frame", "nope", "--out", str(tmp / "x")])
    assert bad.exit_code == 2 and "--frame nope" in bad.output


def test_predict_and_inspect_take_nuscenes_sample_tokens(folder_run, nuscenes_root, tmp_path):
    """A street run reads nuScenes points (one channel: intensity); a sample token names its LIDAR_TOP frame."""
    from inspection.frames import StoreView
    adapter = build_adapter("nuscenes", nuscenes_root, "all")
    lidar_token = adapter.frames()[0].token
    sample_token = adapter.nusc.get("sample_data", lidar_token)["sample_token"]
    runner = folder_run["runner"]
    out = tmp_path / "pred"
    res = runner.invoke(main, ["predict", "--run", str(folder_run["run"]), "--dataset", "nuscenes", "--data-root",
                               str(nuscenes_root), "--split", "all", "--frame", sample_token, "--out", str(out),
                               "--no-progress"])
    assert res.exit_code == 0, res.output
    entry = json.loads((out / "predictions.json").read_text())["frames"][0]
    assert entry["token"] == lidar_token and entry["points"] == adapter.frames()[0].num_points
    assert len(entry["images"]) == 6
    labels = runner.invoke(main, ["labels", "--dataset", "nuscenes", "--data-root", str(nuscenes_root), "--split",
                                  "all", "--cache", str(tmp_path), "--stages", "correspond", "--workers", "0",
                                  "--no-progress"])
    assert labels.exit_code == 0, labels.output
    view = StoreView(tmp_path / "nuscenes-all.zarr")
    assert view.resolve_frame(sample_token) == view.resolve_frame(lidar_token) == 0
