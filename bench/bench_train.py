"""Trainer benchmark on a nuScenes-shaped toy store (6 cameras at 224x416, ~30k points per sweep, E=512,
D=64, SAM grid 36x64): data-loading wait share per step with 2 loader workers (target <= 5 %), loader-only
throughput, resident memory across epochs, and steps/s of the CPU network variants.

    python bench/bench_train.py [--frames 8] [--epochs 3] [--steps 4] [--workers 2] [--store PATH]

The numbers it prints are the measurement; nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_store(path: Path, frames: int, image_size=(224, 416), sam_grid=(36, 64), point_stride: int = 12) -> Path:
    from tests.toy_store import build_toy_store
    classes = tuple(f"class{i:02d}" for i in range(16))
    t = time.perf_counter()
    build_toy_store(path, num_frames=frames, num_images=6, image_size=image_size, class_names=classes,
                    text_dim=512, sam_dim=64, sam_grid=sam_grid, point_stride=point_stride, seed=0)
    print(f"built {path} ({frames} frames) in {time.perf_counter() - t:.1f} s")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="training steps per epoch")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--store", type=Path, default=None, help="an existing store instead of building one")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    results = measure(args.frames, args.epochs, args.steps, args.workers, args.batch_size, args.store, args.device)
    print(json.dumps(results, indent=1))
    target = "met" if results["steady_wait_share"] <= 0.05 else "NOT met"
    print(f"data-loading wait share {results['steady_wait_share'] * 100:.1f} % of step time (target <= 5 %: {target})")


def measure(frames: int = 8, epochs: int = 3, steps: int = 4, workers: int = 2, batch_size: int = 1,
            store: Path | None = None, device: str = "cpu", image_size=(224, 416), sam_grid=(36, 64),
            point_stride: int = 12) -> dict:
    """Build the store (unless given), time the loader alone and the trainer's epochs; returns the results."""
    import torch
    from torch.utils.data import DataLoader

    from data_cache.store import Store
    from train.config import load_config
    from train.data import CacheFrameDataset, collate_offsets, worker_init
    from train.engine import Trainer

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    store = store or build_store(tmp / "nuscenes_shaped.zarr", frames, image_size, sam_grid, point_stride)
    st = Store(store)
    print(f"store: {st.offsets('points')[-1] / (len(st.offsets('points')) - 1):.0f} points/frame, "
          f"{st.array('images/rgb').shape[1:3]} images, {st.offsets('images')[-1]} images")
    overrides = {"schedule.epochs": epochs, "schedule.warmup_epochs": max(1, epochs // 2),
                 "schedule.max_steps_per_epoch": steps, "schedule.log_interval": 1, "eval.interval": 0,
                 "eval.at_end": False, "data.num_workers": workers, "data.batch_size": batch_size}
    cfg = load_config("synthetic_street_cpu", overrides)
    results = {"workers": workers, "batch_size": batch_size, "torch_threads": torch.get_num_threads()}

    # 1) the loader alone: how fast can 2 workers deliver frames?
    ds = CacheFrameDataset([store], cfg, train=True)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                        collate_fn=collate_offsets, worker_init_fn=worker_init)
    t = time.perf_counter()
    n = 0
    for i, batch in enumerate(loader):
        if i == 0:
            t_first = time.perf_counter() - t
            t = time.perf_counter()
        else:
            n += len(batch["point_offset"]) - 1
    dt = time.perf_counter() - t
    results["loader_first_batch_s"] = round(t_first, 3)
    results["loader_frames_per_s"] = round(n / dt, 2) if n else None
    t = time.perf_counter()
    for i in range(min(4, len(ds))):
        ds[i]
    results["single_process_item_s"] = round((time.perf_counter() - t) / min(4, len(ds)), 3)

    # 2) training with the CPU variants: wait share per step, steps/s, RSS per epoch
    trainer = Trainer(cfg, [store], tmp / "run", device=device, progress=False)
    per_epoch = []
    for epoch in range(epochs):
        trainer.cfg["schedule"]["epochs"] = epochs
        trainer.start_epoch = epoch
        trainer.train(stop_after_epochs=epoch + 1)
        timing = trainer.last_epoch_timing
        done = timing["steps"]
        total = timing["wait_s"] + timing["busy_s"]
        per_epoch.append({"epoch": epoch + 1, "stage": 1 if epoch < cfg["schedule"]["warmup_epochs"] else 2,
                          "wait_share": round(timing["wait_s"] / total, 4),
                          # the first batch of an epoch waits for the sampler's new order to be loaded
                          "wait_share_after_first_step": round((timing["wait_s"] - timing["first_wait_s"])
                                                               / max(total - timing["first_wait_s"], 1e-9), 4),
                          "steps_per_s": round(done / (timing["wait_s"] + timing["busy_s"]), 3),
                          "steps": done, "wait_s": round(timing["wait_s"], 4), "busy_s": round(timing["busy_s"], 4),
                          "rss_mib": round(rss_mib(), 1)})
        print(json.dumps(per_epoch[-1]))
    results["epochs"] = per_epoch
    # the first epoch pays the worker start-up; the steady state is the later epochs
    steady = per_epoch[1:] or per_epoch
    results["steady_wait_share"] = round(sum(e["wait_share"] for e in steady) / len(steady), 4)
    results["steady_wait_share_after_first_step"] = round(
        sum(e["wait_share_after_first_step"] for e in steady) / len(steady), 4)
    results["steady_steps_per_s"] = round(sum(e["steps_per_s"] for e in steady) / len(steady), 3)
    results["rss_growth_mib"] = round(per_epoch[-1]["rss_mib"] - per_epoch[0]["rss_mib"], 1)
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)  # the built store and the run
    return results


if __name__ == "__main__":
    main()
