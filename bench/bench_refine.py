"""SAM max-voting (Eq. 4): the vectorised vote vs the per-mask loop, side by side, on CPU.

One 224x416 image, 200 SAM-like masks (random rectangles painted smallest-last, so overlaps resolve as the
``sam`` stage's do), 16 classes, 10% ignore. Targets: vectorised >= 50x faster than the loop and < 5 ms.

    python bench/bench_refine.py [--masks 200] [--repeats 20] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from pipeline.refine import sam_max_vote, sam_max_vote_loop


def sam_like_case(h: int, w: int, num_masks: int, num_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = np.full((h, w), -1, np.int32)
    boxes = []
    for _ in range(num_masks):
        bh, bw = rng.integers(4, h // 2), rng.integers(4, w // 2)
        y, x = rng.integers(0, h - bh), rng.integers(0, w - bw)
        boxes.append((bh * bw, y, x, bh, bw))
    for m, (_, y, x, bh, bw) in enumerate(sorted(boxes, reverse=True)):  # larger first: smaller masks win
        ids[y:y + bh, x:x + bw] = m
    labels = rng.integers(0, num_classes, size=(h, w)).astype(np.uint8)
    labels[rng.random((h, w)) < 0.1] = 255
    return torch.from_numpy(labels), torch.from_numpy(ids)


def timeit(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--height", type=int, default=224)
    p.add_argument("--width", type=int, default=416)
    p.add_argument("--masks", type=int, default=200)
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: per-worker cost)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    labels, ids = sam_like_case(a.height, a.width, a.masks, a.classes)
    visible = int(len(torch.unique(ids[ids >= 0])))
    vec = sam_max_vote(labels, ids, a.classes)
    loop = sam_max_vote_loop(labels, ids, a.classes)
    assert torch.equal(vec, loop), "vectorised and loop results differ"
    t_vec = timeit(lambda: sam_max_vote(labels, ids, a.classes), a.repeats)
    t_loop = timeit(lambda: sam_max_vote_loop(labels, ids, a.classes), max(3, a.repeats // 4))
    mv, ml = statistics.median(t_vec) * 1e3, statistics.median(t_loop) * 1e3
    print(f"image {a.height}x{a.width}, {a.masks} masks ({visible} visible), {a.classes} classes, "
          f"torch threads {a.threads}, {torch.__version__}")
    print(f"vectorised (one bincount): median {mv:8.3f} ms  (min {min(t_vec) * 1e3:.3f} ms, n={len(t_vec)})")
    print(f"per-mask loop            : median {ml:8.3f} ms  (min {min(t_loop) * 1e3:.3f} ms, n={len(t_loop)})")
    print(f"speed-up: {ml / mv:6.1f}x   targets: >= 50x {'OK' if ml / mv >= 50 else 'MISSED'}, "
          f"< 5 ms {'OK' if mv < 5 else 'MISSED'}")


if __name__ == "__main__":
    main()
