"""The store writer, the schema declarations and the runner's resume/refusal rules."""
from __future__ import annotations

import multiprocessing as mp
import os
import re
from pathlib import Path

import numpy as np
import pytest

from data_cache import schema
from data_cache.schema import RootAttrs
from data_cache.store import CacheError, Store
from pipeline.runner import run_labels

REPO = Path(__file__).resolve().parents[1]


def test_schema_doc_lists_every_array():
    doc = (REPO / "data_cache" / "SCHEMA.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+/[a-z_]+)`", doc, flags=re.M))
    assert documented == set(schema.ARRAYS_BY_NAME), documented ^ set(schema.ARRAYS_BY_NAME)
    assert schema.markdown_table() in doc, "SCHEMA.md is stale: regenerate its table with python -m data_cache.schema"


@pytest.mark.parametrize("name", ["sam/feat", "clip/feat"])
def test_validation_names_non_finite_features(tmp_path, name):
    from data_cache.validate import validate_store

    from .toy_store import build_toy_store
    path = build_toy_store(tmp_path / "toy.zarr", num_frames=2, num_images=2)
    assert validate_store(path).ok
    arr = Store(path, mode="a").array(name)
    row = arr[3]
    row[0, 0, 0] = np.nan
    arr[3] = row
    report = validate_store(path)
    assert report.errors == [f"frame 1 (toy0-001): {name} has NaN/inf values"]


def test_resolve_shards_hold_whole_chunks():
    sp = schema.spec("points/xyz")
    res = sp.resolve({"P": 3_000_000})
    assert res["chunks"] == (schema.POINT_CHUNK, 3) and res["shards"][0] % res["chunks"][0] == 0
    small = sp.resolve({"P": 1000})
    assert small["shards"] is None and small["chunks"] == (1000, 3)


def _make_store(path, rows):
    attrs = RootAttrs(dataset="synthetic", split="train", class_names=["a", "b"], image_size=[8, 8],
                      point_features=["intensity"], capabilities=[], num_frames=1)
    store = Store.create(path, attrs)
    store.set_dims(P=rows)
    store.create_array("points/gt")
    return store


def _writer(path, starts, length, value):
    store = Store(path, mode="a")
    for s in starts:
        store.write_rows("points/gt", s, np.full(length, value, np.uint8))


def test_concurrent_writers_sharing_a_zarr_shard_lose_nothing(tmp_path):
    rows = 2 * schema.POINT_SHARD
    store = _make_store(tmp_path / "s.zarr", rows)
    assert store.array("points/gt").shards[0] == schema.POINT_SHARD
    # four processes write interleaved 1000-row ranges, all inside the first zarr shard, plus ranges that
    # straddle the shard boundary: every write to a shared shard must survive
    length = 1000
    ctx = mp.get_context("spawn")
    procs = []
    for w in range(4):
        starts = [w * length + k * 4 * length for k in range(12)]
        starts.append(schema.POINT_SHARD - 2 * length + w * length // 2 if w < 2 else schema.POINT_SHARD + w * length)
        procs.append(ctx.Process(target=_writer, args=(str(store.path), starts, length // 2 if w < 2 else length,
                                                       w + 1)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    data = Store(store.path).array("points/gt")[:]
    for w in range(4):
        for k in range(12):
            s = w * length + k * 4 * length
            n = length // 2 if w < 2 else length
            assert (data[s:s + n] == w + 1).all(), (w, k)


def test_write_rows_bounds(tmp_path):
    store = _make_store(tmp_path / "s.zarr", 100)
    with pytest.raises(CacheError, match="outside the array's 100 rows"):
        store.write_rows("points/gt", 95, np.zeros(10, np.uint8))
    with pytest.raises(CacheError, match="no array 'clip/label'.*maskclip"):
        store.array("clip/label")


def test_mapped_part_equals_the_part_read_whole(tmp_path):
    store = _make_store(tmp_path / "s.zarr", 10)
    rng = np.random.default_rng(0)
    arrays = {"counts": np.array([3, 0, 5], np.int64), "pairs__uv": rng.integers(0, 900, (8, 2)).astype(np.uint16),
              "pairs__depth": rng.random(8).astype(np.float16), "empty": np.zeros((0, 2), np.int32),
              "fortran": np.asfortranarray(rng.random((4, 3)))}
    store.write_part("correspond", 7, **arrays)
    mapped = store.map_part("correspond", 7, *arrays)
    for key, value in arrays.items():
        assert mapped[key].dtype == value.dtype and mapped[key].shape == value.shape, key
        np.testing.assert_array_equal(mapped[key], value, err_msg=key)
        np.testing.assert_array_equal(mapped[key][2:5], store.read_part("correspond", 7, key)[key][2:5], err_msg=key)
    with pytest.raises(CacheError, match=r"00007\.npz has no array 'pairs__point'"):
        store.map_part("correspond", 7, "pairs__point")
    np.savez_compressed(store.part_path("correspond", 8), counts=arrays["counts"])
    with pytest.raises(CacheError, match=r"00008\.npz: 'counts' is compressed"):
        store.map_part("correspond", 8, "counts")


_FAULTS = """
import resource, sys
import numpy as np
from pipeline.runner import keep_heap_slack
if sys.argv[1] == "slack":
    assert keep_heap_slack()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    np.ones(1 << 17)  # 1 MiB (numpy asks for huge pages from 4 MiB), allocated and freed
    np.ones(3 << 20)  # 24 MiB
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="glibc's mallopt: Linux only")
def test_heap_slack_spares_page_faults_under_the_nanny_trim_threshold():
    """dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536: without the slack every buffer above 128 KiB
    is a fresh mmap whose pages are faulted in again (huge pages from 4 MiB: 512 faults per 24 MiB); with it, the
    buffers are reused from the heap."""
    import subprocess
    import sys
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    faults = {arm: int(subprocess.run([sys.executable, "-c", _FAULTS, arm], env=env, capture_output=True, text=True,
                                      check=True).stdout) for arm in ("plain", "slack")}
    # the plain count depends on how many huge pages the kernel hands out (27 000 to 78 100 measured here)
    assert faults["plain"] > 10 * faults["slack"], faults
    assert faults["slack"] < 2000, faults


def test_rerun_skips_done_and_refuses_changed_configuration(scannet_root, tmp_path):
    first = run_labels("scannet", tmp_path, "correspond", data_root=scannet_root, split="all", workers=0,
                       progress=False)
    assert first.reports["correspond"].shards_done == 1
    marker = first.store / "_done" / "correspond" / "00000.json"
    stamp = marker.stat().st_mtime_ns
    again = run_labels("scannet", tmp_path, "correspond", data_root=scannet_root, split="all", workers=0,
                       progress=False)
    assert again.reports["correspond"].shards_done == 0 and marker.stat().st_mtime_ns == stamp
    with pytest.raises(CacheError, match=r"dataset_config.*occlusion_tolerance.*0\.1.*0\.25"):
        run_labels("scannet", tmp_path, "correspond", data_root=scannet_root, split="all", workers=0,
                   dataset_options={"occlusion_tolerance": 0.25}, progress=False)
    redo = run_labels("scannet", tmp_path, "correspond", data_root=scannet_root, split="all", workers=0,
                      overwrite=True, progress=False)
    assert redo.reports["correspond"].shards_done == 1


def test_stage_without_prerequisite_is_refused(scannet_root, tmp_path):
    with pytest.raises(RuntimeError, match="needs 'maskclip'.*--stages correspond,maskclip,sam,refine.*"
                                           "STAGES=correspond,maskclip,sam,refine"):
        run_labels("scannet", tmp_path, "refine", data_root=scannet_root, split="all", workers=0, progress=False)
