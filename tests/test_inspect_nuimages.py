"""`cns-cli inspect` on a store without points (nuImages, ``modalities: ["images"]``: no ``points/*``, no
``pairs/*``): the summary's 2D rows equal `cns-cli eval`'s, the frame's 2D pictures are drawn in the class
colours at the fixture's ground-truth pixels, and the report (with a 2D-only run) has no 3D part."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import main
from data_cache import schema
from data_cache.store import Store
from inspection.palettes import palette_for
from inspection.render import BOUNDARY
from pipeline.runner import run_labels
from tests import browser
from tests.nuimages_fixture import CLASS_INDEX, build_nuimages, expected_training_gt

# pixels (row, column) of sample 0 at the training resolution and their class in the fixture's shapes
KNOWN = {(100, 70): "vehicle.car", (140, 190): "human.pedestrian.adult", (210, 10): "flat.driveable_surface",
         (160, 20): "movable_object.barrier"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inspect_nuim")
    root = build_nuimages(tmp / "nuim")
    summary = run_labels("nuimages", tmp / "cache", schema.STAGE_ORDER, data_root=root, split="mini",
                         stage_options={"maskclip": {"tiny": True}, "sam": {"tiny": True, "points_per_side": 4}},
                         workers=0, progress=False)
    return summary.store


@pytest.fixture(scope="module")
def run_2d(store, tmp_path_factory):
    """A 2D-only run (--config nuimages) and `cns-cli eval --export` of it (eval/metrics.json, PNG labels)."""
    tmp = tmp_path_factory.mktemp("run_nuim")
    run, export = tmp / "run", tmp / "export"
    res = CliRunner().invoke(main, ["train", "--cache", str(store), "--config", "nuimages", "--out", str(run),
                                    "--device", "cpu", "--no-pretrained-2d", "model.net2d=deeplabv3_mobilenet_v3",
                                    "schedule.epochs=2", "schedule.warmup_epochs=1", "data.batch_size=2",
                                    "data.num_workers=0", "eval.interval=0", "eval.at_end=false"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["eval", "--cache", str(store), "--run", str(run), "--device", "cpu",
                                    "--no-post-refine", "--export", str(export)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return run, export


def test_summary_has_the_2d_rows_of_eval_and_says_there_are_no_points(store):
    from train.config import load_config
    from train.engine import check_stores
    from train.evaluate import evaluate
    res = CliRunner().invoke(main, ["inspect", "summary", str(store), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    assert s["modalities"] == ["images"] and s["points"] is None and s["pairs"] is None
    assert (s["frames"], s["images"]) == (3, 3)
    assert all(r["complete"] and r["frames_done"] == 3 for r in s["stages"])
    # SAM statistics, class histograms and the refinement share, recomputed from the arrays
    st = Store(store)
    ids = st.array("sam/mask_id")[:]
    assert s["sam"]["masks"] == sum(len(np.unique(im[im >= 0])) for im in ids) > 0
    raw, ref = st.array("clip/label")[:], st.array("clip/label_refined")[:]
    L = len(s["class_names"])
    for name, arr in (("clip/label", raw), ("clip/label_refined", ref)):
        h = s["labels"][name]
        assert [h["histogram"][n] for n in s["class_names"]] == np.bincount(arr.ravel(), minlength=L)[:L].tolist()
    assert s["refinement"]["share_changed"] == pytest.approx((raw != ref).mean())
    # the 2D rows against images/gt are eval's label-only rows; there is no 3D row
    cfg = load_config("nuimages", {})
    check_stores([str(store)], cfg, for_training=False)
    rows = evaluate(None, [str(store)], cfg, "cpu")["rows"]
    mine = s["ground_truth"]["rows"]
    assert set(mine) == set(rows) == {"clip_2d", "wo_cns_2d"}
    for key in rows:
        assert mine[key]["miou"] == pytest.approx(rows[key]["miou"], abs=1e-9), key
        assert mine[key]["iou"] == rows[key]["iou"], key
    assert s["ground_truth"]["image_gt"] == "images/gt" and not s["ground_truth"]["point_gt"]
    text = CliRunner().invoke(main, ["inspect", "summary", str(store)])
    assert text.exit_code == 0, text.output
    assert "3 frames, 3 images, no points (a 2D-only store: no point clouds, no pairs, no 3D rows)" in text.output
    assert "2D: images/gt; no 3D rows: no points" in text.output and "point-pixel pairs" not in text.output
    assert re.search(r"w/o CNS \(SAM-refined CLIP\), 2D +" + f"{rows['wo_cns_2d']['miou']:.1f}", text.output)
    assert ", 3D" not in text.output


def test_frame_draws_the_2d_pictures_only(store, tmp_path):
    out = tmp_path / "frame"
    res = CliRunner().invoke(main, ["inspect", "frame", str(store), "sample-0", "--out", str(out), "--scale", "2"])
    assert res.exit_code == 0, res.output
    assert "the store has no points (a 2D-only store): no projected points, no bird's-eye view" in res.output
    files = {p.name for p in out.iterdir()}
    assert files == {f"00_CAM_FRONT_{k}.png" for k in ("rgb", "gt", "clip_label", "clip_label_refined", "sam_masks",
                                                        "sheet")} | {"legend.png", "confusion.png", "frame.json"}
    pal = palette_for(Store(store).attrs.class_names)
    assert pal.colour(CLASS_INDEX["vehicle.car"]) == (255, 158, 0)  # the devkit's lidarseg car colour
    gt_pic = np.asarray(Image.open(out / "00_CAM_FRONT_gt.png").convert("RGB"))
    gt = expected_training_gt(0)
    for (v, u), category in KNOWN.items():
        assert gt[v, u] == CLASS_INDEX[category]
        for dv, du in ((0, 0), (1, 1)):  # the training pixel's 2x2 block
            assert tuple(gt_pic[2 * v + dv, 2 * u + du]) == pal.colour(CLASS_INDEX[category]), category
    st = Store(store)
    for key, name in (("clip_label", "clip/label"), ("clip_label_refined", "clip/label_refined")):
        pic = np.asarray(Image.open(out / f"00_CAM_FRONT_{key}.png").convert("RGB"))
        lab = np.repeat(np.repeat(st.array(name)[0], 2, 0), 2, 1)
        np.testing.assert_array_equal(pic, pal.colourize(lab))
    # SAM boundaries: white where a mask meets another one (or none) on its right
    ids = st.array("sam/mask_id")[0].astype(np.int64)
    sam = np.asarray(Image.open(out / "00_CAM_FRONT_sam_masks.png").convert("RGB"))
    vv, uu = np.nonzero((ids[:, :-1] != ids[:, 1:]) & ((ids[:, :-1] >= 0) | (ids[:, 1:] >= 0)))
    assert len(vv) > 10
    assert all(tuple(sam[2 * v, 2 * u + 1]) == BOUNDARY for v, u in zip(vv, uu))
    index = json.loads((out / "frame.json").read_text())
    assert set(index["images"]["CAM_FRONT"]) == {"rgb", "gt", "clip_label", "clip_label_refined", "sam_masks",
                                                 "sheet"}


def test_report_and_frame_with_a_2d_only_run(store, run_2d, tmp_path):
    """The run's 2D prediction is eval --export's; the report has the 2D rows only, no 3D view, no plotly."""
    run, export = run_2d
    out = tmp_path / "frame"
    res = CliRunner().invoke(main, ["inspect", "frame", str(store), "1", "--run", str(run), "--out", str(out),
                                    "--scale", "1"])
    assert res.exit_code == 0, res.output
    pal = palette_for(Store(store).attrs.class_names)
    exported = np.asarray(Image.open(export / "images" / "sample-1_000001_CAM_BACK_LEFT.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "00_CAM_BACK_LEFT_pred2d.png").convert("RGB")),
                                  pal.colourize(exported))
    assert not [p.name for p in out.iterdir() if "points" in p.name or "bev" in p.name or "pred3d" in p.name]
    html_dir = tmp_path / "html"
    res = CliRunner().invoke(main, ["inspect", "report", str(store), "--run", str(run), "--out", str(html_dir)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    text = (html_dir / "report.html").read_text()
    for part in ("This store has no points", "SAM masks", "class histogram", "Pseudo-labels against ground truth",
                 "Evaluation (", "Training curves", "Predictions against ground truth", "Gallery (3 frames)",
                 "2D prediction", "3 / 3 / no points (2D only)"):
        assert part in text, part
    for absent in ("Point-pixel pairs", "3D view: ", "Plotly.newPlot(", "bird's-eye view:", "points: ", ", 3D<"):
        assert absent not in text, absent
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert not [k for k in metrics["rows"] if "3d" in k]
    cells = re.search(r"<td>CNS 2D net</td><td>([0-9.]+)</td>", text)
    assert cells and cells.group(1) == f"{metrics['rows']['cns_2d']['miou']:.1f}"
    if browser.chromium() is None:
        pytest.skip("chromium not installed (`apt-get install -y chromium`; .ci/run does): the page was not opened")
    dev = browser.DevTools(tmp_path / "profile")
    try:
        dev.load((html_dir / "report.html").as_uri(), settle=2.0)
        problems = dev.problems()
        broken = dev.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length")
        images = dev.evaluate("document.images.length")
    finally:
        dev.close()
    assert problems == [] and broken == 0 and images > 20
