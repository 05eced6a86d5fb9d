"""bench/gpu_check.py: ``make gpu-check DRY=1`` runs the whole check on CPU at tiny sizes (so it cannot rot), the
deterministic weights are reproducible, and the carry list of ``make gpu-check PREPARE=1`` stays under 64 MiB."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402


def test_make_gpu_check_dry_runs_every_part_on_cpu(tmp_path):
    out = tmp_path / "gpu_dry.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # VENV: the interpreter running the tests (the Makefile's $(BIN)/python)
    proc = subprocess.run(["make", "--no-print-directory", "gpu-check", "DRY=1", f"GPU_OUT={out}",
                           f"VENV={Path(sys.executable).parents[1]}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["mode"] == "dry" and res["complete"] and res["passed"]
    assert res["environment"]["device"] == "cpu" and res["environment"]["torch"] == torch.__version__
    c = res["correctness"]
    assert c["net3d"]["backend"] == "spconv" and c["net3d"]["rel_l2"] < gpu_check.TOL_3D and c["net3d"]["voxels"] > 100
    assert c["sam"]["id_map_pixels_equal"] == 1.0 and c["maskclip"]["labels_equal"] == 1.0  # CPU vs CPU: identical
    s = res["speed"]
    for ds in ("nuscenes", "scannet"):
        assert s[f"train_{ds}"]["steps"] >= 1 and 0 < s[f"train_{ds}"]["steps_per_s"]
        assert 0 <= s[f"train_{ds}"]["data_wait_share"] < 1
    assert s["train_scannet"]["images_per_frame"] == gpu_check.SIZES["dry"]["train"]["scannet"]["images"]
    assert set(s["sam"]) == {"bf16_off", "bf16_on"} and all(r["s_per_image"] > 0 for r in s["sam"].values())
    assert all(0 <= r["outside_forwards_share"] < 1 for r in s["sam"].values())
    assert all(r["images_per_s"] > 0 for r in s["maskclip"].values())
    p = res["projection"]
    sam_s, clip_s = s["sam"]["bf16_on"]["s_per_image"], 1 / s["maskclip"]["bf16_off"]["images_per_s"]
    assert p["label_gpu_hours_nuscenes"] == pytest.approx(205_000 * (sam_s + clip_s) / 3600, rel=1e-2)
    frames_s = s["train_nuscenes"]["steps_per_s"] * s["train_nuscenes"]["batch_size"]
    assert p["train_20_epochs_hours_nuscenes"] == pytest.approx(20 * 28_130 / frames_s / 3600, rel=1e-2)
    assert not (REPO / "bench" / "results" / "gpu.json").exists() or "dry" not in \
        json.loads((REPO / "bench" / "results" / "gpu.json").read_text())["mode"]  # DRY never writes the real file


def test_deterministic_weights_do_not_depend_on_the_rng():
    def net():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(4, 2))
    torch.manual_seed(0)
    a = gpu_check.fill_deterministic(net())
    torch.manual_seed(1)
    b = gpu_check.fill_deterministic(net())
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    w = a[0].weight
    assert 0.5 < w.std().item() * (27 / 1.5) ** 0.5 < 1.5  # variance about 1.5 / fan_in
    assert torch.equal(a[1].running_var, torch.ones(8)) and a[1].weight.mean().item() == pytest.approx(1, abs=0.1)


def test_carry_report_sums_the_tree_and_the_carried_folders(tmp_path, monkeypatch):
    ref, whl = tmp_path / "ref", tmp_path / "whl"
    for folder, n in ((ref, 3000), (whl, 5000)):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "a.bin").write_bytes(b"x" * n)
    monkeypatch.setattr(gpu_check, "REPO", tmp_path)
    monkeypatch.setattr(gpu_check, "tree_bytes", lambda repo=None: 1000)
    rep = gpu_check.carry_report(ref, whl)
    assert rep["carry"] == ["whl", "ref"] and rep["total_bytes"] == 9000 and rep["fits"]
    (whl / "big.bin").write_bytes(b"\0" * (64 * 2 ** 20))
    assert not gpu_check.carry_report(ref, whl)["fits"]


def test_tree_bytes_counts_what_git_sends():
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    expected = sum((REPO / f).stat().st_size for f in listed if (REPO / f).is_file())
    assert gpu_check.tree_bytes() == expected and 0 < expected < 16 * 2 ** 20


@pytest.mark.slow
def test_prepared_carry_list_fits_in_64_mib():
    """``make gpu-check PREPARE=1`` (PyPI + minutes of CPU) must have run: its carry list is under 64 MiB."""
    if not (gpu_check.REF_DIR / "meta.json").exists() or not any(gpu_check.WHEEL_DIR.glob("*.whl")):
        pytest.skip("run `make gpu-check PREPARE=1` first")
    rep = gpu_check.carry_report(gpu_check.REF_DIR, gpu_check.WHEEL_DIR)
    assert rep["fits"] and rep["total_bytes"] < 64 * 2 ** 20
    names = {p.name.split("-")[0].lower() for p in gpu_check.WHEEL_DIR.glob("*.whl")}
    assert {"zarr", "numcodecs", "open_clip_torch", "segment_anything", "spconv_triton"} <= names
    assert not names & {"numpy", "torch", "spconv_cu118"}  # the GPU machine's own numpy 2 and torch
