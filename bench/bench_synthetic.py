"""Generation speed of the synthetic dataset on one CPU core: ``python bench/bench_synthetic.py``.

Prints one row per case: seconds per frame (mean and best of ``--repeats``), points and images per frame.
A street frame is one LiDAR sweep with 6 cameras; an indoor frame is a room with its RGB-D trajectory.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads its BLAS: a single core, as the targets are stated

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.datasets.synthetic import SyntheticDataset  # noqa: E402
from pipeline.synthetic import street  # noqa: E402


def _time(make, repeats: int):
    seconds, result = [], None
    for i in range(repeats):
        start = time.perf_counter()
        result = make(i)
        seconds.append(time.perf_counter() - start)
    return np.mean(seconds), np.min(seconds), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--native", action="store_true", help="also time native-resolution rendering (slow)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = args.repeats
    cases = [
        ("street frame (LiDAR + 6 cams 224x416)", dict(kind="street")),
        ("indoor room (16 frames 240x320)", dict(kind="indoor", frames_per_room=16)),
    ]
    if args.native:
        cases += [("street frame, native 900x1600", dict(kind="street", native_resolution=True)),
                  ("indoor room, native 1296x968 + 640x480", dict(kind="indoor", native_resolution=True))]
    SyntheticDataset(kind="street", num_scenes=1).load(0)  # warm-up: imports, class tables
    rows = []
    for name, options in cases:
        data = SyntheticDataset(num_scenes=n, cache_size=0, **options)
        mean, best, frame = _time(data.load, n)
        rows.append((name, mean, best, len(frame.xyz), len(frame.images)))
    lidar = SyntheticDataset(kind="street", num_scenes=n)
    mean, best, sweep = _time(lambda i: street.lidar_sweep(street.build_street_scene(lidar.scene_rng(i, 0)), 0.0,
                                                           lidar.scene_rng(i, 1)), n)
    rows.append(("street LiDAR sweep only (layout + cast)", mean, best, len(sweep.xyz), 0))

    print(f"{'case':44s} {'mean s':>8s} {'best s':>8s} {'points':>8s} {'images':>7s}")
    for name, mean, best, points, images in rows:
        print(f"{name:44s} {mean:8.3f} {best:8.3f} {points:8d} {images:7d}")


if __name__ == "__main__":
    main()
