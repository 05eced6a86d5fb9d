"""Cost per image of every 2D teacher, side by side in one run: the dense CLIP variants and the import.

Dense variants (``maskclip``, ``sclip``, ``clearclip``, ``naclip``, and ``naclip`` + PAMR): one random-weight
ViT-B/16 (the stage's ``random_init``: the cost does not depend on the weights) built once at 224x416; for each
variant its last block is swapped in and ``MaskCLIPPredictor.predict`` (image tower, scoring against 16 class
embeddings, upsampling, softmax, argmax; PAMR where named) runs on ``--images`` images one at a time after one
warm-up image. ``import``: the import stage's reading of one image's label and confidence PNGs (900x1600, nearest
resize to 224x416, the class-id check), the same images. Wall time per image (median), CPU, float32.

    python bench/bench_teachers.py [--images 4] [--threads N]   -> bench/results/teachers.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.models.dense import get_teacher  # noqa: E402
from pipeline.stages.base import build_stage  # noqa: E402
from pipeline.stages.import_labels import ImportFolder  # noqa: E402

H, W = 224, 416
NUM_CLASSES = 16  # nuScenes-lidarseg's 16 classes
RESULTS = Path(__file__).resolve().parent / "results" / "teachers.json"
ROWS = (("maskclip", {}, False), ("sclip", {}, False), ("clearclip", {}, False), ("naclip", {}, False),
        ("naclip", {}, True))


def images(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(n, H // 16, W // 16, 3), dtype=np.uint8)
    return blocks.repeat(16, axis=1).repeat(16, axis=2)


def time_dense(n: int) -> list[dict]:
    stage = build_stage("maskclip", random_init=True)
    pred = stage._build((H, W), "cpu")
    pred.set_text(torch.nn.functional.normalize(torch.randn(NUM_CLASSES, pred.model.embed_dim), dim=-1))
    imgs = images(n + 1)
    rows = []
    for name, options, pamr in ROWS:
        pred.model.last_block = get_teacher(name, **options)
        pred.pamr = pamr
        pred.predict(imgs[:1])  # warm-up
        times = []
        for i in range(1, n + 1):
            t0 = time.perf_counter()
            pred.predict(imgs[i:i + 1])
            times.append(time.perf_counter() - t0)
        rows.append({"teacher": name + (" + PAMR" if pamr else ""), "s_per_image": statistics.median(times),
                     "times_s": times})
        print(f"{rows[-1]['teacher']:<16} {rows[-1]['s_per_image']:.3f} s/image", flush=True)
    return rows


def time_import(n: int) -> dict:
    from PIL import Image
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        (Path(tmp) / "tok").mkdir()
        for i in range(n + 1):
            Image.fromarray(rng.integers(0, NUM_CLASSES, (900, 1600), dtype=np.uint8), mode="L").save(
                Path(tmp) / "tok" / f"CAM_{i}.png")
            Image.fromarray(rng.integers(0, 256, (900, 1600), dtype=np.uint8), mode="L").save(
                Path(tmp) / "tok" / f"CAM_{i}.conf.png")
        folder = ImportFolder(tmp)
        times = []
        for i in range(n + 1):
            t0 = time.perf_counter()
            folder.read_label("tok", f"CAM_{i}", (H, W), NUM_CLASSES)
            folder.read_png("tok", f"CAM_{i}", ".conf.png", (H, W))
            if i:  # the first is the warm-up
                times.append(time.perf_counter() - t0)
    row = {"teacher": "import", "s_per_image": statistics.median(times), "times_s": times}
    print(f"{'import':<16} {row['s_per_image']:.3f} s/image", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows = time_dense(args.images) + [time_import(args.images)]
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "images": args.images,
           # the machine's 1-minute load average before and after: other jobs share the cores
           "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
           "resolution": [H, W], "classes": NUM_CLASSES, "weights": "random ViT-B/16 (open_clip, random_init)",
           "device": "cpu", "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows,
           "command": "python bench/bench_teachers.py " + " ".join(sys.argv[1:])}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1))
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
