"""The performance suite: every figure the project claims, each beside its reference, into ``bench/results/perf.json``.

    python bench/perf.py [--tiny | --full] [--parts refine,stages,correspond,synthetic,train] [--out PATH]

``make bench`` runs it. Each part runs in its own Python process, so that its thread count is set before torch
and numpy load and its peak resident memory is its own; the parts reuse the functions of the other bench
scripts (``bench_refine``, ``bench_stages``, ``bench_sam``, ``bench_correspond``, ``bench_synthetic``,
``bench_train``). Absolute times on a shared machine drift, so every figure is measured side by side with a
reference in the same process and the JSON keeps the ratio; ``ratio_def`` says which way it is taken.

Parts (threads):

* ``refine`` (1): the Eq. 4 vote, :func:`pipeline.refine.sam_max_vote` vs the per-mask loop, on a 224x416
  image with 200 SAM-like masks (target: >= 50x).
* ``stages`` (2): images/s of the ``maskclip`` (ViT-B/16), ``sam`` (vit_b, batched generator) and ``refine``
  stages, and the share of each stage's wall time in its network forwards (the vote, for ``refine``): the
  reference is the forwards alone; then the cache's bytes per image of every per-point/-image/-pair array
  beside its uncompressed size. Random weights (timing only). On CPU SAM runs 8x8 prompts (``--full``: 32x32).
* ``correspond`` (1): milliseconds per sweep of the correspondences on the nuScenes keyframe and the ScanNet
  scene of ``../shared/data`` (``CNS_SHARED_DATA``; skipped with the reason when absent) and on a synthetic
  street; the reference is loading (or generating) that frame.
* ``synthetic`` (1): generation of a synthetic street frame (reference: its LiDAR sweep alone) and room
  (reference: the street frame).
* ``train`` (torch's default threads, 2 loader workers): trainer steps/s with the CPU variants on a
  nuScenes-shaped toy store (reference: the loader alone) and the data-wait share of a step.

Every part adds ``rss.<part>.peak_mib``: its process's peak RSS beside the RSS after its imports.
``--tiny`` (the test's mode: tiny random models, small sizes, few repeats) only checks that the suite runs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _p in (str(BENCH), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

RESULTS = BENCH / "results" / "perf.json"
PARTS = ("refine", "stages", "correspond", "synthetic", "train")
THREADS = {"refine": 1, "stages": 2, "correspond": 1, "synthetic": 1, "train": None}  # None: torch's default
MODES = ("tiny", "default", "full")
CACHE_BUDGET = 600_000  # bytes per image (issue 10 of the cache: 0.6 MB)


def figure(name: str, value, unit: str, reference: str, reference_value, ratio_def: str, notes: str,
           target: str | None = None, skipped: str | None = None) -> dict:
    """One figure. ``ratio_def`` is ``"reference/value"`` or ``"value/reference"``; ``target`` a condition on
    ``value`` or ``ratio`` such as ``"ratio >= 50"``."""
    ratio = None
    if value is not None and reference_value is not None:
        a, b = (reference_value, value) if ratio_def == "reference/value" else (value, reference_value)
        ratio = a / b if b else math.inf
    fig = {"name": name, "value": value, "unit": unit, "reference": reference, "reference_value": reference_value,
           "ratio": ratio, "ratio_def": ratio_def, "notes": notes}
    if target:
        field, op, bound = target.split()
        got = fig[field]
        fig["target"] = target
        fig["target_met"] = None if got is None else (got >= float(bound) if op == ">=" else got <= float(bound))
    if skipped:
        fig["skipped"] = skipped
    return fig


def alternate(fns: dict, rounds: int, repeats: dict) -> dict:
    """Median seconds of each function, timed in alternating rounds (``bench_refine.timeit`` per round) so a
    change of the machine's load hits every function alike."""
    from bench_refine import timeit
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k] += timeit(fn, repeats[k])
    return {k: statistics.median(v) for k, v in times.items()}


# -- parts --------------------------------------------------------------------------------------------------------
def part_refine(mode: str) -> list[dict]:
    import torch
    from bench_refine import sam_like_case

    from pipeline.refine import sam_max_vote, sam_max_vote_loop
    h, w, masks, classes = (56, 104, 40, 16) if mode == "tiny" else (224, 416, 200, 16)
    labels, ids = sam_like_case(h, w, masks, classes)
    if not torch.equal(sam_max_vote(labels, ids, classes), sam_max_vote_loop(labels, ids, classes)):
        raise AssertionError("the vectorised vote and the per-mask loop differ")
    rounds, rep = {"tiny": (2, 2), "default": (5, 20), "full": (10, 40)}[mode]
    t = alternate({"vec": lambda: sam_max_vote(labels, ids, classes),
                   "loop": lambda: sam_max_vote_loop(labels, ids, classes)},
                  rounds, {"vec": rep, "loop": max(1, rep // 10)})
    visible = int(len(torch.unique(ids[ids >= 0])))
    return [figure("refine.vote_ms", t["vec"] * 1e3, "ms per image", "the per-mask loop (sam_max_vote_loop)",
                   t["loop"] * 1e3, "reference/value",
                   f"{h}x{w} image, {masks} SAM-like masks ({visible} visible), {classes} classes, 10 % ignore, "
                   f"1 thread; results checked equal; medians of {rounds} alternating rounds", "ratio >= 50")]


def part_stages(mode: str) -> list[dict]:
    import bench_sam
    from bench_stages import H, W, add_sam_arrays, bytes_per_image, camera_images, correspond_store, \
        make_store, run_stage

    from data_cache.store import Store
    tiny = mode == "tiny"
    points = {"tiny": 4, "default": 8, "full": 32}[mode]
    model_opts = {"tiny": True} if tiny else {"random_init": True}
    out = []
    tmp = Path(tempfile.mkdtemp(prefix="cns-perf-"))
    try:
        store = correspond_store(tmp / "correspond")  # None without the nuScenes fixture
        if store is not None:
            images, frame = 6, "the real nuScenes keyframe through the correspond stage (points, pairs, 6 images)"
            data_kind = "real data"
        else:
            images = 2 if tiny else 6
            rgb, source = camera_images(images)
            frame = f"{images} images without points ({source}; nuScenes fixture not found)"
            data_kind = source
            store = make_store(tmp / "stages.zarr", rgb, frames=1)
        # maskclip
        st, wall, prep = run_stage(store, "maskclip", 1, batch_size=images, **model_opts)
        out.append(figure("stages.maskclip.images_per_s", st["images"] / wall, "images/s",
                          "the network forwards alone (images / forward seconds)", st["images"] / st["model_s"],
                          "value/reference",
                          f"ratio = share of the stage's wall time in network forwards; "
                          f"{'tiny model' if tiny else 'ViT-B/16'} at {H}x{W}, {st['images']} images in one batch, "
                          f"2 threads; text embeddings (prepare, once per store) {prep:.1f} s not included; {frame}"))
        # sam: the stage's defaults (batched generator, SAM on the 900x1600 source image, masks at 224x416)
        src, where = bench_sam.camera_image()
        where = Path(where).name if Path(where).is_file() else where
        a = argparse.Namespace(model="tiny" if tiny else "vit_b", points_per_side=points)
        res, _ = bench_sam.run_row("batched/source", src, tmp, a)
        net = res["encoder_s"] + res["decoder_s"]
        out.append(figure("stages.sam.images_per_s", 1 / res["wall_s"], "images/s",
                          "the network forwards alone (encoder + prompt encoder + decoder)", 1 / net,
                          "value/reference",
                          f"ratio = share of the stage's wall time in network forwards; {a.model} "
                          f"{'(tiny test model)' if tiny else '(random weights)'}, batched generator, "
                          f"{points}x{points} prompts{' (CPU-sized; --full: 32x32)' if mode == 'default' else ''}, "
                          f"thresholds 0, box NMS 0.7 (random weights: {res['masks_in_id_map']} mask(s) left in the id "
                          f"map), 1 image: {where}, masks at 224x416; encoder {res['encoder_s']} s, decoder "
                          f"{res['decoder_s']} s, wall {res['wall_s']} s; 2 threads"))
        # refine, on the maskclip store with SAM-like id maps and the sam stage's features
        sam_store = Store(tmp / "batched-source.zarr")  # the store bench_sam.run_row wrote
        add_sam_arrays(store, sam_store, images, regions=100)
        st, wall, _ = run_stage(store, "refine", 1)
        out.append(figure("stages.refine.images_per_s", st["images"] / wall, "images/s",
                          "the vote alone (images / vote seconds)", st["images"] / st["vote_s"], "value/reference",
                          f"ratio = share of the stage's wall time in the vote (the rest: zarr read and write); "
                          f"{st['images']} images at {H}x{W}, 100-region SAM-like id maps, 2 threads"))
        # cache bytes per image
        sizes = bytes_per_image(store, images)
        why = {"sam/mask_id": "a 100-region SAM-like (Voronoi) map", "sam/feat": f"{a.model} random-weight features",
               "clip/feat": "random-weight features", "clip/label": "random-weight labels",
               "clip/confidence": "random-weight confidences", "clip/label_refined": "random-weight labels refined"}
        for name, (disk, raw) in sizes.items():
            out.append(figure(f"cache.bytes_per_image.{name}", disk, "bytes", "uncompressed (zarr nbytes / images)",
                              raw, "reference/value",
                              f"ratio = compression; {why.get(name, data_kind)}; {frame}"))
        disk = sum(d for d, _ in sizes.values())
        raw = sum(r for _, r in sizes.values())
        out.append(figure("cache.bytes_per_image.total", disk, "bytes", "uncompressed", raw, "reference/value",
                          f"ratio = compression; budget {CACHE_BUDGET} bytes per image; {len(sizes)} arrays: "
                          f"{', '.join(sizes)}; {frame}", f"value <= {CACHE_BUDGET}"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def part_correspond(mode: str) -> list[dict]:
    from bench_correspond import DATA, time_frame
    from bench_refine import timeit

    from pipeline.datasets import build_adapter
    from pipeline.datasets.synthetic import SyntheticDataset
    repeat = {"tiny": 2, "default": 50, "full": 200}[mode]
    out = []
    for name, unit, root, marker in (("nuscenes", "sweep", DATA / "nuscenes_sample", "v1.0-mini/sample.json"),
                                     ("scannet", "scene", DATA / "scannet_sample", "points/scene0000_00.bin")):
        fig = f"correspond.{name}_ms_per_{unit}"
        if not (root / marker).exists():
            out.append(figure(fig, None, f"ms per {unit}", "loading the frame", None, "reference/value", "",
                              skipped=f"fixture not found at {root} (set CNS_SHARED_DATA)"))
            continue
        adapter = build_adapter(name, root, split="all")
        ms = statistics.median(time_frame(adapter, repeat))
        load_ms = statistics.median(timeit(lambda: adapter.load(0), max(2, repeat // 10))) * 1e3
        frame = adapter.load(0)
        out.append(figure(fig, ms, f"ms per {unit}", "loading the frame (adapter.load: files read and decoded)",
                          load_ms, "reference/value",
                          f"ratio = load / correspondences; {len(frame.xyz)} points, {len(frame.images)} images "
                          f"({'occlusion test on depth' if name == 'scannet' else 'LiDAR'}), 1 thread, median of "
                          f"{repeat}; real fixture {root.name}"))
    street = SyntheticDataset(kind="street", num_scenes=1, cache_size=0)
    ms = statistics.median(time_frame(street, repeat))
    gen_ms = statistics.median(timeit(lambda: street.load(0), 1 if mode == "tiny" else 3)) * 1e3
    frame = street.load(0)
    out.append(figure("correspond.synthetic_street_ms_per_sweep", ms, "ms per sweep",
                      "generating the frame (layout, LiDAR, 6 cameras)", gen_ms, "reference/value",
                      f"ratio = generation / correspondences; {len(frame.xyz)} points, {len(frame.images)} images at "
                      f"224x416, 1 thread, median of {repeat}"))
    return out


def part_synthetic(mode: str) -> list[dict]:
    from bench_synthetic import _time

    from pipeline.datasets.synthetic import SyntheticDataset
    from pipeline.synthetic import street
    n = {"tiny": 1, "default": 5, "full": 10}[mode]
    street_data = SyntheticDataset(kind="street", num_scenes=n, cache_size=0)
    lidar = SyntheticDataset(kind="street", num_scenes=n)
    street_data.load(0)  # warm-up: imports, class tables
    t_street, _, frame = _time(street_data.load, n)
    t_lidar, _, sweep = _time(lambda i: street.lidar_sweep(street.build_street_scene(lidar.scene_rng(i, 0)), 0.0,
                                                           lidar.scene_rng(i, 1)), n)
    frames = 2 if mode == "tiny" else 16
    t_room, _, room = _time(SyntheticDataset(kind="indoor", num_scenes=n, cache_size=0,
                                             frames_per_room=frames).load, n)
    return [figure("synthetic.street_frame_s", t_street, "s per frame", "its layout and LiDAR sweep alone", t_lidar,
                   "value/reference", f"ratio = frame / LiDAR sweep (the rest: 6 cameras at 224x416); "
                   f"{len(frame.xyz)} points; mean of {n} streets, 1 thread"),
            figure("synthetic.indoor_room_s", t_room, "s per room", "a street frame, same run", t_street,
                   "value/reference", f"{frames} RGB-D frames at 240x320 and their fusion ({len(room.xyz)} points); "
                   f"mean of {n} rooms, 1 thread")]


def part_train(mode: str) -> list[dict]:
    from bench_train import measure
    sizes = dict(image_size=(64, 96), sam_grid=(8, 12), point_stride=48) if mode == "tiny" else {}
    frames, epochs, steps = {"tiny": (2, 2, 1), "default": (8, 3, 4), "full": (16, 4, 12)}[mode]
    r = measure(frames=frames, epochs=epochs, steps=steps, workers=2, **sizes)
    steady = r["epochs"][1:] or r["epochs"]
    done = sum(e["steps"] for e in steady)
    wait, busy = sum(e["wait_s"] for e in steady), sum(e["busy_s"] for e in steady)
    shape = "64x96 (tiny)" if mode == "tiny" else "224x416"
    common = (f"synthetic_street_cpu networks on a nuScenes-shaped toy store ({frames} frames, 6 cameras at {shape}), "
              f"batch 1, 2 loader workers, torch threads {r['torch_threads']}; epochs 2..{epochs} of {steps} steps")
    return [figure("train.steps_per_s", done / (wait + busy), "steps/s", "the loader alone (frames/s, batch 1)",
                   r["loader_frames_per_s"], "reference/value", f"ratio = loader headroom; {common}"),
            figure("train.data_wait_ms_per_step", 1e3 * wait / done, "ms per step",
                   "a whole step (data wait + compute)", 1e3 * (wait + busy) / done, "value/reference",
                   f"ratio = data-wait share of step time (after each epoch's first step: "
                   f"{r['steady_wait_share_after_first_step']:.4f}); {common}; RSS growth over the epochs "
                   f"{r['rss_growth_mib']} MiB", "ratio <= 0.05")]


# -- driver --------------------------------------------------------------------------------------------------------
def machine() -> dict:
    import numpy
    import torch
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": model, "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads_default": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "numpy": numpy.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "loadavg_start": list(os.getloadavg())}


def run_part(part: str, mode: str, out: Path) -> None:
    """In the part's own process: its figures and its peak RSS beside the RSS after its imports."""
    import torch
    from bench_train import rss_mib
    if THREADS[part]:
        torch.set_num_threads(THREADS[part])
    threads = torch.get_num_threads()
    fn = globals()[f"part_{part}"]
    base = rss_mib()
    t0 = time.perf_counter()
    figures = fn(mode)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    workers = (f"; its largest loader worker {children:.0f} MiB (forked: counts the pages it shares with the "
               f"trainer)") if part == "train" else ""
    figures.append(figure(f"rss.{part}.peak_mib", peak, "MiB", "the process's RSS after its imports", base,
                          "value/reference", f"peak RSS of the {part} part's process (getrusage ru_maxrss){workers}"))
    for f in figures:
        f.update(part=part, threads=threads)
    out.write_text(json.dumps({"figures": figures, "wall_s": wall}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tiny", action="store_true", help="tiny models and sizes: checks the suite runs (tests)")
    g.add_argument("--full", action="store_true", help="the big configurations (SAM 32x32 prompts, longer runs)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--run-part", choices=PARTS, help=argparse.SUPPRESS)  # internal: one part in this process
    p.add_argument("--part-out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    mode = "tiny" if a.tiny else "full" if a.full else "default"
    if a.run_part:
        run_part(a.run_part, mode, a.part_out)
        return 0
    parts = [s.strip() for s in a.parts.split(",") if s.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)} (known: {', '.join(PARTS)})")
    flag = {"tiny": " --tiny", "full": " --full", "default": ""}[mode]
    result = {"machine": machine(), "mode": mode, "command": "python bench/perf.py" + flag, "parts": {},
              "figures": []}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    failed = []
    for part in parts:
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env.pop(var, None)
            if THREADS[part]:
                env[var] = str(THREADS[part])
        print(f"[perf] {part} ({mode}) ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            part_out = Path(tmp) / "part.json"
            t0 = time.perf_counter()
            rc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--run-part", part, "--part-out",
                                 str(part_out)] + ([flag.strip()] if flag else []), env=env, cwd=REPO).returncode
            if rc or not part_out.exists():
                failed.append(part)
                result["parts"][part] = {"error": f"exit status {rc}", "wall_s": round(time.perf_counter() - t0, 1)}
            else:
                got = json.loads(part_out.read_text())
                for f in got["figures"]:
                    f["command"] = f"python bench/perf.py --parts {part}{flag}"
                result["figures"] += got["figures"]
                result["parts"][part] = {"wall_s": round(got["wall_s"], 1), "threads": got["figures"][0]["threads"]}
        result["machine"]["loadavg_end"] = list(os.getloadavg())
        a.out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")  # partial results survive
    print(f"\n{'figure':48s} {'value':>12s} {'unit':14s} {'reference':>12s} {'ratio':>8s}")
    for f in result["figures"]:
        if f.get("skipped"):
            print(f"{f['name']:48s} skipped: {f['skipped']}")
            continue
        target = f" target {f['target']}: {'met' if f['target_met'] else 'MISSED'}" if "target" in f else ""
        print(f"{f['name']:48s} {f['value']:12.4g} {f['unit']:14s} {f['reference_value']:12.4g} "
              f"{f['ratio']:8.3g}{target}")
    print(f"written {a.out}; load average {result['machine']['loadavg_start']} -> "
          f"{result['machine']['loadavg_end']}")
    if failed:
        print(f"FAILED parts: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
