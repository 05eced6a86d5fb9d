"""The nuImages adapter (2D only) on a nuImages-format fixture built here: tables through the devkit, ground
truth from the masks, the label stages end to end into a store without points, and bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import main
from data_cache import schema
from data_cache.store import Store
from data_cache.validate import validate_store
from pipeline.datasets import DatasetError, build_adapter
from pipeline.datasets.classes import nuscenes16
from pipeline.runner import run_labels
from tests.nuimages_fixture import (CATEGORIES, CLASS_INDEX, NATIVE_HW, TRAIN_HW, VERSION, build_nuimages,
                                    encode_mask, expected_training_gt)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def nuimages_root(tmp_path_factory) -> Path:
    return build_nuimages(tmp_path_factory.mktemp("nuimages") / "nuimages")


@pytest.fixture()
def nuimages_copy(nuimages_root, tmp_path) -> Path:
    return Path(shutil.copytree(nuimages_root, tmp_path / "nuimages"))


def test_fixture_masks_round_trip_through_the_devkit():
    import base64

    from nuimages.utils.utils import mask_decode
    from pycocotools import mask as cocomask

    from pipeline.datasets.nuimages import rle_run_lengths
    m = np.zeros(NATIVE_HW, dtype=np.uint8)
    m[10:300, 5:77] = 1
    m[200:210, :] = 1
    np.testing.assert_array_equal(mask_decode(encode_mask(m)), m)
    # the run-length check agrees with pycocotools: the runs cover the mask, the odd runs are its area
    for mask in (m, np.ones((4, 4), np.uint8), np.zeros((3, 5), np.uint8), np.eye(300, dtype=np.uint8)):
        encoded = encode_mask(mask)
        runs = rle_run_lengths(base64.b64decode(encoded["counts"]))
        assert sum(runs) == mask.size and sum(runs[1::2]) == mask.sum()
        assert sum(runs[1::2]) == cocomask.area({**encoded, "counts": base64.b64decode(encoded["counts"])})


def test_adapter_frames_classes_and_mapping(nuimages_root):
    adapter = build_adapter("nuimages", nuimages_root, split="mini")
    assert adapter.version == VERSION and adapter.modalities == ("images",)
    assert tuple(adapter.class_names) == nuscenes16()
    assert adapter.capabilities == ["image_gt"] and adapter.image_gt_source == "nuimages_annotations"
    frames = adapter.frames()
    assert [f.token for f in frames] == ["sample-0", "sample-1", "sample-2"]
    assert [f.image_names for f in frames] == [["CAM_FRONT"], ["CAM_BACK_LEFT"], ["CAM_FRONT"]]
    assert all(f.num_points == 0 for f in frames)
    # the devkit's lidarseg mapping of the shared names (written out by hand in the fixture)
    for name, index in CLASS_INDEX.items():
        assert adapter.category_to_class[name] == index, name
    for ignored in ("vehicle.ego", "vehicle.emergency.police", "animal", "human.pedestrian.stroller"):
        assert adapter.category_to_class[ignored] == 255, ignored
    assert set(adapter.category_to_class) == set(CATEGORIES)
    # class names and prompts as for nuScenes
    from pipeline.models.prompts import class_texts
    assert class_texts(adapter.class_names, descriptive=True, dataset="nuimages") == \
        class_texts(nuscenes16(), descriptive=True, dataset="nuscenes")
    assert class_texts(adapter.class_names, descriptive=True, dataset="nuimages")[10] == ("road",)


def test_ground_truth_matches_the_devkits_segmentation(nuimages_root):
    """The adapter's map equals NuImages.get_segmentation (same masks, same drawing order) mapped to 16 classes,
    and the fixture's shapes upsampled."""
    from nuimages.utils.utils import name_to_index_mapping
    adapter = build_adapter("nuimages", nuimages_root, split="mini")
    nuim = adapter.nuim
    index_to_name = {v: k for k, v in name_to_index_mapping(nuim.category).items()}
    lut = np.full(32, 255, dtype=np.uint8)
    for idx, name in index_to_name.items():
        lut[idx] = adapter.category_to_class[name]
    for i in range(3):
        frame = adapter.load(i)
        (image,) = frame.images
        assert frame.xyz is None and image.points_to_camera is None
        assert image.rgb.shape == (*NATIVE_HW, 3) and image.intrinsics.shape == (3, 3)
        semantic, _ = nuim.get_segmentation(f"sd-{i}-key")
        np.testing.assert_array_equal(image.gt, lut[semantic])
        expected = np.kron(expected_training_gt(i), np.ones((2, 2), dtype=np.uint8))
        np.testing.assert_array_equal(image.gt, expected)
        assert len(np.unique(image.gt)) >= 5  # road, car, pedestrian, barrier and ignored pixels at least


def test_all_label_stages_through_make_write_a_store_without_points(nuimages_root, tmp_path):
    """make labels DATASET=nuimages ... --test-tiny-models: correspond (images only), maskclip, sam, refine."""
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["make", "-s", "labels", "DATASET=nuimages", f"DATA_ROOT={nuimages_root}", "SPLIT=mini",
                           f"CACHE={cache}", "WORKERS=0",
                           "LABELS_ARGS=--test-tiny-models --no-progress --sam-points-per-side 4"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    path = cache / "nuimages-mini.zarr"
    validated = CliRunner().invoke(main, ["cache", "validate", str(path)])
    assert validated.exit_code == 0 and "OK" in validated.output, validated.output
    status = CliRunner().invoke(main, ["cache", "status", str(path)])
    assert status.exit_code == 0 and status.output.count("complete") == 4, status.output
    store = Store(path)
    attrs = store.attrs
    assert attrs.modalities == ["images"] and attrs.image_gt_source == "nuimages_annotations"
    assert all(store.stage_complete(s) for s in schema.STAGE_ORDER)
    for sp in schema.ARRAYS:  # no array of the points modality, not even an empty one
        assert (sp.name in store) == (sp.modality is None), sp.name
    assert "P" not in store.dims() and "K" not in store.dims()
    assert not (path / "_parts").exists()
    gt = store.array("images/gt")[:]
    for i in range(3):
        np.testing.assert_array_equal(gt[i], expected_training_gt(i))
    for name in ("images/rgb", "clip/label", "sam/mask_id", "clip/label_refined"):
        assert store.array(name).shape[:3] == (3, *TRAIN_HW), name
    assert (store.array("clip/label_refined")[:] < 16).all()
    assert list(store.array("images/name")[:]) == ["CAM_FRONT", "CAM_BACK_LEFT", "CAM_FRONT"]
    # K scaled from the 832x448 image to 416x224
    k = store.array("images/intrinsics")[0]
    assert k[0, 0] == pytest.approx(1266.4 * 0.52 / 2, rel=1e-5)


def test_validate_refuses_points_arrays_in_an_images_only_store(nuimages_root, tmp_path):
    summary = run_labels("nuimages", tmp_path, "correspond", data_root=nuimages_root, split="mini", workers=0,
                         progress=False)
    assert validate_store(summary.store).ok
    store = Store(summary.store, mode="a")
    store.set_dims(P=4)
    store.create_array("points/offsets")
    report = validate_store(summary.store)
    assert not report.ok and any("points/offsets" in e and "modalities ['images']" in e for e in report.errors)


# -- bad input ------------------------------------------------------------------------------------------

def _labels(root, cache, *extra):
    return CliRunner().invoke(main, ["labels", "--dataset", "nuimages", "--data-root", str(root), "--split", "mini",
                                     "--cache", str(cache), "--stages", "correspond", "--workers", "0",
                                     "--shard-size", "1", "--no-progress", *extra])


def _assert_only_frame_failed(result, cache, index, *parts):
    assert result.exit_code == 1, result.output
    assert f"frame {index} (sample-{index})" in result.output
    for part in parts:
        assert part in result.output, part
    store = Store(cache / "nuimages-mini.zarr")
    done = [store.is_done("correspond", s) for s in range(3)]
    assert done == [s != index for s in range(3)]  # the other frames finished
    assert not store.stage_complete("correspond")


def test_root_without_tables(nuimages_copy, tmp_path):
    (nuimages_copy / VERSION / "object_ann.json").unlink()
    (nuimages_copy / VERSION / "surface_ann.json").unlink()
    with pytest.raises(DatasetError, match="lacks the table.*object_ann.json, surface_ann.json"):
        build_adapter("nuimages", nuimages_copy, split="mini")
    result = _labels(nuimages_copy, tmp_path / "c")
    assert result.exit_code != 0 and "lacks the table(s) object_ann.json, surface_ann.json" in result.output
    shutil.rmtree(nuimages_copy / VERSION)
    result = _labels(nuimages_copy, tmp_path / "c")
    assert result.exit_code != 0 and f"no {VERSION}/ folder" in result.output
    assert "Traceback" not in result.output


def test_image_listed_but_missing(nuimages_copy, tmp_path):
    records = json.loads((nuimages_copy / VERSION / "sample_data.json").read_text())
    image = nuimages_copy / next(r["filename"] for r in records if r["token"] == "sd-1-key")
    image.unlink()
    result = _labels(nuimages_copy, tmp_path / "c")
    _assert_only_frame_failed(result, tmp_path / "c", 1, "image file is missing", str(image))


def test_undecodable_mask(nuimages_copy, tmp_path):
    table = nuimages_copy / VERSION / "object_ann.json"
    records = json.loads(table.read_text())
    bad = next(r for r in records if r["token"] == "obj-2-b-ped")
    bad["mask"]["counts"] = "!!not base64!"
    table.write_text(json.dumps(records))
    result = _labels(nuimages_copy, tmp_path / "c")
    _assert_only_frame_failed(result, tmp_path / "c", 2, "mask of object_ann obj-2-b-ped cannot be decoded",
                              str(table))


def test_mask_with_wrong_run_lengths(nuimages_copy, tmp_path):
    table = nuimages_copy / VERSION / "surface_ann.json"
    records = json.loads(table.read_text())
    bad = next(r for r in records if r["token"] == "surf-0-road")
    bad["mask"]["counts"] = encode_mask(np.ones((4, 4), np.uint8))["counts"]  # runs of another size
    table.write_text(json.dumps(records))
    result = _labels(nuimages_copy, tmp_path / "c")
    _assert_only_frame_failed(result, tmp_path / "c", 0, "mask of surface_ann surf-0-road cannot be decoded",
                              f"its run lengths cover 16 pixels, not {NATIVE_HW[0]}x{NATIVE_HW[1]}")


# -- 2D-only training (--config nuimages) -------------------------------------------------------------
def test_2d_only_training_and_eval_on_a_nuimages_store(nuimages_root, tmp_path):
    """--config nuimages trains the 2D network alone: no 3D net, no 3D sources, no 3D loss (absent, not
    zero-filled); cns-cli eval prints the 2D table with the paper's nuImages numbers."""
    from train.commands import eval_cmd, train
    from train.config import load_config
    from train.engine import StoreMismatch, check_stores
    tiny = {"maskclip": {"tiny": True}, "sam": {"tiny": True, "points_per_side": 4}}
    summary = run_labels("nuimages", tmp_path / "cache", schema.STAGE_ORDER, data_root=nuimages_root, split="mini",
                         stage_options=tiny, workers=0, progress=False)
    store = str(summary.store)
    with pytest.raises(StoreMismatch, match="no points.*--config nuimages"):
        check_stores([store], load_config("nuscenes"))
    run = tmp_path / "run"
    args = ["--cache", store, "--config", "nuimages", "--out", str(run), "--device", "cpu", "--no-pretrained-2d",
            "model.net2d=deeplabv3_mobilenet_v3", "schedule.epochs=2", "schedule.warmup_epochs=1",
            "data.batch_size=2", "data.num_workers=0", "schedule.lr=0.01"]
    res = CliRunner().invoke(train, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["type"] == "train"]
    assert {r["stage"] for r in steps} == {1, 2} and all(np.isfinite(r["loss"]) for r in steps)
    for r in steps:  # only the 2D terms exist
        assert "ce2d" in r and "ce3d" not in r and "latent3d" not in r and r["latent2d"] > 0
        assert not any(k.startswith("share3d") for k in r)
        assert set(k for k in r if k.startswith("share2d_")) <= {"share2d_clip2d", "share2d_pred2d", "share2d_none"}
    assert any(r.get("share2d_pred2d", 0) > 0 for r in steps if r["stage"] == 2)
    weights = torch.load(run / "checkpoints" / "last.pth", map_location="cpu", weights_only=False)["model"]
    assert not any(k.startswith(("net3d.", "phi_s.", "phi_f.")) for k in weights)
    res = CliRunner().invoke(eval_cmd, ["--cache", store, "--run", str(run), "--device", "cpu"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    for text in ("CNS 2D net", "CLIP labels (MaskCLIP), 2D", "CNS (paper), nuImages 2D", "22.1",
                 "CLIP2Scene (paper), nuImages 2D", "18.6", "2D ground truth: images/gt (nuimages_annotations)"):
        assert text in res.output, text
    assert "3D" not in res.output.split("reported in the paper")[0]  # no 3D row at all
