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
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_cache import schema
from data_cache.schema import STAGE_ORDER, STAGE_REQUIRES, RootAttrs
from data_cache.integrity import undo_shards_missing_data
from data_cache.store import CacheError, Store, labels_command, store_path

from .datasets.base import DatasetError, build_adapter
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


@dataclass
class RunSummary:
    store: Path
    reports: dict

    @property
    def failed_frames(self) -> list[dict]:
        return [f for r in self.reports.values() for f in r.failures]

    def table(self) -> str:
        rows = [("stage", "shards done", "ran now", "frames", "seconds", "failed frames")]
        for r in self.reports.values():
            rows.append((r.stage, f"{r.shards_done_before + r.shards_done}/{r.shards_total}", str(r.shards_done),
                         str(r.frames), f"{r.seconds:.1f}", str(len(r.failures))))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


# -- planning -----------------------------------------------------------------------------------------

def plan_store(adapter, path: Path, shard_size: int, dataset_options: dict | None = None) -> Store:
    """Create the store and its frame-level arrays, or reopen a planned one after checking it matches."""
    if path.exists() and not (path / schema.DONE_DIR / PLAN / "_complete.json").exists():
        log.warning("removing %s: its planning step never finished", path)
        shutil.rmtree(path)
    if path.exists():
        store = Store(path, mode="a")
        _check_same_dataset(store, adapter)
        return store
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
    return store


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


def task_prepare(stage, store_dir: str, adapter_spec: dict, threads, *deps):
    _set_threads(threads)
    store = Store(store_dir, mode="a")
    missing = [r for r in stage.requires if not store.stage_complete(r)]
    if missing:
        return {"skipped": f"prerequisite stage(s) {missing} incomplete"}
    stage.prepare(store, _adapter(adapter_spec))
    return {"prepared": True}


def task_shard(stage, store_dir: str, adapter_spec: dict, shard: Shard, device: str, threads, *deps):
    """Run one stage on one work shard; returns stats and failures (never raises for a frame's error)."""
    _set_threads(threads)
    store = Store(store_dir, mode="a")
    t0 = time.perf_counter()
    base = {"stage": stage.name, "shard": shard.index, "frames": len(shard.frames)}
    if deps and isinstance(deps[0], dict) and "skipped" in deps[0]:
        return {**base, "skipped": deps[0]["skipped"]}
    missing = [r for r in stage.requires if not store.is_done(r, shard.index)]
    if missing:
        return {**base, "skipped": f"prerequisite {missing} not done for shard {shard.index}"}
    dev = _device(device)
    ctx = ShardContext(store=store, shard=shard, adapter=_adapter(adapter_spec) if stage.reads_dataset else None,
                       model=stage.get_model(dev), device=dev)
    with stage.model_in_use(dev):  # one shard at a time per shared model (SAM's predictor is stateful)
        stats = stage.process_shard(ctx)
    stats = {**base, **(stats or {}), "seconds": time.perf_counter() - t0,
             "timings": {k: round(v, 4) for k, v in ctx.timings.items()}}
    if ctx.failures:
        store.record_failure(stage.name, shard.index, ctx.failures)
        return {**stats, "failures": ctx.failures}
    store.mark_done(stage.name, shard.index, stats)
    return stats


def task_finalize(stage, store_dir: str, num_shards: int, *deps):
    """The stage's ``finalize`` (which leaves its output durable), its ``_complete`` marker (durable), then the
    removal of its part files. A crash before the marker redoes ``finalize`` from the parts on the rerun; a
    crash after it leaves only parts that the rerun removes (:func:`remove_leftover_parts`)."""
    store = Store(store_dir, mode="a")
    if any(not store.is_done(stage.name, s) for s in range(num_shards)):
        return {"stage": stage.name, "finalized": False}
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
    def __init__(self, workers: int, threads_per_worker: int, scheduler: str | None):
        from distributed import Client, LocalCluster
        if not log.isEnabledFor(logging.INFO):  # dask's start/stop chatter only with `cns-cli -v`
            logging.getLogger("distributed").setLevel(logging.WARNING)
        if scheduler:
            self.cluster = None
            self.client = Client(scheduler)
        else:
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                                        silence_logs=logging.WARNING)
            self.client = Client(self.cluster)
        self.client.register_plugin(worker_plugin())  # also runs on workers that join later
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

    def close(self):
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


# -- the run ------------------------------------------------------------------------------------------

def run_labels(dataset: str, cache: str | os.PathLike, stages, data_root=None, split: str | None = None,
               dataset_options: dict | None = None, stage_options: dict | None = None, workers: int = 1,
               threads_per_worker: int | None = None, scheduler: str | None = None, shard_size: int | None = None,
               overwrite: bool = False, device: str = "auto", progress: bool = True) -> RunSummary:
    """Plan (or reopen) ``CACHE/<dataset>-<split>.zarr`` and run ``stages`` on it.

    ``workers=0`` runs everything in this process; otherwise a dask ``LocalCluster`` of ``workers``
    processes with ``threads_per_worker`` threads (torch threads set to match), or the existing cluster at
    ``scheduler``. Returns a :class:`RunSummary`; failed frames are in ``summary.failed_frames``.
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
    executor = SequentialExecutor() if workers == 0 and not scheduler else DaskExecutor(workers or 1, threads or 1,
                                                                                        scheduler)
    reports = {name: StageReport(name, shards_total=len(shards), shards_done_before=len(
        [s for s in shards if store.is_done(name, s.index)])) for name in stage_objs}
    bar = _progress_bar(progress, sum(len(s.frames) for name in stage_objs for s in shards
                                      if not store.is_done(name, s.index)))
    store_dir = str(path)
    try:
        futures, meta = _submit_graph(executor, stage_objs, store, store_dir, adapter_spec, shards, device, threads)
        for fut in executor.as_completed(futures):
            kind, name = meta[id(fut)]
            result = fut.result()
            if kind == "shard":
                rep = reports[name]
                if result.get("skipped"):
                    continue
                rep.frames += result["frames"]
                rep.seconds += result.get("seconds", 0.0)
                for key, value in result.items():
                    if isinstance(value, (int, float)) and key not in ("shard", "frames", "seconds"):
                        rep.stats[key] = rep.stats.get(key, 0) + value
                if result.get("failures"):
                    rep.failures.extend({**f, "stage": name, "shard": result["shard"]} for f in result["failures"])
                else:
                    rep.shards_done += 1
                if bar is not None:
                    bar.update(result["frames"])
                    bar.set_postfix_str(f"{name} shard {result['shard']}")
    finally:
        if bar is not None:
            bar.close()
        executor.close()
    store = Store(path, mode="a")
    remove_leftover_parts(store)  # a redone shard of a complete stage leaves a part file (see integrity)
    if all(store.stage_complete(s) for s in stage_objs):
        store.consolidate()
    return RunSummary(store=path, reports=reports)


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


def _submit_graph(executor, stage_objs, store, store_dir, adapter_spec, shards, device, threads):
    futures, meta = [], {}
    shard_futs: dict = {}
    final_futs: dict = {}

    def track(fut, kind, name):
        futures.append(fut)
        meta[id(fut)] = (kind, name)
        return fut

    for name, stage in stage_objs.items():
        waits_for = [final_futs[r] for r in stage.requires if r in final_futs]
        prep = track(executor.submit(task_prepare, stage, store_dir, adapter_spec, threads, *waits_for,
                                     key=f"prepare-{name}-{time.time_ns()}", gpu=stage.uses_gpu),
                     "prepare", name)
        shard_futs[name] = {}
        for sh in shards:
            if store.is_done(name, sh.index):
                continue
            deps = [prep] + [shard_futs[r][sh.index] for r in stage.requires
                             if r in shard_futs and sh.index in shard_futs[r]]
            shard_futs[name][sh.index] = track(executor.submit(
                task_shard, stage, store_dir, adapter_spec, sh, device, threads, *deps,
                key=f"{name}-{sh.index:05d}-{time.time_ns()}", gpu=stage.uses_gpu), "shard", name)
        if not store.stage_complete(name):
            final_futs[name] = track(executor.submit(task_finalize, stage, store_dir, len(shards),
                                                     *shard_futs[name].values(),
                                                     key=f"finalize-{name}-{time.time_ns()}"), "finalize", name)
    return futures, meta


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="frame", desc="labels", dynamic_ncols=True)
