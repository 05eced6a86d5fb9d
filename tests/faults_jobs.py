"""Several jobs on one store (issue 22, points 4 and 5): leases split the shards, a stale lease is taken over,
creation of a new store is atomic, and a multi-process dask cluster started from its CLIs writes the same arrays.

The jobs run the ``correspond`` stage (its finalize, the pairs commit, must run once) and tiny ``maskclip``
(whose ``prepare`` writes the text embeddings) on 6 one-frame shards of an indoor synthetic store."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_cache import leases, schema
from data_cache.store import Store
from data_cache.validate import validate_store
from pipeline.runner import run_labels

from tests.test_runner_synthetic import _arrays, _assert_same_arrays

REPO = Path(__file__).resolve().parents[1]
STAGES = ["correspond", "maskclip"]
OPTIONS = {"num_scenes": 6, "seed": 7, "kind": "indoor", "frames_per_room": 1}
TINY = {"maskclip": {"tiny": True}}
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

#: one job in its own process: waits for the test's "go" (so that two jobs start at once), runs, prints what it ran.
#: ``slow`` adds a pause per correspond shard so that two jobs' runs overlap however loaded the machine is.
JOB = """
import json, sys, time
from pathlib import Path
from pipeline.runner import run_labels
from pipeline.stages.correspond import CorrespondStage
cache, ready, go, slow, timeout = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
original = CorrespondStage.process_shard
def process_shard(self, ctx):
    time.sleep(slow)
    return original(self, ctx)
CorrespondStage.process_shard = process_shard
ready.touch()
while not go.exists():
    time.sleep(0.01)
summary = run_labels("synthetic", cache, %r, dataset_options=%r, stage_options=%r, shard_size=1, workers=0,
                     progress=False, lease_timeout=timeout)
print(json.dumps({name: {"ran": r.shards_done, "finalized": r.finalized, "failed": len(r.failures)}
                  for name, r in summary.reports.items()}))
""" % (STAGES, OPTIONS, TINY)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    summary = run_labels("synthetic", tmp_path_factory.mktemp("ref"), STAGES, dataset_options=OPTIONS,
                         stage_options=TINY, shard_size=1, workers=0, progress=False)
    assert not summary.failed_frames
    assert summary.reports["correspond"].shards_total == 6
    return summary.store


def _start_jobs(cache: Path, n: int, slow: float, timeout: float = leases.DEFAULT_TIMEOUT):
    go = cache / "go"
    procs, readies = [], []
    for i in range(n):
        ready = cache / f"ready{i}"
        procs.append(subprocess.Popen([sys.executable, "-c", JOB, str(cache), str(ready), str(go), str(slow),
                                       str(timeout)], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
        readies.append(ready)
    t0 = time.time()
    while not all(r.exists() for r in readies):
        assert time.time() - t0 < 120 and all(p.poll() is None for p in procs), "a job did not start"
        time.sleep(0.05)
    go.touch()
    return procs


def test_two_jobs_at_once_split_the_shards_and_equal_one_job(reference, tmp_path):
    """Two jobs start together on a store that does not exist yet: both plan it (one creates, the other opens it),
    each shard runs once in all, each finalize once, and the store equals a single job's."""
    procs = _start_jobs(tmp_path, 2, slow=0.5)
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    for stage in STAGES:
        ran = [r[stage]["ran"] for r in results]
        assert sum(ran) == 6, (stage, ran)
        assert sum(r[stage]["finalized"] for r in results) == 1, (stage, results)
    assert all(r["correspond"]["ran"] > 0 for r in results), f"one job ran every shard: nothing was split {results}"
    store = tmp_path / "synthetic-train.zarr"
    assert validate_store(store).ok
    assert not list(tmp_path.glob(".*planning*")), "a planning directory was left behind"
    assert not list((store / schema.DONE_DIR).rglob("*.lease")), "a lease was left behind"
    _assert_same_arrays(_arrays(reference), _arrays(store))


def test_stale_lease_of_a_killed_job_is_taken_over(reference, tmp_path, caplog):
    """A job SIGKILLed mid-shard leaves its lease; made to look like a job of another host (so only the heartbeat
    can tell it is dead), it is taken over once older than the lease timeout, and the store completes identical."""
    store = tmp_path / "synthetic-train.zarr"
    lease = leases.lease_path(store, "correspond", 2)
    proc = _start_jobs(tmp_path, 1, slow=2.0)[0]
    t0 = time.time()
    while not lease.exists() and proc.poll() is None and time.time() - t0 < 240:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert lease.exists(), "the job ended before it held shard 2: the test proves nothing"
    assert not Store(store, mode="a").is_done("correspond", 2)
    record = json.loads(lease.read_text())
    lease.write_text(json.dumps({**record, "host": "another-host"}))  # the owner's liveness is unknown here
    timeout = 2.0
    caplog.set_level("WARNING", logger="cns.leases")
    summary = run_labels("synthetic", tmp_path, STAGES, dataset_options=OPTIONS, stage_options=TINY, shard_size=1,
                         workers=0, progress=False, lease_timeout=timeout)
    assert not summary.failed_frames
    taken = [r.getMessage() for r in caplog.records if "took over the lease" in r.getMessage()]
    assert taken and "another-host" in taken[0] and "no heartbeat for over 2 s" in taken[0], taken
    assert validate_store(store).ok
    assert not lease.exists()
    _assert_same_arrays(_arrays(reference), _arrays(store))


# -- leases alone (no run) ------------------------------------------------------------------------------

def _claim(args):
    store_dir, barrier = args
    barrier.wait()
    lease, holder = leases.try_acquire(store_dir, "sam", 0, leases.new_owner(f"job-{os.getpid()}"), timeout=1.0)
    return lease is not None


@pytest.mark.parametrize("stale", [False, True], ids=["new", "stale"])
def test_one_of_several_claimants_gets_a_lease(tmp_path, stale):
    """Four processes claim one (stage, shard) at the same instant, free or held by a stale owner: one wins."""
    path = leases.lease_path(tmp_path, "sam", 0)
    if stale:
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"host": "another-host", "pid": 1, "job": "dead", "heartbeat": time.time() - 60}))
    ctx = multiprocessing.get_context("fork")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(4)
        with ctx.Pool(4) as pool:
            won = pool.map(_claim, [(str(tmp_path), barrier)] * 4)
    assert sum(won) == 1, won
    assert json.loads(path.read_text())["job"] != "dead"


def test_a_live_lease_is_not_taken_and_a_heartbeat_keeps_it(tmp_path):
    owner = leases.new_owner("first")
    lease, _ = leases.try_acquire(tmp_path, "sam", 3, owner, timeout=0.6)
    with lease:
        time.sleep(1.2)  # two timeouts: only the heartbeat (every 0.1 s) keeps it live
        other, holder = leases.try_acquire(tmp_path, "sam", 3, {**leases.new_owner("second"), "pid": 1,
                                                                "host": "another-host"}, timeout=0.6)
        assert other is None and holder["job"] == "first"
        assert lease.lost_to is None
    assert not leases.lease_path(tmp_path, "sam", 3).exists()


def test_a_lease_of_a_dead_process_on_this_host_is_taken_at_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = leases.lease_path(tmp_path, "refine", 0)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "job": "gone",
                                "heartbeat": time.time()}))
    lease, holder = leases.try_acquire(tmp_path, "refine", 0, leases.new_owner(), timeout=600)
    assert lease is not None and lease.took_over["job"] == "gone"
    lease.release()


# -- a dask cluster started from its command lines --------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dask_scheduler_and_worker_processes_equal_in_process(tmp_path):
    """`dask scheduler` and a `dask worker` process on loopback (as users start them on several machines): the
    label stages write the same arrays as ``workers=0`` (one torch thread per task in both)."""
    import dask
    import distributed  # noqa: F401  (loads its configuration defaults into dask.config)
    options = {**OPTIONS, "num_scenes": 2}
    # workers=0 in a process with the environment dask's nanny gives its workers (OMP_NUM_THREADS=1, ...):
    # oneDNN picks other kernels under another OpenMP setting, and CLIP's float16 features differ in the last bit
    nanny_env = {k: str(v) for k, v in dask.config.get("distributed.nanny.pre-spawn-environ").items()}
    local = subprocess.run([sys.executable, "-m", "cli", "labels", "--dataset", "synthetic", "--cache",
                            str(tmp_path / "local"), "--stages", ",".join(STAGES), "--workers", "0",
                            "--threads-per-worker", "1", "--shard-size", "1", "--test-tiny-models", "--no-progress"]
                           + [f"--dataset-option={k}={v}" for k, v in options.items()],
                           cwd=REPO, env={**ENV, **nanny_env}, capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr[-2000:]
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = [str(Path(sys.executable).parent / "dask")]
    procs = []
    try:
        procs.append(subprocess.Popen(dask + ["scheduler", "--host", "127.0.0.1", "--port", str(port),
                                              "--no-dashboard"], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(dask + ["worker", address, "--nworkers", "1", "--nthreads", "1",
                                              "--no-dashboard"], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        from distributed import Client
        with Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=120)
        summary = run_labels("synthetic", tmp_path / "cluster", STAGES, dataset_options=options, stage_options=TINY,
                             shard_size=1, scheduler=address, threads_per_worker=1, progress=False)
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    assert not summary.failed_frames
    assert all(r.shards_done == 2 for r in summary.reports.values())
    _assert_same_arrays(_arrays(tmp_path / "local" / "synthetic-train.zarr"), _arrays(summary.store))


# -- feedback: the bars and the worker events ------------------------------------------------------------

def test_stage_bars_count_frames_per_stage_once():
    from pipeline.progress import StageBars, frame_reporter, set_local_callback
    bars = StageBars({"correspond": 4, "maskclip": 4}, enabled=True)
    try:
        set_local_callback(bars.frame_event)
        report = frame_reporter("maskclip", 0)  # in this process: the driver's callback
        report(1)
        report(1)
        bars.shard_finished("maskclip", 0, 2)  # both frames already counted: nothing added
        bars.shard_finished("maskclip", 1, 2)  # a shard that sent no frame events: topped up
        bars.frame_event((0.0, {"stage": "correspond", "shard": 3, "frames": 1}))  # a dask event (time, msg)
        assert bars.bars["maskclip"].n == 4 and bars.bars["correspond"].n == 1
        bars.step("correspond", "finalize (pairs commit)")
        assert "finalize (pairs commit)" in str(bars.bars["correspond"])
    finally:
        set_local_callback(None)
        bars.close()


def test_worker_events_name_their_cause():
    from pipeline.runner import worker_event
    memory = worker_event({"worker": "tcp://w:1", "pid": 7, "rss": 22 * 2**30})
    assert memory["what"] == "restarted by its nanny" and "memory limit" in memory["cause"] and "22.0 GiB" in \
        memory["cause"]
    ttl = worker_event({"action": "worker-ttl-timed-out", "workers": ["tcp://w:1"], "ttl": 300})
    assert "no heartbeat for 300 s" in ttl["cause"]
    died = worker_event({"action": "remove-worker", "worker": "tcp://w:1", "expected": False,
                         "stimulus_id": "handle-worker-cleanup-1", "processing-tasks": ["sam-00000"]})
    assert died["what"] == "lost" and "process died" in died["cause"] and "1 running task" in died["cause"]
    assert worker_event({"action": "remove-worker", "worker": "tcp://w:1", "expected": True}) is None
    assert worker_event({"action": "add-worker", "worker": "tcp://w:1"}) is None


def test_a_recomputed_task_does_not_redo_a_done_shard(reference, monkeypatch):
    """dask recomputes the tasks a lost worker held; a shard whose done marker exists is not run again."""
    from pipeline.runner import task_shard
    from pipeline.stages.base import Shard, build_stage
    from pipeline.stages.maskclip import MaskCLIPStage

    def never(self, ctx):
        raise AssertionError("a done shard was run again")
    monkeypatch.setattr(MaskCLIPStage, "process_shard", never)
    spec = {"name": "synthetic", "root": None, "split": "train", "options": OPTIONS}
    result = task_shard(build_stage("maskclip", tiny=True), str(reference), spec, Shard(0, 0, 1), "cpu", 1,
                        {"job": "recompute", "timeout": 60.0})
    assert result["skipped"].startswith("done already")
    assert not leases.lease_path(reference, "maskclip", 0).exists()
