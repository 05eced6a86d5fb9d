"""``bench/perf.py`` (``make bench``) in its tiny mode: the JSON's machine block and every figure, each finite."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from .conftest import NUSCENES_ROOT, REPO, SCANNET_ROOT, SHARED_DATA

MACHINE = {"cpu_model", "cores", "cores_usable", "torch_threads_default", "gpu", "torch", "numpy", "python", "date",
           "loadavg_start", "loadavg_end"}
FIELDS = {"name", "value", "unit", "reference", "reference_value", "ratio", "ratio_def", "command", "notes", "part",
          "threads"}
CACHE_ARRAYS = ("images/rgb", "clip/label", "clip/confidence", "clip/feat", "sam/mask_id", "sam/feat",
                "clip/label_refined")
FIXTURE_ARRAYS = ("points/xyz", "points/feat", "images/intrinsics", "pairs/point", "pairs/image", "pairs/uv",
                  "pairs/depth")


def run_perf(tmp_path, parts: str) -> dict:
    out = tmp_path / "perf.json"
    env = {**os.environ, "CNS_SHARED_DATA": str(SHARED_DATA)}
    proc = subprocess.run([sys.executable, "bench/perf.py", "--tiny", "--parts", parts, "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def check(result: dict, names: list[str]) -> dict:
    assert MACHINE <= set(result["machine"]), MACHINE - set(result["machine"])
    m = result["machine"]
    assert m["cores"] == os.cpu_count()
    assert m["gpu"] is None or isinstance(m["gpu"], str)
    assert result["mode"] == "tiny"
    figures = {f["name"]: f for f in result["figures"]}
    assert len(figures) == len(result["figures"]), "a figure name appears twice"
    assert not set(names) - set(figures), f"missing figures {sorted(set(names) - set(figures))}"
    for f in result["figures"]:
        assert FIELDS <= set(f), (f["name"], FIELDS - set(f))
        assert f["command"].startswith("python bench/perf.py --parts ") and f["command"].endswith("--tiny")
        if f.get("skipped"):  # only the fixture-dependent figures may be skipped, with the reason
            assert f["value"] is None and "fixture not found" in f["skipped"], f
            continue
        for key in ("value", "reference_value", "ratio"):
            assert isinstance(f[key], (int, float)) and math.isfinite(f[key]) and f[key] >= 0, (f["name"], key, f[key])
        assert f["value"] > 0 and f["reference_value"] > 0, f
        want = f["reference_value"] / f["value"] if f["ratio_def"] == "reference/value" else \
            f["value"] / f["reference_value"]
        assert f["ratio"] == pytest.approx(want), f
        assert f["unit"] and f["reference"] and f["notes"], f
    return figures


def test_refine_part_writes_the_machine_and_its_figures(tmp_path):
    figures = check(run_perf(tmp_path, "refine"), ["refine.vote_ms", "rss.refine.peak_mib"])
    vote = figures["refine.vote_ms"]
    assert vote["threads"] == 1 and vote["target"] == "ratio >= 50" and isinstance(vote["target_met"], bool)
    assert vote["target_met"] == (vote["ratio"] >= 50)
    rss = figures["rss.refine.peak_mib"]
    assert rss["value"] >= rss["reference_value"] > 50  # the peak is at least the RSS after importing torch


def test_an_unknown_part_is_an_error(tmp_path):
    proc = subprocess.run([sys.executable, "bench/perf.py", "--tiny", "--parts", "refine,nope", "--out",
                           str(tmp_path / "p.json")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown part(s) nope" in proc.stderr
    assert not (tmp_path / "p.json").exists()


@pytest.mark.slow
def test_every_part_writes_every_figure(tmp_path):
    arrays = CACHE_ARRAYS + (FIXTURE_ARRAYS if (NUSCENES_ROOT / "v1.0-mini").exists() else ())
    names = (["refine.vote_ms", "stages.maskclip.images_per_s", "stages.sam.images_per_s",
              "stages.refine.images_per_s", "cache.bytes_per_image.total",
              "correspond.nuscenes_ms_per_sweep", "correspond.scannet_ms_per_scene",
              "correspond.synthetic_street_ms_per_sweep", "synthetic.street_frame_s", "synthetic.indoor_room_s",
              "train.steps_per_s", "train.data_wait_ms_per_step"]
             + [f"cache.bytes_per_image.{a}" for a in arrays]
             + [f"rss.{p}.peak_mib" for p in ("refine", "stages", "correspond", "synthetic", "train")])
    figures = check(run_perf(tmp_path, "refine,stages,correspond,synthetic,train"), names)
    for name, root in (("correspond.nuscenes_ms_per_sweep", NUSCENES_ROOT), ("correspond.scannet_ms_per_scene",
                                                                            SCANNET_ROOT)):
        assert bool(figures[name].get("skipped")) == (not root.exists()), figures[name]
    total = figures["cache.bytes_per_image.total"]
    assert total["value"] == pytest.approx(sum(f["value"] for n, f in figures.items()
                                               if n.startswith("cache.bytes_per_image.") and n != total["name"]))
    assert 0 < figures["train.data_wait_ms_per_step"]["ratio"] < 1
    assert 0 < figures["stages.sam.images_per_s"]["ratio"] <= 1  # the forwards are a part of the stage's time
