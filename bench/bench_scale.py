"""Scale rehearsal of the ``correspond`` stage and the pairs commit (issue 12, item 5: the correspond part).

The real nuScenes keyframe of ``../shared/data/nuscenes_sample`` (34 688 points, 6 cameras, 22 103 pairs)
replicated N times under distinct tokens (the nuScenes dataset option ``replicate=N``). Measured:

1. planning: the adapter, the frame list and the store's frame-level arrays (``plan_store``);
2. correspond frames/s on a dask ``LocalCluster`` of 1 and of 2 worker processes (one thread each), over the
   shards phase: from the first shard's start to the last shard's done marker (cluster start-up and the
   commit excluded); the ratio 2 : 1;
3. the pairs commit on the same parts: the old single writer (every part in memory, one sequential writer
   of whole zarr shards: the code the parallel commit replaced, kept here as the baseline), the new commit
   in one process (a loop over its tasks), and the new commit as tasks of 1 and 2 workers; every
   variant's arrays are checked equal (the new commit fsyncs the pairs, the old writer did not: the fsync
   alone is timed after the old writer); with ``--commit-frames M`` also at M frames, on parts that tile the
   keyframe's real pairs (a commit rehearsal without M correspond frames);
4. bytes per frame of the store, by array group;
5. each worker's RSS, sampled every second during the correspond run: first sample, the sample a tenth into
   the run, the peaks of the run's first and second half, max and last.

Steps 2 and 3 run ``--repeat`` times (default 3), the variants side by side in each repeat, each with the load
average when it started (the machine may be shared); the JSON holds every repeat and the medians.

    python bench/bench_scale.py [--frames 2000] [--commit-frames M] [--shard-size 32] [--repeat 3]
                                [--out bench/results/bench_scale.json]

The store of each run is written under a temporary folder and deleted at the end (``--keep`` keeps it).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from bench_stages import array_bytes  # bench/ is on sys.path when this script runs

from data_cache.store import Store
from pipeline.datasets import build_adapter
from pipeline.runner import plan_store, run_labels, worker_plugin
from pipeline.stages.base import map_tasks
from pipeline.stages.correspond import PAIR_ARRAYS, CorrespondStage

FIXTURE = Path(os.environ.get("CNS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) \
    / "nuscenes_sample"
GROUPS = ("frames", "points", "images", "pairs")


def _rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


class RssSampler(threading.Thread):
    """Every worker's RSS once a second, while the run goes on."""

    def __init__(self, client, period: float = 1.0):
        super().__init__(daemon=True)
        self.client, self.period, self.samples, self.stop = client, period, {}, threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                for worker, rss in self.client.run(_rss).items():
                    self.samples.setdefault(worker, []).append(rss)
            except Exception:  # noqa: BLE001 — a worker between tasks may not answer; the next sample will
                pass
            self.stop.wait(self.period)

    def summary(self) -> dict:
        mib = 1 << 20
        # "after_10pct": the sample a tenth into the run (imports done, first shard under way); growth shows as a
        # second half whose peak is above the first half's
        return {w: {"first_mib": round(s[0] / mib), "after_10pct_mib": round(s[len(s) // 10] / mib),
                    "max_first_half_mib": round(max(s[:len(s) // 2] or s) / mib),
                    "max_second_half_mib": round(max(s[len(s) // 2:]) / mib),
                    "max_mib": round(max(s) / mib), "last_mib": round(s[-1] / mib), "samples": len(s)}
                for w, s in sorted(self.samples.items()) if s}


def shards_phase(store: Store) -> float:
    """Seconds from the first correspond shard's start to the last shard's done marker."""
    starts, ends = [], []
    for s in range(len(store.raw_attrs["shards"])):
        marker = store.path / "_done" / "correspond" / f"{s:05d}.json"
        end = marker.stat().st_mtime
        starts.append(end - json.loads(marker.read_text())["seconds"])
        ends.append(end)
    return max(ends) - min(starts)


def pairs_digest(store: Store) -> str:
    h = hashlib.sha256()
    for name in ("pairs/offsets",) + PAIR_ARRAYS:
        h.update(np.ascontiguousarray(store.array(name)[:]).tobytes())
    return h.hexdigest()


def correspond_run(cache: Path, frames: int, workers: int, shard_size: int) -> dict:
    from distributed import Client, LocalCluster
    load = os.getloadavg()
    adapter = build_adapter("nuscenes", FIXTURE, split="all", replicate=frames)
    t0 = time.perf_counter()
    adapter.frames()
    store = plan_store(adapter, cache / "nuscenes-all.zarr", shard_size)
    plan_s = time.perf_counter() - t0
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        sampler = RssSampler(client)
        sampler.start()
        t0 = time.perf_counter()
        summary = run_labels("nuscenes", cache, "correspond", data_root=FIXTURE, split="all",
                             dataset_options={"replicate": frames}, shard_size=shard_size,
                             scheduler=cluster.scheduler_address, threads_per_worker=1, progress=False)
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
    if summary.failed_frames:
        raise RuntimeError(summary.failed_frames[0]["error"])
    store = Store(summary.store)
    phase = shards_phase(store)
    return {"workers": workers, "load_average_at_start": load, "plan_s": round(plan_s, 2), "run_wall_s": round(wall, 2),
            "shards_phase_s": round(phase, 2), "frames_per_s": round(frames / phase, 3),
            "commit_in_run_s": round(store.done_info("correspond", "_complete")["finalize_s"], 3),
            "worker_rss": sampler.summary(), "store": str(summary.store)}


def rebuild_parts(store: Store) -> None:
    """The part files the shards wrote (the runner deleted them after the commit), from the committed pairs."""
    off = store.offsets("pairs")
    for s, (a, b) in enumerate(store.raw_attrs["shards"]):
        rows = slice(int(off[a]), int(off[b]))
        store.write_part("correspond", s, counts=np.diff(off[a:b + 1]),
                         **{k.replace("/", "__"): store.array(k)[rows] for k in PAIR_ARRAYS})


def old_single_writer_commit(store: Store) -> None:
    """The pairs commit before the parallel one (the baseline): every part in memory, one sequential writer."""
    num_shards = len(store.raw_attrs["shards"])
    parts = [store.read_part("correspond", s) for s in range(num_shards)]
    counts = np.concatenate([p["counts"] for p in parts])
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    store.set_dims(K=int(offsets[-1]))
    store.create_array("pairs/offsets", overwrite=True)[:] = offsets
    for name in PAIR_ARRAYS:
        arr = store.create_array(name, overwrite=True)
        block = (arr.shards or arr.chunks)[0]
        buffered, start, held = [], 0, 0
        for values in (p[name.replace("/", "__")] for p in parts):
            buffered.append(values)
            held += len(values)
            if held >= block:
                data = np.concatenate(buffered)
                n = held // block * block
                arr[start:start + n] = data[:n]
                start += n
                buffered, held = [data[n:]], held - n
        if held:
            arr[start:start + held] = np.concatenate(buffered)


def _commit_on_cluster(store_dir: str) -> None:
    CorrespondStage().finalize(Store(store_dir, mode="a"), map_tasks)


def tiled_parts_store(cache: Path, frames: int, shard_size: int) -> str:
    """A store planned for ``frames`` copies of the keyframe whose correspond parts are the keyframe's real
    pairs, tiled (the pairs commit at N frames without running correspond N times)."""
    one = run_labels("nuscenes", cache / "one", "correspond", data_root=FIXTURE, split="all", workers=0,
                     progress=False)
    src = Store(one.store)
    pairs = {k.replace("/", "__"): src.array(k)[:] for k in PAIR_ARRAYS}
    images = int(src.offsets("images")[-1])
    store = plan_store(build_adapter("nuscenes", FIXTURE, split="all", replicate=frames),
                       cache / "nuscenes-all.zarr", shard_size)
    for s, (a, b) in enumerate(store.raw_attrs["shards"]):
        n = b - a
        part = {k: np.concatenate([v] * n) for k, v in pairs.items()}
        part["pairs__image"] = part["pairs__image"] + np.repeat(np.arange(a, b, dtype=np.int32) * images,
                                                                len(pairs["pairs__image"]))
        store.write_part("correspond", s, counts=np.full(n, len(pairs["pairs__point"]), np.int64), **part)
    return str(store.path)


COMMIT_VARIANTS = ("old_single_writer_s", "fsync_of_the_pairs_s", "parallel_in_process_s", "parallel_1_workers_s",
                   "parallel_2_workers_s")


def commit_variants(store_dir: str, repeat: int) -> dict:
    """Time every commit variant on the store's parts (which must exist), side by side, ``repeat`` times; all must
    write the same pairs. Returns each variant's median and every repeat."""
    from distributed import Client, LocalCluster
    want, repeats = [], []

    def timed(out, name, fn):
        t0 = time.perf_counter()
        fn()
        out[name] = round(time.perf_counter() - t0, 3)
        want.append(pairs_digest(Store(store_dir)))
        if want[-1] != want[0]:
            raise RuntimeError(f"{name}: the committed pairs differ from the old single writer's")

    for _ in range(repeat):
        out = {"load_average_at_start": os.getloadavg()}
        timed(out, "old_single_writer_s", lambda: old_single_writer_commit(Store(store_dir, mode="a")))
        # the old writer never fsynced; the new commit does (before the parts may be deleted): its share
        timed(out, "fsync_of_the_pairs_s", lambda: Store(store_dir).sync(("pairs/offsets",) + PAIR_ARRAYS))
        timed(out, "parallel_in_process_s", lambda: CorrespondStage().finalize(Store(store_dir, mode="a")))
        for workers in (1, 2):
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as \
                    cluster, Client(cluster) as client:
                client.register_plugin(worker_plugin())  # what the runner's cluster does to its workers
                client.submit(sum, [1]).result()  # workers up before the clock starts
                timed(out, f"parallel_{workers}_workers_s",
                      lambda: client.submit(_commit_on_cluster, store_dir).result())
        out["old_over_2_workers"] = round(out["old_single_writer_s"] / out["parallel_2_workers_s"], 3)
        repeats.append(out)
        print(f"  commit: {out}", flush=True)
    store = Store(store_dir)
    pairs = int(store.offsets("pairs")[-1])
    Store(store_dir, mode="a").remove_parts("correspond")
    medians = {k: round(float(np.median([r[k] for r in repeats])), 3)
               for k in COMMIT_VARIANTS + ("old_over_2_workers",)}
    return {"pairs": pairs, "zarr_shards": -(-pairs // store.array("pairs/point").shards[0]), "median": medians,
            "repeats": repeats}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=2000, help="copies of the keyframe (N)")
    p.add_argument("--shard-size", type=int, default=32, help="frames per work shard (the nuScenes default)")
    p.add_argument("--commit-frames", type=int, default=None,
                   help="also time the pairs commit at this many frames, on the keyframe's parts tiled "
                        "(correspond itself is not run that many times)")
    p.add_argument("--repeat", type=int, default=3, help="repeats of the side-by-side measures (medians reported)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_scale.json"))
    p.add_argument("--keep", action="store_true")
    a = p.parse_args()
    if not (FIXTURE / "v1.0-mini").exists():
        raise SystemExit(f"the nuScenes fixture is not at {FIXTURE} (set CNS_SHARED_DATA)")
    if a.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    tmp = Path(tempfile.mkdtemp(prefix="cns-bench-scale-"))
    result = {"frames": a.frames, "shard_size": a.shard_size, "repeat": a.repeat, "cpu_count": os.cpu_count(),
              "load_average_at_start": os.getloadavg(), "machine": platform.platform(), "runs": []}
    try:
        for r in range(a.repeat):
            pair = []
            for workers in (1, 2):
                run = correspond_run(tmp / f"r{r}w{workers}", a.frames, workers, a.shard_size)
                pair.append(run)
                print(f"correspond, repeat {r}, {workers} worker(s): load {run['load_average_at_start']}, plan "
                      f"{run['plan_s']} s, {run['frames_per_s']} frames/s over {run['shards_phase_s']} s, commit in the "
                      f"run {run['commit_in_run_s']} s, worker RSS {run['worker_rss']}", flush=True)
            pair[1]["ratio_2_to_1"] = round(pair[1]["frames_per_s"] / pair[0]["frames_per_s"], 3)
            result["runs"].extend(pair)
            if r < a.repeat - 1:
                for run in pair:
                    shutil.rmtree(run.pop("store"), ignore_errors=True)
        result["ratio_2_to_1"] = round(float(np.median([run["ratio_2_to_1"] for run in result["runs"]
                                                        if "ratio_2_to_1" in run])), 3)
        result["frames_per_s_median"] = {w: round(float(np.median([run["frames_per_s"] for run in result["runs"]
                                                                   if run["workers"] == w])), 3) for w in (1, 2)}
        store_dir = result["runs"][-2]["store"]
        sizes = {g: array_bytes(Store(store_dir), g) for g in GROUPS}  # data files, not zarr.json
        result["bytes_per_frame"] = {g: round(b / a.frames) for g, b in sizes.items()}
        result["bytes_per_frame"]["total"] = round(sum(sizes.values()) / a.frames)
        rebuild_parts(Store(store_dir, mode="a"))
        result["commit"] = commit_variants(store_dir, a.repeat)
        print(f"ratio 2:1 workers (median) {result['ratio_2_to_1']}; bytes per frame {result['bytes_per_frame']}; "
              f"commit (medians) {result['commit']['median']}", flush=True)
        if a.commit_frames and a.commit_frames != a.frames:
            result["commit_tiled"] = {"frames": a.commit_frames,
                                      **commit_variants(tiled_parts_store(tmp / "tiled", a.commit_frames,
                                                                          a.shard_size), a.repeat)}
            print(f"commit at {a.commit_frames} frames (the keyframe's parts tiled), medians: "
                  f"{result['commit_tiled']['median']}")
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        for run in result["runs"]:
            run.pop("store", None)
        result["load_average_at_end"] = os.getloadavg()
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"written {a.out}")
    finally:
        if a.keep:
            print(f"stores kept under {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
