"""Shared test fixtures: real sensor data in ../shared/data (skipped with a reason when absent), tmp stores."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CNS_SHARED_DATA", REPO.parent / "shared" / "data"))
NUSCENES_ROOT = SHARED_DATA / "nuscenes_sample"
SCANNET_ROOT = SHARED_DATA / "scannet_sample"


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


REAL_DATA_FIXTURES = ("nuscenes_root", "scannet_root")


def pytest_collection_modifyitems(config, items):
    """Tests on the real samples get the ``real_data`` marker; ``slow`` ones are skipped without --run-slow."""
    for item in items:
        if any(f in getattr(item, "fixturenames", ()) for f in REAL_DATA_FIXTURES):
            item.add_marker(pytest.mark.real_data)
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def nuscenes_root() -> Path:
    if not (NUSCENES_ROOT / "v1.0-mini" / "sample.json").exists():
        pytest.skip(f"real nuScenes fixture not found at {NUSCENES_ROOT} (set CNS_SHARED_DATA)")
    return NUSCENES_ROOT


@pytest.fixture(scope="session")
def scannet_root() -> Path:
    if not (SCANNET_ROOT / "points" / "scene0000_00.bin").exists():
        pytest.skip(f"real ScanNet fixture not found at {SCANNET_ROOT} (set CNS_SHARED_DATA)")
    return SCANNET_ROOT
