"""SAM per-image cost of the ``sam`` stage: encoder / decoder / everything else, upstream vs batched generator.

Runs the ``sam`` stage (``process_shard``, so the wall time is the stage's: reading, generator, id map, feature
grid, projection, writing) on one image with the real architecture and random weights, once per row:

* ``upstream / training`` — segment-anything's ``SamAutomaticMaskGenerator`` on the 224x416 image;
* ``batched / training`` — :class:`pipeline.models.sam.BatchedMaskGenerator` on the same image (its id map
  must equal upstream's: checked);
* ``batched / source`` — the batched generator on the 900x1600 source image, masks made at 224x416 (the
  stage's default, ``input: source``).

"network forwards" = image encoder + prompt encoder + mask decoder forward passes (timed around the calls,
CUDA synchronised); "everything else" = the stage's wall time minus those. Thresholds 0 (random weights
predict IoU ~0: the official thresholds would drop every mask and no bookkeeping would run), box NMS 0.7.

Then bf16 autocast vs float32 for the batched generator (on this machine's CPU: no GPU here), and the
projected GPU-hours for nuScenes from the FLOPs of vit_h (counted on the meta device) and a stated GPU
throughput. Results: ``bench/results/sam.json``.

    python bench/bench_sam.py [--points-per-side 32] [--model vit_b] [--rows upstream/training,...]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench_stages import FIXTURE, make_store, run_stage
from pipeline.datasets.base import DatasetAdapter
from pipeline.models import sam as ms

NUSCENES_IMAGES = 205_000  # 34 149 keyframes x 6 cameras (the paper's nuScenes; issue 12)
# GPU throughput assumption: the SAM project's FAQ (segment-anything.com, "How long does inference take?"):
# "The image encoder takes ~0.15 seconds on an NVIDIA A100 GPU" (ViT-H, one 1024x1024 image).
A100_VIT_H_ENCODER_S = 0.15
UPSTREAM_GPU_S = (5.6, "segment-anything issue #61: ~5.6 s per image for SamAutomaticMaskGenerator.generate with the "
                       "default parameters on an RTX 3090 (6+ s on an RTX 3070)")
ROWS = ("upstream/training", "batched/training", "batched/source")
RESULTS = Path(__file__).resolve().parent / "results" / "sam.json"


class OneFrame(DatasetAdapter):
    """The bench store's single frame, whose source image is the 900x1600 camera image."""

    name = "bench-source"

    def __init__(self, image, token):
        super().__init__(None)
        self.image, self.token = image, token

    def source_images(self, index, token=None):
        return [self.image]


def camera_image() -> tuple[np.ndarray, str]:
    path = FIXTURE / "samples" / "CAM_FRONT"
    files = sorted(path.glob("*.jpg")) if path.is_dir() else []
    if files:
        return np.asarray(Image.open(files[0]).convert("RGB")), str(files[0])
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (900 // 50, 1600 // 50, 3), dtype=np.uint8).repeat(50, 0).repeat(50, 1)
    return img, "synthetic blocky 900x1600 image (nuScenes fixture not found)"


def run_row(row: str, source: np.ndarray, tmp: Path, a) -> tuple[dict, np.ndarray]:
    generator, image_input = row.split("/")
    training = np.asarray(Image.fromarray(source).resize((416, 224), Image.BILINEAR))
    store = make_store(tmp / f"{generator}-{image_input}.zarr", training[None], frames=1)
    adapter = OneFrame(source, "bench-00000") if image_input == "source" else None
    stats, wall, prep = run_stage(store, "sam", 1, adapter=adapter, model_type=a.model, random_init=True,
                                  input=image_input, generator=generator, points_per_side=a.points_per_side,
                                  pred_iou_thresh=0.0, stability_score_thresh=0.0, pca_sample_images=1,
                                  batch_size=1)
    net = stats["encoder_s"] + stats["decoder_s"]
    res = {"generator": generator, "input": image_input,
           "sam_input_hw": list(source.shape[:2] if image_input == "source" else training.shape[:2]),
           "output_hw": [224, 416], "wall_s": round(wall, 2), "encoder_s": round(stats["encoder_s"], 2),
           "decoder_s": round(stats["decoder_s"], 2), "everything_else_s": round(wall - net, 2),
           "everything_else_share": round((wall - net) / wall, 4), "masks_in_id_map": stats["masks"],
           "prepare_s": round(prep, 1)}
    print(f"  {row:18s} wall {wall:7.1f} s  encoder {stats['encoder_s']:6.1f} s  decoder {stats['decoder_s']:6.1f} s  "
          f"everything else {wall - net:6.1f} s ({100 * (wall - net) / wall:4.1f} %)  ids {stats['masks']}",
          flush=True)
    return res, store.array("sam/mask_id")[0]


def best_match_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    if len(a) == 0 or len(b) == 0:
        return float(len(a) == len(b))
    a, b = a.flatten(1).float(), b.flatten(1).float()
    inter = a @ b.T
    return float((inter / (a.sum(1)[:, None] + b.sum(1)[None] - inter).clamp(min=1)).max(dim=1).values.mean())


def bf16_effect(source: np.ndarray, a) -> dict:
    """The batched generator under bf16 autocast vs float32, same image and settings (CPU here)."""
    sam, _ = ms.build_sam(a.model, random_init=True)
    opts = dict(points_per_side=a.bf16_points, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    out = {}
    for bf16 in (False, True):
        gen = ms.BatchedMaskGenerator(sam, bf16=bf16, **opts)
        t0 = time.perf_counter()
        out[bf16] = gen.generate([source], output_size=(224, 416), grid_size=(35, 64))[0]
        out[f"t{bf16}"] = time.perf_counter() - t0
    f, b = out[False], out[True]
    res = {"device": "cpu", "points_per_side": a.bf16_points,
           "embedding_relative_error": round(float((f["embedding"] - b["embedding"]).norm()
                                                   / f["embedding"].norm()), 5),
           "masks_float32": len(f["masks"]), "masks_bf16": len(b["masks"]),
           "mean_best_match_iou_float32_to_bf16": round(best_match_iou(f["masks"], b["masks"]), 4),
           "mean_best_match_iou_bf16_to_float32": round(best_match_iou(b["masks"], f["masks"]), 4),
           "id_map_pixels_equal": round(float((f["id_map"] == b["id_map"]).float().mean()), 4),
           "wall_s_float32": round(out["tFalse"], 1), "wall_s_bf16": round(out["tTrue"], 1)}
    print(f"  bf16 vs float32 ({a.bf16_points}x{a.bf16_points} points, CPU): {res}", flush=True)
    return res


def flops(model_type: str) -> tuple[float, float]:
    """(encoder FLOPs per 1024x1024 image, prompt encoder + mask decoder FLOPs per point prompt), counted with
    ``torch.utils.flop_counter`` on the meta device (no computation; the prompt encoder's few FLOPs left out)."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = ms.sam_config(model_type)
    with torch.device("meta"):
        sam = ms.sam_from_config(cfg)
    size, dim = cfg["image_size"], cfg["prompt_embed_dim"]
    grid = size // cfg["vit_patch_size"]
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        emb = sam.image_encoder(torch.empty(1, 3, size, size, device="meta"))
    enc = fc.get_total_flops()
    n = 64
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        sam.mask_decoder(emb, sam.prompt_encoder.get_dense_pe(), torch.empty(n, 2, dim, device="meta"),
                         torch.empty(n, dim, grid, grid, device="meta"), True)
    return float(enc), float(fc.get_total_flops()) / n


def projection(rows: dict, points_per_side: int) -> dict:
    enc_h, dec_h = flops("vit_h")
    rate = enc_h / A100_VIT_H_ENCODER_S
    prompts = points_per_side ** 2
    net_s = (enc_h + prompts * dec_h) / rate
    hours = lambda s: round(s * NUSCENES_IMAGES / 3600, 1)  # noqa: E731
    out = {
        "images": NUSCENES_IMAGES, "model": "vit_h", "prompts_per_image": prompts,
        "vit_h_encoder_gflop": round(enc_h / 1e9, 1), "decoder_gflop_per_prompt": round(dec_h / 1e9, 3),
        "gpu_assumption": f"NVIDIA A100 at the rate the SAM FAQ's {A100_VIT_H_ENCODER_S} s per ViT-H encoder pass "
                          f"implies ({rate / 1e12:.1f} TFLOP/s achieved), for the encoder and the decoder alike",
        "network_s_per_image": round(net_s, 3), "network_gpu_hours": hours(net_s),
        "upstream_measured_elsewhere_s_per_image": UPSTREAM_GPU_S[0], "upstream_source": UPSTREAM_GPU_S[1],
        "upstream_gpu_hours": hours(UPSTREAM_GPU_S[0]),
    }
    for key, r in rows.items():  # upstream's bookkeeping is host-bound (RLE, deep copies): issue #61's figure
        if r["generator"] == "batched":  # device tensor operations: assumed to keep their CPU share on the GPU
            out[f"{key}_gpu_hours_if_else_share_holds"] = hours(net_s / (1 - r["everything_else_share"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_b")
    p.add_argument("--points-per-side", type=int, default=32)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--bf16-points", type=int, default=8, help="points per side of the bf16 comparison (0: skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    source, where = camera_image()
    print(f"CPU: {os.cpu_count()} cores visible, torch threads {a.threads}, torch {torch.__version__}; "
          f"SAM {a.model} (random weights), {a.points_per_side}x{a.points_per_side} prompts; image: {where}",
          flush=True)
    results = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "machine": platform.processor() or
               platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": a.threads, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "model": a.model, "weights": "random", "points_per_side": a.points_per_side,
               "thresholds": {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 0.7},
               "image": where, "rows": {}}
    tmp = Path(tempfile.mkdtemp(prefix="cns-bench-sam-"))
    ids = {}
    try:
        for row in [r.strip() for r in a.rows.split(",") if r.strip()]:
            if row not in ROWS:
                raise SystemExit(f"unknown row {row!r} (known: {', '.join(ROWS)})")
            results["rows"][row], ids[row] = run_row(row, source, tmp, a)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(results, indent=2) + "\n")  # partial results survive an interruption
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if "upstream/training" in ids and "batched/training" in ids:
        same = bool(np.array_equal(ids["upstream/training"], ids["batched/training"]))
        results["same_id_maps_upstream_batched"] = same
        print(f"  id maps of upstream and batched on the training image identical: {same}")
    if a.bf16_points:
        results["bf16"] = bf16_effect(source, a)
    results["projection_nuscenes"] = projection(results["rows"], a.points_per_side)
    print(json.dumps(results["projection_nuscenes"], indent=2))
    a.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {a.out}")


if __name__ == "__main__":
    main()
