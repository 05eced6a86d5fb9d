"""The label job runner: plan a store, then run stages shard by shard on dask (or in this process).

``run_labels`` is what ``cns-cli labels`` and ``make labels`` call. A *work shard* is a contiguous range
of ``shard_size`` frames; each (stage, shard) is one task that reads its inputs from the store, runs the
stage's model (built once per worker process) and writes its outputs, then its done marker. A rerun
skips done shards whose chunk files all exist (a shard whose data went missing is redone, and said so:
``data_cache.integrity``); ``overwrite`` redoes a stage (and the stages that depend on it). A rerun whose
configuration or checkpoint fingerprint differs from the one recorded in the store is refused, naming
the field that differs, unless the stage has no done shard yet (a run that failed before writing anything
does not pin its configuration).

Task graph: ``prepare`` of a stage waits for its prerequisite stages to finish (a stage may sample their
outputs, e.g. the SAM projection fit); shard ``s`` of a stage waits for shard ``s`` of its prerequisites,
so independent stages of different shards overlap; ``finalize`` waits for all of the stage's shards.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_cache import leases, schema
from data_cache.schema import STAGE_ORDER, STAGE_REQUIRES, RootAttrs
from data_cache.integrity import undo_shards_missing_data
from data_cache.store import CacheError, Store, fsync_dir, labels_command, store_path

from .datasets.base import DatasetError, build_adapter
from .progress import FINALIZE_STEP, PREPARE_STEP, TOPIC, StageBars, frame_reporter, set_local_callback
from .stages.base import Shard, ShardContext, build_stage, map_tasks
from data_cache.errors import UserError

log = logging.getLogger("cns.labels")

DEFAULT_SHARD_SIZE = {"nuscenes": 32, "nuimages": 64, "scannet": 1, "synthetic": 4}
PLAN = "plan"


class LabelRunError(UserError, RuntimeError):
    pass


@dataclass
class StageReport:
    stage: str
    shards_total: int = 0
    shards_done_before: int = 0
    shards_done: int = 0
    frames: int = 0
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)
    finalized: bool = False  # this job ran the stage's finalize (of several jobs on a store, one does)
    shards_by_others: int = 0  # shards other jobs on the store ran while this one ran


@dataclass
class RunSummary:
    store: Path
    reports: dict
    worker_events: list = field(default_factory=list)  # dask workers lost or restarted, each with its cause

    @property
    def failed_frames(self) -> list[dict]:
        return [f for r in self.reports.values() for f in r.failures]

    def table(self) -> str:
        rows = [("stage", "shards done", "ran now", "frames", "seconds", "failed frames")]
        for r in self.reports.values():
            done = r.shards_done_before + r.shards_done + r.shards_by_others
            rows.append((r.stage, f"{done}/{r.shards_total}", str(r.shards_done) + (
                f" (+{r.shards_by_others} by other jobs)" if r.shards_by_others else ""),
                         str(r.frames), f"{r.seconds:.1f}", str(len(r.failures))))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


# -- planning -----------------------------------------------------------------------------------------

def plan_store(adapter, path: Path, shard_size: int, dataset_options: dict | None = None) -> Store:
    """Create the store and its frame-level arrays, or reopen a planned one after checking it matches.

    A new store is planned in a temporary directory next to ``path`` and renamed to ``path`` when complete, so
    ``path`` never holds a half-planned store: of two jobs creating one store at once, the second's rename fails
    and it opens the first's (its own temporary directory is removed)."""
    if path.exists() and not (path / schema.DONE_DIR / PLAN / "_complete.json").exists():
        # only a run of a version that planned in place (or a hand-made directory) leaves this
        log.warning("removing %s: its planning step never finished", path)
        shutil.rmtree(path)
    if not path.exists():
        _plan_new_store(adapter, path, shard_size, dataset_options)
    store = Store(path, mode="a")
    _check_same_dataset(store, adapter)
    return store


def _plan_new_store(adapter, path: Path, shard_size: int, dataset_options: dict | None) -> None:
    """Plan into ``.<name>.planning-<host>-<pid>-<id>`` and rename it to ``path`` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_planners(path)
    tmp = path.parent / f"{_PLANNING_PREFIX.format(name=path.name)}{socket.gethostname()}-{os.getpid()}-" \
                        f"{uuid.uuid4().hex[:8]}"
    try:
        _plan_into(adapter, tmp, shard_size, dataset_options)
        try:
            os.rename(tmp, path)
            fsync_dir(path.parent)
            return
        except OSError as e:  # ENOTEMPTY/EEXIST: another job's store was renamed there first
            if not path.exists():
                raise
            log.info("%s was created by another job meanwhile (%s): opening it", path, e.strerror)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_PLANNING_PREFIX = ".{name}.planning-"


def _remove_dead_planners(path: Path) -> None:
    """Remove the temporary planning directories that a killed planner of this host left."""
    for tmp in path.parent.glob(_PLANNING_PREFIX.format(name=path.name) + "*"):
        host_pid = tmp.name[len(_PLANNING_PREFIX.format(name=path.name)):].rsplit("-", 2)
        if len(host_pid) == 3 and leases.process_gone(host_pid[0], host_pid[1]):
            shutil.rmtree(tmp, ignore_errors=True)


def _plan_into(adapter, path: Path, shard_size: int, dataset_options: dict | None) -> None:
    frames = adapter.frames()
    if not frames:
        raise DatasetError("the dataset has no frames", file=adapter.root)
    point_counts = np.array([fi.num_points for fi in frames], dtype=np.int64)
    image_counts = np.array([len(fi.image_names) for fi in frames], dtype=np.int64)
    point_off = np.concatenate([[0], np.cumsum(point_counts)])
    image_off = np.concatenate([[0], np.cumsum(image_counts)])
    shards = [[s, min(s + shard_size, len(frames))] for s in range(0, len(frames), shard_size)]
    has_points = "points" in adapter.modalities
    attrs = RootAttrs(dataset=adapter.name, split=adapter.split, class_names=list(adapter.class_names),
                      image_size=list(adapter.image_size), point_features=list(adapter.point_features),
                      capabilities=list(adapter.capabilities), modalities=list(adapter.modalities),
                      image_gt_source=adapter.image_gt_source, dataset_config=_jsonable(adapter.config()),
                      shard_size=shard_size, num_frames=len(frames))
    store = Store.create(path, attrs)
    store.update_attrs(shards=shards, voxel_size=adapter.voxel_size,  # options: for the commands errors suggest
                       dataset_options=_jsonable(dict(dataset_options or {})))
    store.set_dims(**{"F": len(frames), "F+1": len(frames) + 1, "I": int(image_off[-1]),
                      "H": adapter.image_size[0], "W": adapter.image_size[1],
                      "C": max(1, len(adapter.point_features)), "L": len(adapter.class_names)},
                   **({"P": int(point_off[-1])} if has_points else {}))
    store.create_array("frames/token")[:] = np.array([fi.token for fi in frames], dtype=object)
    if has_points:
        store.create_array("points/offsets")[:] = point_off
    store.create_array("images/offsets")[:] = image_off
    store.create_array("images/frame")[:] = np.repeat(np.arange(len(frames), dtype=np.int32), image_counts)
    store.create_array("images/name")[:] = np.array([n for fi in frames for n in fi.image_names], dtype=object)
    store.mark_done(PLAN, "_complete", {"frames": len(frames), "points": int(point_off[-1]),
                                        "images": int(image_off[-1]), "shards": len(shards)})


def _jsonable(d):
    return json.loads(json.dumps(d, default=str))


def _check_same_dataset(store: Store, adapter) -> None:
    attrs = store.attrs
    want = {"dataset": adapter.name, "split": adapter.split, "class_names": list(adapter.class_names),
            "image_size": list(adapter.image_size), "dataset_config": _jsonable(adapter.config()),
            "image_gt_source": adapter.image_gt_source}
    have = {"dataset": attrs.dataset, "split": attrs.split, "class_names": list(attrs.class_names),
            "image_size": list(attrs.image_size), "dataset_config": attrs.dataset_config,
            # a store planned before the attribute existed has no record of it: nothing to compare
            "image_gt_source": store.raw_attrs.get("image_gt_source", adapter.image_gt_source)}
    for key in want:
        if want[key] != have[key]:
            detail = _first_difference(have[key], want[key])
            raise CacheError(f"{store.path} was written with a different {key}{detail}; use another --cache "
                             f"directory or delete the store")


def _first_difference(have, want, prefix="") -> str:
    if isinstance(have, dict) and isinstance(want, dict):
        for k in sorted(set(have) | set(want)):
            if have.get(k) != want.get(k):
                return _first_difference(have.get(k), want.get(k), f"{prefix}.{k}" if prefix else k)
    return f" ({prefix + ': ' if prefix else ''}store has {have!r}, this run has {want!r})"


def check_fingerprint(store: Store, stage, overwrite: bool, rerun: str | None = None) -> None:
    """Refuse a rerun whose stage configuration or checkpoint differs from the store's, naming the field and
    the command that redoes the stage (``rerun``: that command, else one built from the store's attributes).

    A stage with no done shard takes the new configuration: what a failed run left (part files, failure
    records, a projection fitted with the old configuration) is cleared first."""
    recorded = store.raw_attrs.get("stages", {}).get(stage.name)
    current = _jsonable(stage.fingerprint())
    if recorded is not None and recorded != current and not overwrite and not store.done_shards(stage.name) \
            and not store.stage_complete(stage.name):
        log.warning("stage '%s' of %s has no done shard: it takes this run's configuration", stage.name, store.path)
        store.clear_stage(stage.name)
    elif recorded is not None and recorded != current and not overwrite:
        detail = _first_difference(recorded, current)
        simulated = [bool((fp.get("config") or {}).get("simulated")) for fp in (recorded, current)]
        if simulated[0] != simulated[1]:  # say first what matters most: simulated vs real foundation models
            detail = (" (the store's outputs are simulated from the ground truth, this run uses real models)"
                      if simulated[0] else " (the store's outputs come from real models, this run simulates them)")
        rerun = rerun or labels_command(store.path, store.raw_attrs, stages=stage.name, overwrite=True)
        raise CacheError(f"stage '{stage.name}' of {store.path} was run with a different fingerprint{detail}; "
                         f"to redo it (and the stages that read it): {rerun}")
    if recorded != current or overwrite:
        stages = dict(store.raw_attrs.get("stages", {}))
        stages[stage.name] = current
        store.update_attrs(stages=stages)


def downstream(stage: str) -> list[str]:
    out = []
    for s in STAGE_ORDER:
        if stage in STAGE_REQUIRES[s] or any(r in out for r in STAGE_REQUIRES[s]):
            out.append(s)
    return out


# -- tasks (run on workers; module-level so dask can pickle them) -------------------------------------

def _device(requested: str) -> str:
    import torch
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and torch.cuda.device_count() > 1:
        try:
            from distributed import get_worker
            name = str(get_worker().name)
            index = int("".join(ch for ch in name if ch.isdigit()) or 0)
            return f"cuda:{index % torch.cuda.device_count()}"
        except (ImportError, ValueError):
            pass
    return requested


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch
        torch.set_num_threads(threads)


_ADAPTERS: dict = {}


def _adapter(spec: dict):
    key = json.dumps(spec, sort_keys=True, default=str)
    if key not in _ADAPTERS:
        _ADAPTERS[key] = build_adapter(spec["name"], spec["root"], spec["split"], **spec["options"])
    return _ADAPTERS[key]


def _owner(job: dict) -> dict:
    """This process's lease owner record for the run ``job`` (``{"job": id, "timeout": s}``)."""
    return leases.new_owner(job["job"])


def task_prepare(stage, store_dir: str, adapter_spec: dict, threads, job: dict, *deps):
    """The stage's ``prepare``, under the (stage, ``_prepare``) lease: another job's concurrent prepare is waited
    for (this one then finds its text embeddings and fits stored and rewrites nothing)."""
    _set_threads(threads)
    store = Store(store_dir, mode="a")
    missing = [r for r in stage.requires if not store.stage_complete(r)]
    if missing:
        return {"skipped": f"prerequisite stage(s) {missing} incomplete"}
    with leases.hold(store_dir, stage.name, "_prepare", _owner(job), job["timeout"]):
        stage.prepare(store, _adapter(adapter_spec))
    return {"prepared": True}


def task_shard(stage, store_dir: str, adapter_spec: dict, shard: Shard, device: str, threads, job: dict, *deps):
    """Run one stage on one work shard under its lease; returns stats and failures (never raises for a frame's
    error), ``{"leased": owner}`` when another live job holds the shard, ``{"skipped": why}`` when it is done."""
    _set_threads(threads)
    store = Store(store_dir, mode="a")
    base = {"stage": stage.name, "shard": shard.index, "frames": len(shard.frames)}
    if deps and isinstance(deps[0], dict) and "skipped" in deps[0]:
        return {**base, "skipped": deps[0]["skipped"]}
    missing = [r for r in stage.requires if not store.is_done(r, shard.index)]
    if missing:
        return {**base, "skipped": f"prerequisite {missing} not done for shard {shard.index}"}
    lease, holder = leases.try_acquire(store_dir, stage.name, shard.index, _owner(job), job["timeout"])
    if lease is None:
        return {**base, "leased": holder}
    with lease:
        if store.is_done(stage.name, shard.index):  # another job ran it between our plan and our claim
            return {**base, "skipped": "done already (by another job, or by an earlier try of this task)"}
        return _run_shard(stage, store, adapter_spec, shard, device, base)


def _run_shard(stage, store: Store, adapter_spec: dict, shard: Shard, device: str, base: dict) -> dict:
    t0 = time.perf_counter()
    dev = _device(device)
    ctx = ShardContext(store=store, shard=shard, adapter=_adapter(adapter_spec) if stage.reads_dataset else None,
                       model=stage.get_model(dev), device=dev, progress=frame_reporter(stage.name, shard.index))
    with stage.model_in_use(dev):  # one shard at a time per shared model (SAM's predictor is stateful)
        stats = stage.process_shard(ctx)
    stats = {**base, **(stats or {}), "seconds": time.perf_counter() - t0,
             "timings": {k: round(v, 4) for k, v in ctx.timings.items()}}
    if ctx.failures:
        store.record_failure(stage.name, shard.index, ctx.failures)
        return {**stats, "failures": ctx.failures}
    store.mark_done(stage.name, shard.index, stats)
    return stats


def task_finalize(stage, store_dir: str, num_shards: int, job: dict, *deps):
    """The stage's ``finalize`` (which leaves its output durable), its ``_complete`` marker (durable), then the
    removal of its part files. A crash before the marker redoes ``finalize`` from the parts on the rerun; a
    crash after it leaves only parts that the rerun removes (:func:`remove_leftover_parts`). Claimed with the
    (stage, ``_complete``) lease, so of several jobs on the store one finalizes, once."""
    store = Store(store_dir, mode="a")
    if any(not store.is_done(stage.name, s) for s in range(num_shards)):
        return {"stage": stage.name, "finalized": False}
    lease, holder = leases.try_acquire(store_dir, stage.name, "_complete", _owner(job), job["timeout"])
    if lease is None:
        return {"stage": stage.name, "finalized": False, "leased": holder}
    with lease:
        if store.stage_complete(stage.name):
            return {"stage": stage.name, "finalized": False, "skipped": "finalized by another job"}
        return _finalize(stage, store, num_shards)


def _finalize(stage, store: Store, num_shards: int) -> dict:
    t0 = time.perf_counter()
    stage.finalize(store, map_tasks)
    store.mark_done(stage.name, "_complete", {"shards": num_shards, "finalize_s": time.perf_counter() - t0})
    store.remove_parts(stage.name)
    return {"stage": stage.name, "finalized": True}


def remove_leftover_parts(store: Store) -> None:
    """Part files of complete stages: what a crash between a stage's ``_complete`` marker and their removal left."""
    for name in STAGE_ORDER:
        if store.stage_complete(name):
            store.remove_parts(name)


# -- executors ----------------------------------------------------------------------------------------

class _Done:
    """A finished 'future' for the in-process executor."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class SequentialExecutor:
    """Runs each task at submission, in this process (``--workers 0``; also the reference for tests)."""

    def submit(self, fn, *args, **_):
        args = tuple(a.result() if isinstance(a, _Done) else a for a in args)
        return _Done(fn(*args))

    def as_completed(self, futures):
        return iter(futures)

    def close(self):
        pass


def import_stage_modules() -> None:
    """Import every stage's model code (open_clip, segment-anything, torchvision) once per worker process.

    A worker runs several tasks on threads; two of them importing torchvision for the first time at once
    deadlock on Python's module locks (seen with ``--threads-per-worker 2``), so the imports happen before
    any task.
    """
    import importlib
    for module in ("pipeline.datasets.load_builtin", "pipeline.stages.load_builtin", "pipeline.models.maskclip",
                   "pipeline.models.sam"):
        importlib.import_module(module)


#: glibc's malloc settings in a label worker (see :func:`keep_heap_slack`): buffers up to ``MMAP_THRESHOLD`` come from
#: the heap, which keeps ``HEAP_SLACK`` of free memory at its top for the next ones
MMAP_THRESHOLD = 32 << 20
HEAP_SLACK = 32 << 20


def keep_heap_slack(mmap_threshold: int = MMAP_THRESHOLD, slack: int = HEAP_SLACK) -> bool:
    """Serve buffers up to ``mmap_threshold`` bytes from the heap, which keeps ``slack`` bytes free at its top.

    dask's nanny starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also fixes glibc's mmap threshold
    at 128 KiB (glibc otherwise raises it up to 32 MiB as buffers come and go): every larger buffer (a zarr chunk
    being compressed, a camera image) is then a fresh mmap that the kernel faults in page by page and zeroes,
    and an munmap when freed. That made the pairs commit 2.6x slower in a worker than in a plain process, and
    correspond's shards about 1.5x slower (issue 12). With these settings such buffers are cut from the heap's
    reserve and go back to it; the free memory a worker keeps stays bounded by ``slack`` per malloc arena.
    Applied once per worker process (glibc only); returns whether it was.
    """
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows)
        return False
    m_top_pad, m_mmap_threshold = -2, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, int(mmap_threshold))) and bool(mallopt(m_top_pad, int(slack)))


def worker_plugin():
    """What every worker process of a label run does once before its first task (the runner registers it on
    its cluster, also for workers that join later): the stages' imports, and glibc's heap slack."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class SetUpLabelWorker(WorkerPlugin):
        name = "cns-label-worker"

        def setup(self, worker):
            import_stage_modules()
            keep_heap_slack()

    return SetUpLabelWorker()


class DaskExecutor:
    """Tasks on a dask cluster: a ``LocalCluster`` of ``workers`` processes, or the one at ``scheduler``.

    ``bars`` (a :class:`pipeline.progress.StageBars`) gets the workers' per-frame events; a worker that the cluster
    loses or restarts is reported (``worker_events`` and a warning line) with its cause: see
    :func:`worker_event`."""

    def __init__(self, workers: int, threads_per_worker: int, scheduler: str | None, bars: StageBars | None = None):
        from distributed import Client, LocalCluster
        if not log.isEnabledFor(logging.INFO):  # dask's start/stop chatter only with `cns-cli -v`
            logging.getLogger("distributed").setLevel(logging.WARNING)
        self.bars = bars
        self.worker_events: list[dict] = []
        if scheduler:
            self.cluster = None
            self.client = Client(scheduler)
        else:
            # dashboard on a free port: the fixed 8787 is often taken (another run, a notebook) and dask warns
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                                        silence_logs=logging.WARNING, dashboard_address=":0")
            self.client = Client(self.cluster)
        self.client.register_plugin(worker_plugin())  # also runs on workers that join later
        if bars is not None:
            self.client.subscribe_topic(TOPIC, bars.frame_event)
        for topic in WORKER_EVENT_TOPICS:
            self.client.subscribe_topic(topic, self._worker_event)
        workers_info = self.client.scheduler_info().get("workers", {})
        self.gpu_resource = bool(workers_info) and all("GPU" in w.get("resources", {})
                                                       for w in workers_info.values())

    def submit(self, fn, *args, key=None, gpu=False):
        kwargs = {"pure": False}
        if key:
            kwargs["key"] = key
        if gpu and self.gpu_resource:
            kwargs["resources"] = {"GPU": 1}
        return self.client.submit(fn, *args, **kwargs)

    def as_completed(self, futures):
        from distributed import as_completed
        for fut in as_completed(futures):
            yield fut

    def _worker_event(self, event) -> None:
        report = worker_event(event[1] if isinstance(event, tuple) else event)
        if report is None:
            return
        self.worker_events.append(report)
        line = f"dask worker {report['worker']} {report['what']}: {report['cause']}"
        log.warning(line)
        if self.bars is not None:
            self.bars.write(f"WARNING: {line}")

    def close(self):
        for topic in (TOPIC, *WORKER_EVENT_TOPICS):  # else the scheduler's next event hits a closed client
            self.client.unsubscribe_topic(topic)
        if self.cluster is not None:
            # LocalCluster.close gives each worker 4 s to exit before its nanny SIGKILLs it ("Worker process still
            # alive after 4.0 seconds, killing"): too short for a process holding torch on a loaded machine, and a
            # killed worker leaks its semaphores ("resource_tracker: ... leaked semaphore objects"). The nannies
            # are closed first with time to spare.
            self.cluster.sync(_close_nannies, self.cluster, NANNY_CLOSE_TIMEOUT)
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


#: seconds a LocalCluster worker gets to exit at the end of a run before its nanny kills it
NANNY_CLOSE_TIMEOUT = 60


async def _close_nannies(cluster, timeout: float) -> None:
    import asyncio
    await asyncio.gather(*(w.close(timeout=timeout) for w in list(cluster.workers.values())
                           if hasattr(w, "close")))


#: the dask event topics that say a worker was lost or restarted: the nanny's memory restart, the scheduler's
#: heartbeat timeout, and every worker removal
WORKER_EVENT_TOPICS = ("worker-restart-memory", "scheduler", "all")


def worker_event(msg: dict) -> dict | None:
    """``{"worker", "what", "cause"}`` for a dask event saying a worker was lost or restarted, else None.

    Causes: the nanny's memory limit (``worker-restart-memory``: the worker's RSS passed
    ``distributed.worker.memory.terminate`` of its ``memory_limit``), a heartbeat timeout (the scheduler heard
    nothing for ``distributed.scheduler.worker-ttl``), or an unexpected removal (the process died: a crash, the
    OS's OOM killer, a signal; or its connection was lost)."""
    if "rss" in msg and "worker" in msg:
        return {"worker": msg["worker"], "what": "restarted by its nanny",
                "cause": f"memory limit: its memory use reached {msg['rss'] / 2**30:.1f} GiB, over the "
                         f"'distributed.worker.memory.terminate' share of its memory_limit"}
    action = msg.get("action")
    if action == "worker-ttl-timed-out":
        return {"worker": ", ".join(msg.get("workers", [])), "what": "restarted by the scheduler",
                "cause": f"no heartbeat for {msg.get('ttl', 0):.0f} s ('distributed.scheduler.worker-ttl')"}
    if action == "remove-worker" and not msg.get("expected", False):
        stimulus = str(msg.get("stimulus_id", ""))
        tasks = len(msg.get("processing-tasks") or ())
        cause = "no heartbeat" if "worker-ttl" in stimulus else "its process died or lost its connection"
        return {"worker": msg.get("worker", "?"), "what": "lost",
                "cause": f"{cause} ({stimulus}); {tasks} running task(s) will be rerun elsewhere"}
    return None


# -- the run ------------------------------------------------------------------------------------------

def run_labels(dataset: str, cache: str | os.PathLike, stages, data_root=None, split: str | None = None,
               dataset_options: dict | None = None, stage_options: dict | None = None, workers: int = 1,
               threads_per_worker: int | None = None, scheduler: str | None = None, shard_size: int | None = None,
               overwrite: bool = False, device: str = "auto", progress: bool = True,
               lease_timeout: float = leases.DEFAULT_TIMEOUT) -> RunSummary:
    """Plan (or reopen) ``CACHE/<dataset>-<split>.zarr`` and run ``stages`` on it.

    ``workers=0`` runs everything in this process; otherwise a dask ``LocalCluster`` of ``workers``
    processes with ``threads_per_worker`` threads (torch threads set to match), or the existing cluster at
    ``scheduler``. Returns a :class:`RunSummary`; failed frames are in ``summary.failed_frames``.

    Every (stage, shard) is claimed with a lease (:mod:`data_cache.leases`) before it runs, so several jobs (or
    clusters) on one store split the shards; a shard another live job holds is waited for, then not redone; a
    lease without a heartbeat for ``lease_timeout`` seconds (or whose process on this host is gone) is taken over.
    """
    stages = _order_stages(stages)
    # the stages' options first: a bad option, unknown model or missing package is refused before any store is made
    stage_objs = {name: build_stage(name, **(stage_options or {}).get(name, {})) for name in stages}
    dataset_options = dict(dataset_options or {})
    adapter = build_adapter(dataset, data_root, split, **dataset_options)
    adapter_spec = {"name": dataset, "root": str(data_root) if data_root else None, "split": adapter.split,
                    "options": dataset_options}
    path = store_path(cache, dataset, adapter.split)
    shard_size = shard_size or DEFAULT_SHARD_SIZE.get(dataset, 8)
    store = plan_store(adapter, path, shard_size, dataset_options)
    remove_leftover_parts(store)
    run_attrs = {"dataset": dataset, "split": adapter.split, "dataset_config": {"root": data_root},
                 "dataset_options": dataset_options}

    def command(stage_list: str, overwrite: bool = False) -> str:  # copy-pasteable, with this run's options
        return labels_command(path, run_attrs, stages=stage_list, overwrite=overwrite)

    for name in stages:
        for req in STAGE_REQUIRES[name]:
            if req not in stages and not store.stage_complete(req):
                needed = ",".join(_with_incomplete_prerequisites(store, stages))
                raise LabelRunError(f"stage '{name}' needs '{req}', which is not complete in {path}: run "
                                    f"{command(needed)} (make: STAGES={needed})")
    for name, stage in stage_objs.items():
        stage.bind(store.attrs)
        if overwrite:
            for s in [name] + downstream(name):
                store.clear_stage(s)
        check_fingerprint(store, stage, overwrite, rerun=command(",".join([name] + downstream(name)), True))
    for line in undo_shards_missing_data(store, stage_objs):
        log.warning("%s", line)

    shards = [Shard(i, a, b) for i, (a, b) in enumerate(store.raw_attrs["shards"])]
    threads = threads_per_worker or (max(1, (os.cpu_count() or 1) // max(1, workers)) if workers else None)
    reports = {name: StageReport(name, shards_total=len(shards), shards_done_before=len(
        [s for s in shards if store.is_done(name, s.index)])) for name in stage_objs}
    bars = StageBars({name: sum(len(s.frames) for s in shards if not store.is_done(name, s.index))
                      for name in stage_objs}, enabled=progress)
    executor = SequentialExecutor() if workers == 0 and not scheduler else DaskExecutor(workers or 1, threads or 1,
                                                                                        scheduler, bars)
    set_local_callback(bars.frame_event)
    job = {"job": leases.new_owner()["job"], "timeout": float(lease_timeout)}
    run = _Run(executor, stage_objs, Store(path, mode="a"), adapter_spec, shards, device, threads, job, reports, bars)
    try:
        while True:  # a round runs what is not done and not leased; then waits for what other jobs hold
            leased = run.round()
            if not leased:
                break
            run.wait_for(leased)
    finally:
        set_local_callback(None)
        bars.close()
        executor.close()
    store = Store(path, mode="a")
    remove_leftover_parts(store)  # a redone shard of a complete stage leaves a part file (see integrity)
    for name, rep in reports.items():
        rep.shards_by_others = max(0, len(store.done_shards(name)) - rep.shards_done_before - rep.shards_done)
    if all(store.stage_complete(s) for s in stage_objs):
        store.consolidate()
    return RunSummary(store=path, reports=reports, worker_events=list(getattr(executor, "worker_events", [])))


@dataclass
class _Run:
    """The rounds of one ``run_labels``: each submits the task graph of what is neither done nor failed in this
    run, and collects the results into ``reports`` and the bars; the shards other jobs hold are returned."""
    executor: object
    stage_objs: dict
    store: Store
    adapter_spec: dict
    shards: list
    device: str
    threads: int | None
    job: dict
    reports: dict
    bars: StageBars
    failed: set = field(default_factory=set)

    def round(self) -> list[tuple[str, int | str, dict]]:
        """One round; returns ``(stage, shard or "_complete", holder)`` for what live owners of other jobs hold."""
        leased = []
        futures, meta = _submit_graph(self.executor, self.stage_objs, self.store, str(self.store.path),
                                      self.adapter_spec, self.shards, self.device, self.threads, self.job,
                                      self.failed)
        for name in self.stage_objs:
            if not self.store.stage_complete(name):
                self.bars.step(name, PREPARE_STEP.get(name, "prepare"))
        for fut in self.executor.as_completed(futures):
            kind, name = meta[id(fut)]
            result = fut.result()
            if result.get("leased"):
                leased.append((name, result.get("shard", "_complete"), result["leased"]))
            elif kind == "prepare":
                self.bars.step(name, "running" if not result.get("skipped") else "waiting for prerequisites")
            elif kind == "shard":
                self._shard_result(name, result)
            elif kind == "finalize":
                self.reports[name].finalized |= bool(result.get("finalized"))
                self.bars.step(name, "done" if self.store.stage_complete(name) else "not complete")
        return leased

    def _shard_result(self, name: str, result: dict) -> None:
        rep = self.reports[name]
        if result.get("skipped"):
            return
        rep.frames += result["frames"]
        rep.seconds += result.get("seconds", 0.0)
        for key, value in result.items():
            if isinstance(value, (int, float)) and key not in ("shard", "frames", "seconds"):
                rep.stats[key] = rep.stats.get(key, 0) + value
        if result.get("failures"):
            self.failed.add((name, result["shard"]))
            rep.failures.extend({**f, "stage": name, "shard": result["shard"]} for f in result["failures"])
        else:
            rep.shards_done += 1
        self.bars.shard_finished(name, result["shard"], result["frames"])
        if all(self.store.is_done(name, s.index) for s in self.shards):
            self.bars.step(name, FINALIZE_STEP.get(name, "finalize"))

    def wait_for(self, leased, poll: float | None = None) -> None:
        """Poll until each leased (stage, shard) is done, or released, or its owner is stale or gone."""
        poll = poll or min(2.0, self.job["timeout"] / 10)
        holders = sorted({leases.describe(h) for _, _, h in leased})
        log.info("waiting for %d shard(s) leased by %s", len(leased), "; ".join(holders))
        for name in {n for n, _, _ in leased}:
            self.bars.step(name, f"waiting for {len(leased)} shard(s) of another job")
        store_dir = str(self.store.path)
        pending = list(leased)
        while pending:
            pending = [(n, s, h) for n, s, h in pending if not self.store.is_done(n, s)
                       and not leases.holder_gone(store_dir, n, s, self.job["timeout"])]
            if pending:
                time.sleep(poll)
        for name, shard, _ in leased:
            if isinstance(shard, int) and self.store.is_done(name, shard):  # run by the other job
                self.bars.shard_finished(name, shard, len(self.shards[shard].frames))


def _with_incomplete_prerequisites(store: Store, stages) -> list[str]:
    """``stages`` and every stage they need, directly or not, that is not complete in ``store``, in order."""
    wanted = set(stages)
    for name in reversed(STAGE_ORDER):
        if name in wanted:
            wanted |= {r for r in STAGE_REQUIRES[name] if not store.stage_complete(r)}
    return [s for s in STAGE_ORDER if s in wanted]


def _order_stages(stages) -> list[str]:
    if isinstance(stages, str):
        stages = [s for s in stages.split(",") if s.strip()]
    stages = [s.strip() for s in stages]
    unknown = [s for s in stages if s not in STAGE_ORDER]
    if unknown:
        raise LabelRunError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGE_ORDER)}")
    return [s for s in STAGE_ORDER if s in stages]


def _submit_graph(executor, stage_objs, store, store_dir, adapter_spec, shards, device, threads, job, failed=()):
    """The task graph of the stages' shards that are neither done nor in ``failed`` (``(stage, shard)`` pairs
    that failed earlier in this run), with their prepare and finalize tasks."""
    futures, meta = [], {}
    shard_futs: dict = {}
    final_futs: dict = {}

    def track(fut, kind, name):
        futures.append(fut)
        meta[id(fut)] = (kind, name)
        return fut

    for name, stage in stage_objs.items():
        waits_for = [final_futs[r] for r in stage.requires if r in final_futs]
        prep = track(executor.submit(task_prepare, stage, store_dir, adapter_spec, threads, job, *waits_for,
                                     key=f"prepare-{name}-{time.time_ns()}", gpu=stage.uses_gpu),
                     "prepare", name)
        shard_futs[name] = {}
        for sh in shards:
            if store.is_done(name, sh.index) or (name, sh.index) in failed:
                continue
            deps = [prep] + [shard_futs[r][sh.index] for r in stage.requires
                             if r in shard_futs and sh.index in shard_futs[r]]
            shard_futs[name][sh.index] = track(executor.submit(
                task_shard, stage, store_dir, adapter_spec, sh, device, threads, job, *deps,
                key=f"{name}-{sh.index:05d}-{time.time_ns()}", gpu=stage.uses_gpu), "shard", name)
        if not store.stage_complete(name):
            final_futs[name] = track(executor.submit(task_finalize, stage, store_dir, len(shards), job,
                                                     *shard_futs[name].values(),
                                                     key=f"finalize-{name}-{time.time_ns()}"), "finalize", name)
    return futures, meta

