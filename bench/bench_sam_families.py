"""Per-image CPU cost of each SAM family's generator, side by side in one run (random weights).

One 224x416 image (seeded noise: with random weights the content does not matter), ``points_per_side`` 16
(256 point prompts), masks made at 224x416 and the embedding resampled to the store's 35x64 SAM grid — what
the ``sam`` stage's ``label_images`` does per image. Each row builds the real architecture with random
weights (``random_init``), runs the generator once (warm-up: lazy initialisations, the first allocations)
and then ``--repeats`` more times; ``s_per_image`` is the mean of those. Thresholds 0 and box NMS 0.7, as in
bench/bench_sam.py: random weights predict IoU ~0, so the official thresholds would drop every mask and skip
the per-mask work a trained model does. Rows:

* ``vit_b / batched`` — SAM ViT-B, the project's batched generator (the paper's family, smallest model);
* ``hq_vit_b / batched`` — HQ-SAM ViT-B, the batched generator with the HQ decoder;
* ``sam2.1_hiera_tiny / batched`` and ``/ upstream`` — SAM 2.1 Hiera-T, the batched generator and the sam2
  package's ``SAM2AutomaticMaskGenerator`` (primed with the same single encoder pass);
* ``sam2.1_hiera_large / batched`` with ``--large``.

    python bench/bench_sam_families.py [--repeats 1] [--large]   ->  bench/results/sam_families.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.models.sam import feature_grid  # noqa: E402
from pipeline.models.sam_families import family_of  # noqa: E402

OUT = Path(__file__).parent / "results" / "sam_families.json"
HW = (224, 416)
THRESHOLDS = dict(points_per_side=16, points_per_batch=64, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                  box_nms_thresh=0.7)


def run_row(model: str, kind: str, image: np.ndarray, repeats: int) -> dict:
    fam = family_of(model)
    t0 = time.perf_counter()
    net, _ = fam.build(model, random_init=True)
    build_s = time.perf_counter() - t0
    gen = fam.generator(net, kind, **THRESHOLDS)
    grid = feature_grid(HW)
    t0 = time.perf_counter()
    gen.label_images([image], HW, grid)
    warm_s = time.perf_counter() - t0
    gen.timings.clear()
    walls, masks = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        ids, feat = gen.label_images([image], HW, grid)[0]
        walls.append(time.perf_counter() - t0)
        masks = int(ids.max()) + 1
    row = {"model": model, "family": fam.name, "generator": kind, "params_m": round(sum(p.numel() for p in
           net.parameters()) / 1e6, 1), "build_s": round(build_s, 2), "first_call_s": round(warm_s, 2),
           "s_per_image": round(float(np.mean(walls)), 2),
           "encoder_s_per_image": round(gen.timings.get("encoder", 0.0) / repeats, 2),
           "decoder_s_per_image": round(gen.timings.get("decoder", 0.0) / repeats, 2),
           "visible_masks": masks, "feat_shape": list(feat.shape)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--large", action="store_true", help="also sam2.1_hiera_large (slow on CPU)")
    a = p.parse_args()
    image = np.random.default_rng(0).integers(0, 256, (*HW, 3), dtype=np.uint8)
    rows = [("vit_b", "batched"), ("hq_vit_b", "batched"), ("sam2.1_hiera_tiny", "batched"),
            ("sam2.1_hiera_tiny", "upstream")] + ([("sam2.1_hiera_large", "batched")] if a.large else [])
    t0 = time.time()
    results = [run_row(m, k, image, a.repeats) for m, k in rows]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)),
        "command": "python bench/bench_sam_families.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads; load average at start {os.getloadavg()[0]:.1f}",
        "image": list(HW), "thresholds": THRESHOLDS, "rows": results}, indent=1) + "\n")
    print(f"-> {OUT}")


if __name__ == "__main__":
    main()
