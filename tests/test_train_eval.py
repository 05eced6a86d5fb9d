"""Evaluation pieces: the confusion matrix by hand, the 3D-labels-only 2D protocol, import hygiene."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_cache.store import Store
from tests.toy_store import build_toy_store
from train.config import load_config
from train.engine import check_stores
from train.evaluate import PAPER_REFERENCE, ConfusionMatrix, evaluate, format_tables

REPO = Path(__file__).resolve().parents[1]


def test_confusion_matrix_hand_case():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1, 255, 2, 0]), torch.tensor([0, 0, 1, 1, 2, 255]))
    # class 0: tp 1, fn 1 -> 1/2; class 1: tp 1, fp 1 (a 0 predicted as 1), fn 1 (no prediction) -> 1/3; class 2: 1
    assert cm.iou().tolist() == pytest.approx([0.5, 1 / 3, 1.0])
    s = cm.summary(["a", "b", "c"])
    assert s["miou"] == pytest.approx(100 * (0.5 + 1 / 3 + 1) / 3) and s["counted"] == 5
    empty = ConfusionMatrix(2)
    empty.update(torch.tensor([0]), torch.tensor([0]))
    assert np.isnan(empty.iou()[1]) and empty.summary(["a", "b"])["miou"] == 100.0  # absent classes skipped


def test_tables_print_only_the_reference_numbers_of_the_stores_dataset():
    row = {"miou": 40.0, "iou": {"road": 40.0}}
    result = {"rows": {"clip_2d": row}, "class_names": ["road"]}
    synthetic = format_tables(dict(result, dataset="synthetic"))
    assert "reported in the paper" not in synthetic and "(paper)" not in synthetic
    scannet = format_tables(dict(result, dataset="scannet"))
    assert "reported in the paper" in scannet
    assert [t for t, _ in PAPER_REFERENCE["scannet"] if t not in scannet] == []
    assert "nuImages" not in scannet and "nuScenes" not in scannet


def test_2d_scored_on_labelled_points_pixels_without_image_gt(tmp_path):
    path = build_toy_store(tmp_path / "lidar_only.zarr", num_frames=2, num_images=3, capabilities=("point_gt",))
    cfg = load_config("synthetic_street_cpu")
    check_stores([path], cfg)
    res = evaluate(None, [path], cfg, "cpu")
    st = Store(path)
    uv, img = st.array("pairs/uv")[:], st.array("pairs/image")[:]
    # every paired point is labelled in the toy; distinct pixels (several points may share one)
    pixels = {(int(i), int(u), int(v)) for i, (u, v) in zip(img, uv)}
    assert res["rows"]["clip_2d"]["counted"] == len(pixels)
    assert res["rows"]["clip_3d"]["counted"] == st.offsets("points")[-1]  # every point, paired or not
    assert res["rows"]["wo_cns_3d"]["miou"] > res["rows"]["clip_3d"]["miou"]


def test_training_never_imports_the_foundation_models():
    code = ("import sys, train.engine, train.commands, train.evaluate, train.models, train.data; "
            "bad = [m for m in ('open_clip', 'segment_anything') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_projected_3d_baselines_over_all_points_and_paired_points_only(tmp_path):
    path = build_toy_store(tmp_path / "toy.zarr", num_frames=2, num_images=3)
    cfg = load_config("synthetic_street_cpu", ["eval.images_per_frame=1"])  # one camera: many points unpaired
    check_stores([path], cfg)
    rows = evaluate(None, [path], cfg, "cpu")["rows"]
    st = Store(path)
    gt = np.asarray(st.array("points/gt")[:])
    assert rows["clip_3d"]["counted"] == int((gt != 255).sum())
    assert 0 < rows["clip_3d_paired"]["counted"] < rows["clip_3d"]["counted"]
    for key in ("clip", "wo_cns"):  # an unpaired point is a miss in one row and absent from the other
        assert rows[f"{key}_3d_paired"]["miou"] > rows[f"{key}_3d"]["miou"]


def test_table1_reference_rows_are_complete_and_match_the_docs():
    """eval prints every Table 1 row of the store's dataset (MaskCLIP, MaskCLIP+, OpenScene, CLIP2Scene, CNS)
    with the note that only MaskCLIP is reproduced; docs/training.md's table is the same data."""
    import re

    from train.evaluate import PAPER_TABLE1, REFERENCE_NOTE, format_tables
    assert PAPER_TABLE1["MaskCLIP"]["ScanNet 3D"] == 14.2 and PAPER_TABLE1["MaskCLIP"]["nuScenes 3D"] == 12.8
    assert PAPER_TABLE1["CLIP2Scene"]["ScanNet 2D"] == 23.7
    text = format_tables({"rows": {}, "class_names": [], "dataset": "scannet"})
    for method, row in PAPER_TABLE1.items():
        for col in ("ScanNet 2D", "ScanNet 3D"):
            assert re.search(rf"{re.escape(method)} \(paper\), {col}\s+{row[col]:.1f}", text), (method, col)
    assert "nuScenes" not in text and REFERENCE_NOTE in text
    synthetic = format_tables({"rows": {}, "class_names": [], "dataset": "synthetic"})
    assert "paper" not in synthetic and REFERENCE_NOTE not in synthetic  # no reference rows, no note about them
    docs = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    header = "| method | ScanNet 2D | ScanNet 3D | nuImages 2D | nuScenes 3D |"
    cols = header.strip("| ").split(" | ")[1:]
    body = docs.split(header)[1].split("\n\n")[0].strip().splitlines()[1:]
    table = {cells[0]: dict(zip(cols, map(float, cells[1:])))
             for cells in ([c.strip() for c in line.strip("|").split("|")] for line in body)}
    assert table == PAPER_TABLE1
