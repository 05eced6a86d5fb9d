"""The built wheel works outside the checkout: its configurations are package data (importlib.resources).

The wheel is built from a copy of the sources (so the checkout gets no build/ or egg-info), installed with
``pip install --no-deps --target`` into a temporary folder, and used from another directory with only that
folder on ``PYTHONPATH`` (the venv supplies the dependencies). The first subprocess asserts that every
project module comes from the target folder, not from the checkout, and loads every shipped configuration;
the second runs a two-epoch ``cns-cli train`` through the wheel's console script.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.toy_store import build_toy_store

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "cli.py", "pipeline", "train", "data_cache", "inspection")

CHECK = """
import sys
from pathlib import Path
target = Path(sys.argv[1]).resolve()
import cli, data_cache, inspection, pipeline, train
from pipeline.simulate import config as simulate_config
from train import config as train_config
for module in (cli, data_cache, inspection, pipeline, train, simulate_config, train_config):
    assert target in Path(module.__file__).resolve().parents, f"{module.__name__} from {module.__file__}"
assert target in train_config.CONFIG_DIR.resolve().parents, train_config.CONFIG_DIR
names = train_config.available_configs()
for name in names:  # folder.yaml takes its base from the store's dataset.json "like": load it with each
    for like in train_config.FOLDER_LIKE if name == "folder" else (None,):
        train_config.load_config(name, like=like)
simulated = simulate_config.available_configs()
for name in simulated:
    simulate_config.load_config(name)
print("train:", ",".join(names))
print("simulate:", ",".join(simulated))
"""


def _shipped(folder: str) -> str:
    return ",".join(sorted(p.stem for p in (REPO / folder).glob("*.yaml")))


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources and installed with --target; returns the target folder."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "stores", "*.zarr"))
        else:
            shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(src)],
                   check=True, capture_output=True, cwd=root)
    wheel, = (root / "dist").glob("cns_label_free-*.whl")
    target = root / "target"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, cwd=root)
    return target


def _env(target: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return dict(env, PYTHONPATH=str(target), OMP_NUM_THREADS="1")


def test_wheel_ships_every_configuration(installed, tmp_path):
    res = subprocess.run([sys.executable, "-c", CHECK, str(installed)], cwd=tmp_path, env=_env(installed),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"train: {_shipped('train/configs')}\n" in res.stdout
    assert f"simulate: {_shipped('pipeline/simulate/configs')}\n" in res.stdout
    assert "synthetic_street_cpu" in res.stdout and "default" in res.stdout


def test_wheel_trains_from_another_directory(installed, tmp_path):
    store = build_toy_store(tmp_path / "toy.zarr", num_frames=4, num_images=2)
    work = tmp_path / "elsewhere"
    work.mkdir()
    cmd = [str(installed / "bin" / "cns-cli"), "train", "--cache", str(store), "--config", "synthetic_street_cpu",
           "--out", "run", "--device", "cpu", "schedule.epochs=2", "schedule.warmup_epochs=1", "eval.interval=0"]
    res = subprocess.run(cmd, cwd=work, env=_env(installed), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (work / "run" / "checkpoints" / "last.pth").is_file()
    assert "mIoU" in res.stdout
