"""`cns-cli inspect summary`: statistics checked against independent computations and `cns-cli eval`'s
baselines; partial stores (only done shards are read, pairs of a running `correspond` from its parts)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from data_cache import schema
from data_cache.store import Store
from inspection import InspectError
from inspection.frames import StoreView
from inspection.summary import summarize
from tests.toy_store import build_toy_store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return build_toy_store(tmp_path_factory.mktemp("inspect") / "toy.zarr", num_frames=4, num_images=3)


@pytest.fixture(scope="module")
def toy_summary(toy):
    return summarize(StoreView(toy))


def test_counts_pairs_sam_histograms(toy, toy_summary):
    s, st = toy_summary, Store(toy)
    L = len(s["class_names"])
    assert (s["frames"], s["images"], s["points"]) == (4, 12, st.array("points/xyz").shape[0])
    assert all(r["complete"] and r["frames_done"] == 4 for r in s["stages"])
    # pairs: recomputed from the arrays with frame-global point indices
    p_off, k_off = st.offsets("points"), st.offsets("pairs")
    point = st.array("pairs/point")[:].astype(np.int64) + np.repeat(p_off[:-1], np.diff(k_off))
    per_point = np.bincount(point, minlength=s["points"])
    assert s["pairs"]["pairs"] == len(point)
    assert s["pairs"]["points_with_pixel"] == int((per_point > 0).sum())
    assert s["pairs"]["pixels_per_point"] == pytest.approx(per_point.mean())
    assert s["pairs"]["pixels_per_point_histogram"] == np.bincount(per_point).tolist()
    # SAM: masks per image and covered pixels
    ids = st.array("sam/mask_id")[:]
    masks = [len(np.unique(im[im >= 0])) for im in ids]
    assert s["sam"]["masks"] == sum(masks) == sum(s["sam"]["mask_area_histogram"]["counts"])
    assert s["sam"]["masks_per_image"]["max"] == max(masks)
    assert s["sam"]["pixel_coverage"]["mean"] == pytest.approx(np.mean([(im >= 0).mean() for im in ids]))
    # class histograms and the share refinement changed
    raw, ref = st.array("clip/label")[:], st.array("clip/label_refined")[:]
    for name, arr in (("clip/label", raw), ("clip/label_refined", ref)):
        h = s["labels"][name]
        assert [h["histogram"][n] for n in s["class_names"]] == np.bincount(arr.ravel(), minlength=L)[:L].tolist()
        assert h["pixels"] == arr.size
    assert s["refinement"]["share_changed"] == pytest.approx((raw != ref).mean())
    assert 0 < s["refinement"]["share_changed"] < 1


def test_pseudo_label_miou_equals_eval_baselines(toy, toy_summary):
    """The same rows as `cns-cli eval` without a run: same confusion matrix, same transfer to the points."""
    from train.config import load_config
    from train.engine import check_stores
    from train.evaluate import evaluate
    cfg = load_config("synthetic_street_cpu", {})
    check_stores([str(toy)], cfg)
    rows = evaluate(None, [str(toy)], cfg, "cpu")["rows"]
    mine = toy_summary["ground_truth"]["rows"]
    assert set(mine) == set(rows) == {"clip_2d", "clip_3d", "wo_cns_2d", "wo_cns_3d", "clip_3d_paired",
                                      "wo_cns_3d_paired"}
    for key in rows:
        assert mine[key]["miou"] == pytest.approx(rows[key]["miou"], abs=1e-9), key
        assert mine[key]["iou"] == rows[key]["iou"], key
    assert mine["wo_cns_2d"]["miou"] > mine["clip_2d"]["miou"]  # the toy's SAM masks are the true objects


def test_only_done_shards_are_read(tmp_path):
    """A stage that finished one of two shards: its statistics cover that shard's frames only, and what the
    other shard's rows hold (here: rubbish, as a crashed writer may leave) is never read."""
    path = build_toy_store(tmp_path / "toy.zarr", num_frames=4, num_images=3)
    st = Store(path, mode="a")
    st.update_attrs(shards=[[0, 2], [2, 4]])
    (path / "_done" / "refine" / "_complete.json").unlink()
    st.mark_done("refine", 0, {"frames": 2})
    refined = st.array("clip/label_refined")
    first = refined[:6]
    refined[6:] = np.full((6,) + refined.shape[1:], 250, np.uint8)  # rubbish in frames 2-3 (not done)
    s = summarize(StoreView(path))
    rows = {r["stage"]: r for r in s["stages"]}
    assert rows["refine"]["done"] == 1 and rows["refine"]["total"] == 2 and not rows["refine"]["complete"]
    assert rows["refine"]["frames_done"] == 2 and rows["maskclip"]["frames_done"] == 4
    h = s["labels"]["clip/label_refined"]
    assert h["images"] == 6 and h["unlabelled"] == 0
    L = len(s["class_names"])
    assert [h["histogram"][n] for n in s["class_names"]] == np.bincount(first.ravel(), minlength=L)[:L].tolist()
    assert s["ground_truth"]["rows"]["wo_cns_2d"]["frames"] == 2
    assert s["ground_truth"]["rows"]["clip_2d"]["frames"] == 4


def test_running_correspond_reads_pairs_from_done_parts(tmp_path):
    """Before `correspond` has finished every shard, pairs/* do not exist yet: the done shards' pairs are
    read from their part files (the stage's own format), the other shards count as not ingested."""
    path = build_toy_store(tmp_path / "toy.zarr", num_frames=4, num_images=3, stages=())
    st = Store(path, mode="a")
    st.update_attrs(shards=[[0, 2], [2, 4]])
    k_off = st.offsets("pairs")
    part = {f"pairs__{n}": st.array(f"pairs/{n}")[k_off[0]:k_off[2]] for n in ("point", "image", "uv", "depth")}
    st.write_part("correspond", 0, counts=np.diff(k_off[:3]), **part)
    st.mark_done("correspond", 0, {"frames": 2})
    view = StoreView(path)
    s = summarize(view)
    assert s["pairs"]["frames"] == 2 and s["pairs"]["pairs"] == int(k_off[2])
    f1 = view.frame(1).pairs
    np.testing.assert_array_equal(f1["point"], st.array("pairs/point")[k_off[1]:k_off[2]])
    np.testing.assert_array_equal(f1["image"], st.array("pairs/image")[k_off[1]:k_off[2]] - 3)
    assert view.frame(2).pairs is None
    assert s["labels"]["clip/label"]["images"] == 0 and not s["ground_truth"]["rows"]


def test_schema_version_and_not_a_store(tmp_path):
    newer = build_toy_store(tmp_path / "new.zarr", num_frames=1, num_images=1,
                            schema_version=schema.SCHEMA_VERSION + 1)
    with pytest.raises(InspectError, match="schema version 2 .newer"):
        StoreView(newer)
    (tmp_path / "plain").mkdir()
    with pytest.raises(InspectError, match="is not a CNS store"):
        StoreView(tmp_path / "plain")
    with pytest.raises(InspectError, match="does not exist"):
        StoreView(tmp_path / "missing.zarr")


def test_cli_text_and_json(toy):
    runner = CliRunner()
    text = runner.invoke(main, ["inspect", "summary", str(toy)])
    assert text.exit_code == 0, text.output
    for expected in ("4 frames, 12 images", "correspond", "refinement changed", "CLIP labels (MaskCLIP), 2D",
                     "w/o CNS (refined, projected), 3D, all points",
                     "w/o CNS (refined, projected), 3D, paired points only", "masks per image"):
        assert expected in text.output, expected
    js = runner.invoke(main, ["inspect", "summary", str(toy), "--json", "--max-frames", "2"])
    assert js.exit_code == 0, js.output
    data = json.loads(js.output)
    assert data["frames_sampled"] == 2 and data["pairs"]["frames"] == 2


def _labels_cmd(cache, stages):
    return [sys.executable, "-m", "cli", "labels", "--dataset", "synthetic", "--cache", str(cache), "--stages", stages,
            "--workers", "0", "--shard-size", "1", "--no-progress", "--test-tiny-models",
            "--dataset-option", "num_scenes=3"]


@pytest.mark.slow
def test_store_of_a_killed_labelling_job(tmp_path):
    """`correspond` ran and consolidated the store; a second job (maskclip, sam, refine) is killed after its
    first done marker: only the done shard's labels are read."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run(_labels_cmd(tmp_path, "correspond"), cwd=REPO, env=env, check=True, capture_output=True)
    store = tmp_path / "synthetic-train.zarr"
    marker = store / "_done" / "maskclip" / "00000.json"
    proc = subprocess.Popen(_labels_cmd(tmp_path, "maskclip,sam,refine"), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while proc.poll() is None and not marker.exists() and time.time() - t0 < 300:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert marker.exists() and not Store(store).stage_complete("maskclip")
    s = summarize(StoreView(store))
    rows = {r["stage"]: r for r in s["stages"]}
    assert rows["correspond"]["complete"] and 1 <= rows["maskclip"]["frames_done"] < s["frames"]
    assert s["labels"]["clip/label"]["images"] == 6 * rows["maskclip"]["frames_done"]
    assert s["labels"]["clip/label"]["unlabelled"] == 0
