"""The label runner end to end on synthetic scenes with tiny models: every stage, dask, kill and resume."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_cache import schema
from data_cache.store import Store
from data_cache.validate import validate_store
from pipeline.runner import run_labels

REPO = Path(__file__).resolve().parents[1]
STAGES = "correspond,maskclip,sam,refine"
DATASET_OPTIONS = {"num_scenes": 3, "seed": 7}
TINY = {"maskclip": {"tiny": True}, "sam": {"tiny": True}}


def _run(cache, workers=0):
    return run_labels("synthetic", cache, STAGES, dataset_options=DATASET_OPTIONS, stage_options=TINY,
                      shard_size=1, workers=workers, threads_per_worker=1, progress=False)


def _arrays(path) -> dict:
    store = Store(path)
    return {a.name: store.array(a.name)[...] for a in schema.ARRAYS if a.name in store}


def _assert_same_arrays(a, b):
    """Every array equal; floating-point arrays to within one unit in the last place. torch's float reductions
    depend on the number of threads (a dask worker runs with OMP_NUM_THREADS=1, this process with the default),
    so a float16 ``clip/feat`` of a run on a cluster may differ from one in this process in its last bit
    (measured: 19-62 of its values by 1 ulp with torch 2.14); labels, ids, pairs and offsets must be equal."""
    assert a.keys() == b.keys()
    for name in a:
        if np.issubdtype(a[name].dtype, np.floating):
            assert a[name].shape == b[name].shape, name
            np.testing.assert_array_max_ulp(a[name], b[name], maxulp=1)
        else:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def sequential_store(tmp_path_factory):
    summary = _run(tmp_path_factory.mktemp("seq"))
    assert not summary.failed_frames
    return summary.store


def test_all_stages_write_a_valid_store(sequential_store):
    report = validate_store(sequential_store)
    assert report.ok, report.errors
    store = Store(sequential_store)
    for stage in schema.STAGE_ORDER:
        assert store.stage_complete(stage)
    for name in ("clip/label", "clip/label_refined", "sam/mask_id", "sam/feat", "clip/text_embed", "clip/feat",
                 "clip/proj", "clip/proj_mean"):
        assert name in store
    assert store.array("clip/feat").shape == (store.array("images/rgb").shape[0], 32, 224 // 16, 416 // 16)
    prompt_names = store.raw_attrs["stages"]["maskclip"]["config"]["prompt_names"]
    assert prompt_names[store.attrs.class_names.index("driveable_surface")] == ["driveable surface"]


def test_two_worker_cluster_equals_sequential(sequential_store, tmp_path):
    summary = _run(tmp_path, workers=2)
    assert not summary.failed_frames
    _assert_same_arrays(_arrays(sequential_store), _arrays(summary.store))


def test_threaded_worker_equals_sequential(sequential_store, tmp_path):
    # two tasks of one worker process used to import torchvision at once and deadlock on its module locks
    summary = run_labels("synthetic", tmp_path, STAGES, dataset_options=DATASET_OPTIONS, stage_options=TINY,
                         shard_size=1, workers=1, threads_per_worker=2, progress=False)
    assert not summary.failed_frames, summary.failed_frames[0]["error"]
    _assert_same_arrays(_arrays(sequential_store), _arrays(summary.store))


def _cli(cache) -> list[str]:
    return [sys.executable, "-m", "cli", "labels", "--dataset", "synthetic", "--cache", str(cache),
            "--stages", STAGES, "--workers", "0", "--shard-size", "1", "--no-progress", "--test-tiny-models",
            "--dataset-option", f"num_scenes={DATASET_OPTIONS['num_scenes']}",
            "--dataset-option", f"seed={DATASET_OPTIONS['seed']}"]


def _kill_when(cmd, marker: Path, timeout=240) -> bool:
    """Start ``cmd``; SIGKILL it as soon as ``marker`` exists. Returns whether it was killed mid-run."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        if marker.exists():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    proc.wait(timeout=timeout)
    return False


def test_kill_and_resume_equals_uninterrupted(sequential_store, tmp_path):
    store = tmp_path / "synthetic-train.zarr"
    kill_points = [store / "_done" / "plan" / "_complete.json",          # right after planning
                   store / "_done" / "correspond" / "00001.json",        # mid correspond
                   store / "_done" / "correspond" / "_complete.json",    # after the pairs commit
                   store / "_done" / "sam" / "00000.json"]               # mid model stages
    killed = [_kill_when(_cli(tmp_path), marker) for marker in kill_points]
    assert any(killed), "no run was interrupted: the test proves nothing"
    done = subprocess.run(_cli(tmp_path), cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert validate_store(store).ok
    assert not (store / "_parts").exists()
    _assert_same_arrays(_arrays(sequential_store), _arrays(store))


def _correspond(cache):
    return run_labels("synthetic", cache, "correspond", dataset_options={"num_scenes": 2, "seed": 3}, shard_size=1,
                      workers=0, progress=False)


class Crash(RuntimeError):
    pass


def _crash_in_finalize_after_the_pairs(monkeypatch):
    from pipeline.stages.correspond import CorrespondStage
    original = CorrespondStage.finalize

    def finalize(self, store, *args):
        original(self, store, *args)
        raise Crash("after pairs/* were written, before the done marker")
    monkeypatch.setattr(CorrespondStage, "finalize", finalize)


def _crash_after_the_marker(monkeypatch):
    original = Store.mark_done

    def mark_done(self, stage, shard, stats):
        original(self, stage, shard, stats)
        if (stage, shard) == ("correspond", "_complete"):
            raise Crash("after the done marker, before the parts are removed")
    monkeypatch.setattr(Store, "mark_done", mark_done)


def _crash_while_removing(monkeypatch):
    def remove_parts(self, stage):
        next((self.path / "_parts" / stage).glob("*.npz")).unlink()
        raise Crash("one part removed, the others not")
    monkeypatch.setattr(Store, "remove_parts", remove_parts)


@pytest.fixture(scope="module")
def correspond_reference(tmp_path_factory):
    summary = _correspond(tmp_path_factory.mktemp("ref"))
    assert not summary.failed_frames
    return summary.store


def test_parts_are_removed_after_the_pairs_commit(correspond_reference):
    assert Store(correspond_reference).stage_complete("correspond")
    assert not (correspond_reference / "_parts").exists()
    assert Store(correspond_reference).array("pairs/point").shape[0] > 0


@pytest.mark.parametrize("crash", [_crash_in_finalize_after_the_pairs, _crash_after_the_marker,
                                   _crash_while_removing])
def test_crash_between_commit_and_part_removal_resumes(correspond_reference, tmp_path, crash):
    with pytest.MonkeyPatch.context() as mp:
        crash(mp)
        with pytest.raises(Crash):
            _correspond(tmp_path)
    store_dir = tmp_path / "synthetic-train.zarr"
    assert list((store_dir / "_parts" / "correspond").glob("*.npz")), "the crash left no parts: it proves nothing"
    summary = _correspond(tmp_path)
    assert not summary.failed_frames and validate_store(store_dir).ok
    assert not (store_dir / "_parts").exists()
    _assert_same_arrays(_arrays(correspond_reference), _arrays(store_dir))


SMALL_CHUNK, SMALL_SHARD = 512, 2048
PAIR_NAMES = ("pairs/point", "pairs/image", "pairs/uv", "pairs/depth")


def _small_pair_shards(setitem) -> None:
    """Pairs arrays of 2048-row zarr shards (instead of 2^20): several commit tasks on a small store.
    ``setitem(name, spec)`` replaces a schema entry (``monkeypatch.setitem`` on ``schema.ARRAYS_BY_NAME``)."""
    import dataclasses
    for name in PAIR_NAMES:
        sp = schema.ARRAYS_BY_NAME[name]
        setitem(name, dataclasses.replace(sp, chunks=(SMALL_CHUNK,) + sp.chunks[1:],
                                          shards=(SMALL_SHARD,) + sp.shards[1:]))


def _small_pair_shards_here(monkeypatch) -> None:
    _small_pair_shards(lambda name, sp: monkeypatch.setitem(schema.ARRAYS_BY_NAME, name, sp))


def test_parallel_pairs_commit_equals_reference(correspond_reference, tmp_path, monkeypatch):
    """Pairs arrays with small zarr shards: parts straddling their boundaries, the zarr shards cut into contiguous
    runs, two per task slot; in this process and as tasks of a two-worker dask cluster, the arrays equal the
    reference's."""
    import threading

    from distributed import LocalCluster

    from pipeline.stages import correspond
    _small_pair_shards_here(monkeypatch)
    original = correspond.commit_pairs_blocks
    log = tmp_path / "calls"
    log.mkdir()

    def counted(job):  # dask pickles the task: calls are recorded in files
        (log / f"{job[1]}-{job[2]}-{threading.current_thread().name}").touch()
        return original(job)

    def calls():
        out = [(int(p.name.split("-", 2)[0]), int(p.name.split("-", 2)[1]), p.name.split("-", 2)[2])
               for p in log.iterdir()]
        for p in log.iterdir():
            p.unlink()
        return out

    def assert_runs_tile_the_rows(done, tasks):
        runs = sorted((a, b) for a, b, _ in done)
        assert len(runs) == tasks, runs
        assert runs[0][0] == 0 and runs[-1][1] == total, runs
        assert all(b == next_a for (_, b), (next_a, _) in zip(runs, runs[1:])), runs
        assert all(a % SMALL_SHARD == 0 and b - a >= SMALL_SHARD for a, b in runs[:-1]), runs
    monkeypatch.setattr(correspond, "commit_pairs_blocks", counted)
    ref = _arrays(correspond_reference)
    total = len(ref["pairs/point"])
    assert total > 4 * SMALL_SHARD, "too few pairs for several commit tasks"

    summary = _correspond(tmp_path / "here")
    assert not summary.failed_frames and Store(summary.store).array("pairs/point").shards == (SMALL_SHARD,)
    assert_runs_tile_the_rows(calls(), tasks=2)  # one slot here
    _assert_same_arrays(ref, _arrays(summary.store))

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        summary = run_labels("synthetic", tmp_path / "dask", "correspond", dataset_options={"num_scenes": 2, "seed": 3},
                             shard_size=1, scheduler=cluster.scheduler_address, progress=False)
    assert not summary.failed_frames
    done = calls()
    assert_runs_tile_the_rows(done, tasks=4)  # two worker threads
    assert all(name != threading.main_thread().name for _, _, name in done)  # they ran as the cluster's tasks
    assert len({name for _, _, name in done}) >= 2  # on both workers
    _assert_same_arrays(ref, _arrays(summary.store))


def test_sigkill_during_pairs_commit_then_resume(correspond_reference, tmp_path, monkeypatch):
    script = f"""
import os, signal
from data_cache import schema
from tests.test_runner_synthetic import _small_pair_shards
_small_pair_shards(schema.ARRAYS_BY_NAME.__setitem__)
from pipeline.runner import run_labels
from pipeline.stages import correspond
_original, _done = correspond.commit_pairs_blocks, []
def _commit_then_die(job):
    _done.append(_original(job))
    if len(_done) == 1:  # the first run of zarr shards of the pairs written, the second not
        os.kill(os.getpid(), signal.SIGKILL)
correspond.commit_pairs_blocks = _commit_then_die
run_labels("synthetic", {str(tmp_path)!r}, "correspond", dataset_options={{"num_scenes": 2, "seed": 3}},
           shard_size=1, workers=0, progress=False)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    store_dir = tmp_path / "synthetic-train.zarr"
    store = Store(store_dir)
    assert "pairs/point" in store and not store.stage_complete("correspond")
    assert list((store_dir / "_parts" / "correspond").glob("*.npz"))
    _small_pair_shards_here(monkeypatch)  # the rerun commits with the same zarr shards
    summary = _correspond(tmp_path)
    assert not summary.failed_frames and validate_store(store_dir).ok
    assert not (store_dir / "_parts").exists()
    _assert_same_arrays(_arrays(correspond_reference), _arrays(store_dir))


def test_indoor_rooms_store(tmp_path):
    summary = run_labels("synthetic", tmp_path, "correspond", split="val", workers=0, progress=False,
                         dataset_options={"kind": "indoor", "num_scenes": 1, "frames_per_room": 4})
    assert not summary.failed_frames
    assert validate_store(summary.store).ok
    store = Store(summary.store)
    assert store.attrs.image_size == [240, 320] and len(store.attrs.class_names) == 20
    assert store.array("images/rgb").shape[0] == 4 and "images/gt" in store


def test_existing_dask_scheduler(tmp_path):
    from distributed import LocalCluster
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        summary = run_labels("synthetic", tmp_path, "correspond", dataset_options={"num_scenes": 1},
                             scheduler=cluster.scheduler_address, progress=False)
    assert not summary.failed_frames and validate_store(summary.store).ok


def test_nuscenes_fixture_all_stages(nuscenes_root, tmp_path):
    summary = run_labels("nuscenes", tmp_path, STAGES, data_root=nuscenes_root, split="all", stage_options=TINY,
                         workers=0, progress=False)
    assert not summary.failed_frames
    report = validate_store(summary.store)
    assert report.ok, report.errors
    assert Store(summary.store).array("sam/feat").shape[0] == 6
