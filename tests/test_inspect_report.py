"""`cns-cli inspect report`: a self-contained page with every section, a run's evaluation, curves and
predictions; checked in Debian's headless chromium (skipped with the reason when it is absent)."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import main
from inspection.palettes import palette_for
from inspection.run import curves
from tests import browser
from tests.toy_store import TOY_CLASSES, build_toy_store

needs_chromium = pytest.mark.skipif(browser.chromium() is None,
                                    reason="chromium not installed (`apt-get install -y chromium`; .ci/run does)")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A toy store and a two-epoch run on it (evaluated after training and by `cns-cli eval`)."""
    root = tmp_path_factory.mktemp("report")
    store = build_toy_store(root / "toy.zarr", num_frames=3, num_images=3)
    run = root / "run"
    runner = CliRunner()
    res = runner.invoke(main, ["train", "--cache", str(store), "--config", "synthetic_street_cpu", "--out", str(run),
                               "--seed", "0", "--device", "cpu", "schedule.epochs=2", "schedule.warmup_epochs=1",
                               "data.batch_size=2"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["eval", "--cache", str(store), "--run", str(run), "--device", "cpu"],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return store, run


@pytest.fixture(scope="module")
def report(toy_run, tmp_path_factory):
    store, run = toy_run
    out = tmp_path_factory.mktemp("html")
    res = CliRunner().invoke(main, ["inspect", "report", str(store), "--out", str(out), "--run", str(run),
                                    "--frames", "2"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out / "report.html"


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.tags = [], {}

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self.refs += [(tag, k, v) for k, v in attrs if k in ("src", "href") and v]


def test_report_is_self_contained_with_every_section(report, toy_run):
    text = report.read_text()
    p = _Refs()
    p.feed(text)
    outside = [r for r in p.refs if not r[2].startswith(("data:", "#"))]
    assert not outside, outside[:5]  # every picture inlined, no script or style from elsewhere
    assert p.tags.get("img", 0) > 20 and p.tags.get("link", 0) == 0
    for heading in ("Stages", "Point-pixel pairs", "SAM masks", "class histogram", "Pseudo-labels against ground truth",
                    "Evaluation (", "Training curves", "Predictions against ground truth", "Gallery (2 frames)",
                    "3D view: "):
        assert heading in text, heading
    # the 3D views: plotly's library once, one plot per gallery frame, switchable colourings
    assert text.count("Plotly.newPlot(") == 2 and text.count('"bdata"') > 0
    for colouring in ("ground truth", "SAM-refined CLIP labels (transferred)", "3D prediction"):
        assert f'"label":"{colouring}"' in text, colouring
    # the run's evaluation table holds the numbers of eval/metrics.json
    metrics = json.loads((toy_run[1] / "eval" / "metrics.json").read_text())
    row = metrics["rows"]["cns_3d"]
    cells = re.search(r"<td>CNS 3D net</td><td>([0-9.]+)</td>", text)
    assert cells and cells.group(1) == f"{row['miou']:.1f}"


def test_curves_plot_whatever_share_keys_exist():
    records = [{"type": "train", "step": s, "stage": 1 if s < 3 else 2, "loss": 2.0 / s, "lr": 0.1,
                "share2d_clip2d": 1.0 if s < 3 else 0.5, "share3d_pred3d": 0.0 if s < 3 else 0.25} for s in (1, 2, 3, 4)]
    records += [{"type": "eval", "step": 4, "miou_cns_3d": 12.5, "miou_headline_3d": 12.5}, {"broken": True}]
    c = curves(records)
    assert set(c["shares"]) == {"share2d_clip2d", "share3d_pred3d"}
    np.testing.assert_array_equal(c["shares"]["share3d_pred3d"][1], [0, 0, 0.25, 0.25])
    assert set(c["miou"]) == {"miou_cns_3d"} and c["stage_changes"] == [3]
    assert set(c["losses"]) == {"loss"}


def test_report_of_a_store_with_only_correspond(tmp_path):
    store = build_toy_store(tmp_path / "toy.zarr", num_frames=2, num_images=2, stages=("correspond",))
    res = CliRunner().invoke(main, ["inspect", "report", str(store), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "out" / "report.html").read_text()
    assert "no maskclip output for this frame yet" in text and "Gallery (2 frames)" in text
    assert "Pseudo-labels against ground truth" not in text


@needs_chromium
def test_browser_harness_sees_errors(tmp_path):
    """The checks below can fail: a console error, an exception and a script from the network are reported."""
    page = tmp_path / "bad.html"
    page.write_text("<html><body><script>console.error('boom')</script><script>missing()</script>"
                    "<script src='https://cdn.example.org/lib.js'></script></body></html>")
    dev = browser.DevTools(tmp_path / "profile")
    try:
        dev.load(page.as_uri(), settle=1.0)
        problems = dev.problems()
    finally:
        dev.close()
    assert any("boom" in p for p in problems) and any("missing is not defined" in p for p in problems)
    assert any("cdn.example.org" in p for p in problems), problems


@needs_chromium
def test_report_in_headless_chromium(report, tmp_path):
    dev = browser.DevTools(tmp_path / "profile")
    try:
        dev.load(report.as_uri(), settle=4.0)
        problems = dev.problems()
        plots = dev.evaluate("document.querySelectorAll('.js-plotly-plot .gl-container').length")
        broken = dev.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length")
        images = dev.evaluate("document.images.length")
        tables = dev.evaluate("document.querySelectorAll('table').length")
    finally:
        dev.close()
    assert problems == []
    assert plots == 2  # both 3D views drawn by plotly (WebGL)
    assert images > 20 and broken == 0 and tables >= 6
    png = tmp_path / "shot.png"
    res = browser.screenshot(report.as_uri(), png, tmp_path / "profile2")
    assert png.exists(), res.stderr[-2000:]
    shot = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    colours = {tuple(c) for c in np.unique(shot[::7], axis=0)}
    assert (240, 240, 240) in colours  # table headers
    pal = palette_for(TOY_CLASSES)
    for i in range(len(TOY_CLASSES)):  # the label maps of the gallery, in their class colours
        assert int((shot == pal.colour(i)).all(1).sum()) > 500, TOY_CLASSES[i]
    assert (shot != 255).any(1).mean() > 0.1  # not a blank page (18 % measured)


def test_frame_with_run_draws_the_networks_predictions(toy_run, tmp_path):
    """The 2D prediction picture is `cns-cli eval --export`'s prediction of the same image in the palette's
    colours; the 3D prediction colours the projected points and a bird's-eye view."""
    store, run = toy_run
    export = tmp_path / "export"
    res = CliRunner().invoke(main, ["eval", "--cache", str(store), "--run", str(run), "--device", "cpu",
                                    "--no-post-refine", "--export", str(export), "--out", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "frame"
    res = CliRunner().invoke(main, ["inspect", "frame", str(store), "1", "--image", "2", "--run", str(run),
                                    "--out", str(out), "--scale", "1"])
    assert res.exit_code == 0, res.output
    exported = np.asarray(Image.open(export / "images" / "toy0-001_000005_CAM_2.png"))
    pal = palette_for(TOY_CLASSES)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "02_CAM_2_pred2d.png").convert("RGB")),
                                  pal.colourize(exported))
    pred3d = np.fromfile(export / "points" / "toy0-001_lidarseg.bin", np.uint8)
    from data_cache.store import Store
    st = Store(store)
    k0, k1 = st.offsets("pairs")[1:3]
    sel = st.array("pairs/image")[k0:k1] == 5
    uv, pts = st.array("pairs/uv")[k0:k1][sel].astype(int), st.array("pairs/point")[k0:k1][sel]
    dist = np.abs(uv[:, None] - uv[None]).max(-1) + np.eye(len(uv), dtype=int) * 99
    alone = dist.min(1) >= 2  # points whose grown marker nothing else covers
    pic = np.asarray(Image.open(out / "02_CAM_2_points_pred3d.png").convert("RGB"))
    assert alone.sum() > 5
    for (u, v), p in zip(uv[alone], pts[alone]):
        assert tuple(pic[v, u]) == pal.colour(pred3d[p])
    for name in ("bev_pred3d.png", "confusion.png"):
        assert (out / name).exists()


def test_run_of_other_classes_is_refused(toy_run, tmp_path):
    other = build_toy_store(tmp_path / "other.zarr", num_frames=1, num_images=1, class_names=("road", "car", "tree"))
    out = tmp_path / "out"
    for cmd in (["frame", str(other), "0"], ["report", str(other)]):
        res = CliRunner().invoke(main, ["inspect", *cmd, "--run", str(toy_run[1]), "--out", str(out)])
        assert res.exit_code == 2 and "the run's networks cannot read this store" in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1 and not out.exists()
