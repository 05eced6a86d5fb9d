"""Correspondence speed on the real fixtures: one nuScenes sweep with 6 cameras, one ScanNet scene.

    python bench/bench_correspond.py [--repeat 50]

Times the projection alone (loading excluded), single-threaded numpy, and prints milliseconds per frame.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pipeline.datasets import build_adapter  # noqa: E402
from pipeline.stages.correspond import CorrespondStage  # noqa: E402

DATA = Path(os.environ.get("CNS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def time_frame(adapter, repeat: int) -> list[float]:
    frame = adapter.load(0)
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        CorrespondStage._pairs(frame, adapter, adapter.image_size, 0)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    rows = []
    for name, root in (("nuscenes", DATA / "nuscenes_sample"), ("scannet", DATA / "scannet_sample")):
        adapter = build_adapter(name, root, split="all")
        ms = time_frame(adapter, args.repeat)
        frame = adapter.load(0)
        rows.append((name, len(frame.xyz), len(frame.images), statistics.median(ms), min(ms)))
    print(f"{'dataset':<9} {'points':>7} {'images':>6} {'median ms':>10} {'min ms':>7}")
    for r in rows:
        print(f"{r[0]:<9} {r[1]:>7} {r[2]:>6} {r[3]:>10.2f} {r[4]:>7.2f}")


if __name__ == "__main__":
    main()
