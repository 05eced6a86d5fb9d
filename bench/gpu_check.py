"""The CUDA path, measured: correctness against CPU references and speed at the paper's sizes, in one command.

Three modes (``make gpu-check PREPARE=1`` / ``make gpu-check`` / ``make gpu-check DRY=1``):

* ``--prepare`` (here, where the project is installed and PyPI is reachable): downloads the wheels the GPU
  machine lacks into ``.whl/`` (:data:`WHEELS`, Python 3.12, manylinux x86-64; numpy is NOT carried: the
  check runs with the machine's numpy 2) and computes the CPU float32 references into ``.gpu_ref/`` (both
  git-ignored); prints the carry list, its size with the working tree (must stay under 64 MiB) and the one
  command to run there.
* (no flag, on the GPU machine): needs CUDA; checks and measures, writes ``bench/results/gpu.json``.
* ``--dry``: the same code on CPU at tiny sizes (its own tiny references in a temporary folder, spconv instead
  of spconv-triton, tiny SAM / CLIP, a few steps), so the script cannot rot; writes ``--out`` only.

Weights are random but **deterministic across machines and torch versions** (:func:`fill_deterministic`:
a closed-form sine pattern per tensor, not the RNG), so the references need no weight files.

Figures (``gpu.json``; every one is also defined under ``definitions``):

* ``correctness.net3d``: the 3D network (``minkunet34``, sparse backend ``spconv_triton``, eval mode) on the
  carried voxel batch vs spconv's CPU output: ``rel_l2`` = ||gpu - cpu|| / ||cpu|| (pass: < ``TOL_3D``) and
  ``max_abs``.
* ``correctness.sam``: the batched generator (float32, TF32 off) on the carried image vs the CPU id map:
  ``id_map_pixels_equal`` (share of pixels with the same id; pass: >= ``TOL_SAM_PIXELS``), mask counts, and
  ``embedding_rel_l2`` of the image embedding.
* ``correctness.maskclip``: labels on CUDA vs CPU: ``labels_equal`` (share of pixels; pass: >=
  ``TOL_CLIP_PIXELS``), ``confidence_max_abs`` (uint8 units).
* ``speed.train_<dataset>``: :class:`train.engine.Trainer` with AMP on a toy store of the paper's sizes
  (nuScenes: 6 images 224x416 and ~33k points per frame; ScanNet: 16 images 240x320, ~47k points),
  DeepLabV3-ResNet50 and
  minkunet34 with random weights, batch 2: ``steps_per_s`` (measured epoch, after a warm-up epoch),
  ``data_wait_share`` (time waiting for the loader / step wall time), ``peak_gpu_mib``
  (``torch.cuda.max_memory_allocated``).
* ``speed.sam.bf16_<off|on>``: the batched generator, vit_h, random weights, 32x32 prompts, one 900x1600 image
  (masks at 224x416): ``s_per_image`` (mean wall time of ``generate``), ``outside_forwards_share`` (1 -
  (encoder + decoder forwards) / wall).
* ``speed.maskclip.bf16_<off|on>``: ``images_per_s`` at 224x416, batch 32 (ViT-B/16, float32 and bf16).
* ``projection``: ``label_gpu_hours_nuscenes`` = 205 000 images x (SAM s/image (bf16) + 1 / MaskCLIP images/s)
  / 3600 on this GPU; ``train_20_epochs_hours_nuscenes`` = 20 x 28 130 frames / (steps/s x batch 2) / 3600.

    python bench/gpu_check.py --prepare            # here
    python bench/gpu_check.py [--out PATH]         # on the GPU machine (see the command --prepare prints)
    python bench/gpu_check.py --dry --out /tmp/gpu_dry.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS = REPO / "bench" / "results" / "gpu.json"
REF_DIR = REPO / ".gpu_ref"
WHEEL_DIR = REPO / ".whl"
CARRY_LIMIT = 64 * 2 ** 20
#: What the GPU machine lacks among the check's imports (its image holds torch, torchvision, triton, numpy 2,
#: pillow, pyyaml, filelock, timm, huggingface-hub, safetensors, regex, tqdm, click, matplotlib, tensorboard,
#: opencv-python-headless). Versions: the ones this project is tested with. Not spconv-cu118 (~70 MB).
WHEELS = ("zarr==3.1.5", "numcodecs==0.16.6", "donfig==0.8.1.post1", "google-crc32c==1.9.0",
          "open_clip_torch==3.3.0", "ftfy==6.3.1", "wcwidth==0.9.4", "segment-anything==1.0", "spconv-triton==1.0.0")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
RUN_COMMAND = ("python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && "
               "PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 "
               "python3 bench/gpu_check.py --ref .gpu_ref --out $OUT/gpu.json")
TOL_3D = 1e-2          # relative L2: TF32 / reordered sums over ~30 layers stay well inside it
TOL_SAM_PIXELS = 0.98  # id maps are discrete: a near-tie between masks may flip a few pixels
TOL_CLIP_PIXELS = 0.99
#: random weights predict IoU ~0: the official thresholds would drop every mask (as bench/bench_sam.py)
SAM_THRESHOLDS = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 0.7}
NUSCENES_IMAGES = 205_000   # 34 149 keyframes x 6 cameras (bench_sam.py)
NUSCENES_TRAIN_FRAMES = 28_130  # the train split's keyframes

#: Sizes per mode. ``budget_s``: the time box of each timed loop.
SIZES = {
    "real": {"ref3d": {"net": "minkunet34", "points": 12_000, "extent": 512},
             "ref_sam": {"model": "vit_b", "points_per_side": 8, "image_hw": (900, 1600), "out_hw": (224, 416)},
             "ref_clip": {"model": "ViT-B-16", "images": 2, "hw": (224, 416)},
             "train": {"nuscenes": {"images": 6, "hw": (224, 416), "point_stride": 11, "frames": 6,
                                    "sam_grid": (36, 64)},
                       "scannet": {"images": 16, "hw": (240, 320), "point_stride": 16, "frames": 4,
                                   "sam_grid": (48, 64)},
                       "net2d": "deeplabv3_resnet50", "net3d": "minkunet34", "warm_steps": 3, "steps": 15,
                       "workers": 6},
             "sam": {"model": "vit_h", "points_per_side": 32, "image_hw": (900, 1600), "out_hw": (224, 416),
                     "repeats": 2},
             "clip": {"model": "ViT-B-16", "batch": 32, "hw": (224, 416), "budget_s": 15}},
    "dry": {"ref3d": {"net": "spunet_small", "points": 600, "extent": 40},
            "ref_sam": {"model": "tiny", "points_per_side": 4, "image_hw": (90, 160), "out_hw": (45, 80)},
            "ref_clip": {"model": "tiny", "images": 2, "hw": (32, 48)},
            "train": {"nuscenes": {"images": 2, "hw": (32, 48), "point_stride": 12, "frames": 2, "sam_grid": (4, 6)},
                      "scannet": {"images": 3, "hw": (32, 40), "point_stride": 12, "frames": 2, "sam_grid": (4, 5)},
                      "net2d": "unet_small", "net3d": "spunet_small", "warm_steps": 1, "steps": 2, "workers": 0},
            "sam": {"model": "tiny", "points_per_side": 4, "image_hw": (90, 160), "out_hw": (45, 80), "repeats": 1},
            "clip": {"model": "tiny", "batch": 2, "hw": (32, 48), "budget_s": 0.5}},
}


# -- deterministic weights ------------------------------------------------------------------------------
def fill_deterministic(module: torch.nn.Module, salt: int = 0) -> torch.nn.Module:
    """Every floating parameter := a sine pattern (float64, cast), the same on any machine and torch version.

    Matrices / kernels: amplitude sqrt(3 / fan_in) (variance 1.5 / fan_in), fan_in = numel / shape[0];
    vectors named ``*weight`` (norm scales): 1 + 0.1 sin; other vectors and scalars: 0.02 sin. BatchNorm
    running statistics: mean 0, variance 1. Returns ``module``."""
    with torch.no_grad():
        for i, (name, p) in enumerate(module.named_parameters()):
            if not p.is_floating_point():
                continue
            n = p.numel()
            wave = torch.sin(torch.arange(n, dtype=torch.float64) * 0.7548776662 + 0.37 * (i + salt))
            if p.ndim >= 2:
                val = wave * math.sqrt(3.0 / max(1, n // p.shape[0]))
            elif name.endswith("weight"):
                val = 1.0 + 0.1 * wave
            else:
                val = 0.02 * wave
            p.copy_(val.reshape(p.shape).to(p.dtype))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.zero_()
            elif name.endswith("running_var"):
                b.fill_(1.0)
    return module


# -- the three networks, as both machines build them ------------------------------------------------------
def build_net3d(name: str, device: str, backend: str):
    from train.models import MODELS_3D
    return fill_deterministic(MODELS_3D.get(name)(4, device=device, sparse_backend=backend)).to(device).eval()


def voxel_batch(points: int, extent: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``index`` int32 [V, 4] (frame, x, y, z), unique, two frames; ``feat`` float32 [V, 4]: a street-like
    sheet (ground plane plus boxes) so that the sparse convolutions see neighbours."""
    rng = np.random.default_rng(seed)
    xy = rng.integers(0, extent, (points, 2))
    z = np.where(rng.random(points) < 0.6, 0, rng.integers(0, max(2, extent // 16), points))
    idx = np.unique(np.column_stack([np.arange(points) % 2, xy, z]), axis=0).astype(np.int32)
    feat = np.column_stack([rng.random(len(idx)), idx[:, 1:] / extent]).astype(np.float32)
    return idx, feat


def build_sam_generator(model: str, points: int, device: str, bf16: bool = False):
    from pipeline.models import sam as ms
    sam, _ = ms.build_sam("vit_b" if model == "tiny" else model, tiny=model == "tiny", random_init=model != "tiny")
    fill_deterministic(sam)
    gen = ms.BatchedMaskGenerator(sam.to(device), bf16=bf16, points_per_side=points, **SAM_THRESHOLDS)
    return gen


def build_clip(model: str, hw, device: str):
    from pipeline.models.maskclip import MaskCLIPPredictor, build_maskclip
    m, _, _ = build_maskclip(model, image_size=tuple(hw), tiny=model == "tiny",
                             random_init=model != "tiny")
    fill_deterministic(m)
    text = torch.sin(torch.arange(10 * m.embed_dim, dtype=torch.float64).reshape(10, -1) * 1.3).float()
    text = torch.nn.functional.normalize(text, dim=1)
    return MaskCLIPPredictor(m.to(device).eval(), text)


def test_image(hw, seed: int = 1) -> np.ndarray:
    """A blocky uint8 RGB image [H, W, 3] (no fixture file needed): 18x32 blocks, smooth shading inside."""
    h, w = hw
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (18, 32, 3)).astype(np.float32)
    img = np.kron(blocks, np.ones((math.ceil(h / 18), math.ceil(w / 32), 1)))[:h, :w]
    shade = np.linspace(0.7, 1.0, w, dtype=np.float32)[None, :, None]
    return (img * shade).clip(0, 255).astype(np.uint8)


# -- references (CPU, float32) ----------------------------------------------------------------------------
def prepare_references(ref: Path, sizes: dict) -> dict:
    """CPU float32 outputs of the three networks on fixed inputs -> ``ref``/{net3d,sam,maskclip}.npz."""
    ref.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    r3 = sizes["ref3d"]
    idx, feat = voxel_batch(r3["points"], r3["extent"])
    net = build_net3d(r3["net"], "cpu", "spconv")
    t = time.perf_counter()
    out = net(torch.from_numpy(feat), torch.from_numpy(idx), 2).numpy()
    np.savez(ref / "net3d.npz", index=idx, feat=feat, out=out, net=r3["net"])
    print(f"net3d {r3['net']}: {len(idx)} voxels -> {out.shape} in {time.perf_counter() - t:.1f} s (spconv, CPU)")
    rs = sizes["ref_sam"]
    image = test_image(rs["image_hw"])
    gen = build_sam_generator(rs["model"], rs["points_per_side"], "cpu")
    t = time.perf_counter()
    res = gen.generate([image], output_size=rs["out_hw"])[0]
    np.savez_compressed(ref / "sam.npz", image=image, id_map=res["id_map"].numpy(), masks=len(res["masks"]),
                        embedding=res["embedding"].float().numpy(), **{k: np.asarray(v) for k, v in rs.items()})
    print(f"sam {rs['model']}: {len(res['masks'])} masks in {time.perf_counter() - t:.1f} s (CPU float32)")
    rc = sizes["ref_clip"]
    images = np.stack([test_image(rc["hw"], seed=2 + i) for i in range(rc["images"])])
    labels, conf = build_clip(rc["model"], rc["hw"], "cpu").predict(images)
    np.savez_compressed(ref / "maskclip.npz", images=images, labels=labels, confidence=conf, model=rc["model"])
    meta = {"torch": torch.__version__, "numpy": np.__version__, "made": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                          time.gmtime())}
    (ref / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_net3d(ref: Path, device: str, backend: str) -> dict:
    d = np.load(ref / "net3d.npz")
    net = build_net3d(str(d["net"]), device, backend)
    with torch.no_grad():
        out = net(torch.from_numpy(d["feat"]).to(device), torch.from_numpy(d["index"]).to(device), 2).float().cpu()
    want = torch.from_numpy(d["out"])
    rel = _rel_l2(out, want)
    return {"net": str(d["net"]), "backend": backend, "voxels": int(len(d["index"])), "rel_l2": round(rel, 7),
            "max_abs": round(float((out - want).abs().max()), 6), "tolerance_rel_l2": TOL_3D, "pass": rel < TOL_3D}


def check_sam(ref: Path, device: str) -> dict:
    d = np.load(ref / "sam.npz")
    gen = build_sam_generator(str(d["model"]), int(d["points_per_side"]), device)
    res = gen.generate([d["image"]], output_size=tuple(int(v) for v in d["out_hw"]))[0]
    same = float((res["id_map"].cpu().numpy() == d["id_map"]).mean())
    emb = _rel_l2(res["embedding"].float().cpu(), torch.from_numpy(d["embedding"]))
    return {"model": str(d["model"]), "points_per_side": int(d["points_per_side"]), "masks_cpu": int(d["masks"]),
            "masks_device": len(res["masks"]), "id_map_pixels_equal": round(same, 5),
            "embedding_rel_l2": round(emb, 7), "tolerance_pixels_equal": TOL_SAM_PIXELS,
            "pass": same >= TOL_SAM_PIXELS}


def check_maskclip(ref: Path, device: str) -> dict:
    d = np.load(ref / "maskclip.npz")
    images = d["images"]
    labels, conf = build_clip(str(d["model"]), images.shape[1:3], device).predict(images)
    same = float((labels == d["labels"]).mean())
    return {"model": str(d["model"]), "images": int(len(images)), "labels_equal": round(same, 5),
            "confidence_max_abs": int(np.abs(conf.astype(int) - d["confidence"].astype(int)).max()),
            "tolerance_labels_equal": TOL_CLIP_PIXELS, "pass": same >= TOL_CLIP_PIXELS}


# -- speed -------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def speed_train(dataset: str, sizes: dict, device: str, backend: str, work: Path) -> dict:
    """Steps/s, data wait share and peak GPU memory of the trainer (AMP on CUDA) on a toy store of the sizes."""
    from tests.toy_store import build_toy_store
    from train.config import load_config
    from train.engine import Trainer
    t, s = sizes["train"], sizes["train"][dataset]
    store = build_toy_store(work / f"{dataset}.zarr", num_frames=s["frames"], num_images=s["images"],
                            image_size=s["hw"], class_names=tuple(f"class{i:02d}" for i in range(16)), text_dim=512,
                            sam_dim=64, sam_grid=s["sam_grid"],
                            point_stride=s["point_stride"], seed=0)
    from data_cache.store import Store
    st = Store(store)
    points = st.offsets("points")[-1] / (len(st.offsets("points")) - 1)
    cfg = load_config(dataset, {
        "model.net2d": t["net2d"], "model.net3d": t["net3d"], "model.pretrained_2d": False,
        "model.sparse_backend": backend, "schedule.epochs": 2, "schedule.warmup_epochs": 1, "schedule.amp": True,
        "schedule.max_steps_per_epoch": max(t["steps"], t["warm_steps"]), "schedule.log_interval": 1000,
        "eval.interval": 0, "eval.at_end": False, "eval.bn_recalibration_images": 0, "data.num_workers": t["workers"],
        "data.images_per_frame": s["images"]})
    # the store's few frames listed again until an epoch holds the measured steps (ray-casting more is slow)
    repeat = math.ceil(max(t["steps"], t["warm_steps"]) * int(cfg["data"]["batch_size"]) / s["frames"])
    trainer = Trainer(cfg, [store] * repeat, work / f"run-{dataset}", device=device, progress=False)
    trainer.steps_per_epoch = t["warm_steps"]
    trainer.train(stop_after_epochs=1)  # warm-up: kernels compiled / autotuned, workers started
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    trainer.steps_per_epoch = t["steps"]
    trainer.start_epoch = 1
    trainer.train(stop_after_epochs=2)
    tm = trainer.last_epoch_timing
    wall = tm["wait_s"] + tm["busy_s"]
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.startswith("cuda") else None
    return {"images_per_frame": s["images"], "image_hw": list(s["hw"]), "points_per_frame": round(points),
            "batch_size": int(cfg["data"]["batch_size"]), "net2d": t["net2d"], "net3d": t["net3d"],
            "amp": trainer.amp, "steps": tm["steps"], "steps_per_s": round(tm["steps"] / wall, 3),
            "data_wait_share": round(tm["wait_s"] / wall, 4),
            "peak_gpu_mib": None if peak is None else round(peak)}


def speed_sam(sizes: dict, device: str) -> dict:
    """The batched generator with bf16 off and on (on CUDA only; CPU rows stay float32): one Sam, two generators."""
    from pipeline.models import sam as ms
    s = sizes["sam"]
    sam, _ = ms.build_sam("vit_b" if s["model"] == "tiny" else s["model"], tiny=s["model"] == "tiny",
                          random_init=s["model"] != "tiny", device=device)
    image = test_image(s["image_hw"])
    rows = {}
    for bf16 in (False, True):
        gen = ms.BatchedMaskGenerator(sam, bf16=bf16 and device.startswith("cuda"),
                                      points_per_side=s["points_per_side"], **SAM_THRESHOLDS)
        masks = len(gen.generate([image], output_size=s["out_hw"])[0]["masks"])  # warm-up
        walls, forwards = [], []
        for _ in range(s["repeats"]):
            gen.timings.clear()
            _sync(device)
            t = time.perf_counter()
            gen.generate([image], output_size=s["out_hw"])
            _sync(device)
            walls.append(time.perf_counter() - t)
            forwards.append(gen.timings.get("encoder", 0.0) + gen.timings.get("decoder", 0.0))
        rows[f"bf16_{'on' if bf16 else 'off'}"] = {
            "model": s["model"], "points_per_side": s["points_per_side"], "image_hw": list(s["image_hw"]),
            "masks_hw": list(s["out_hw"]), "bf16": gen.bf16, "masks": masks,
            "s_per_image": round(sum(walls) / len(walls), 4),
            "outside_forwards_share": round(1 - sum(forwards) / sum(walls), 4)}
    return rows


def speed_clip(sizes: dict, device: str) -> dict:
    """MaskCLIP images/s with bf16 off and on (CUDA only), each loop time-boxed to ``budget_s``."""
    s = sizes["clip"]
    pred = build_clip(s["model"], s["hw"], device)
    batch = np.stack([test_image(s["hw"], seed=i % 4) for i in range(s["batch"])])
    rows = {}
    for bf16 in (False, True):
        pred.bf16 = bf16 and device.startswith("cuda")
        pred.predict(batch)  # warm-up
        n, t0 = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - t0 < s["budget_s"]:
            pred.predict(batch)  # labels come back to the host: the stage's real cost
            n += 1
        dt = time.perf_counter() - t0
        rows[f"bf16_{'on' if bf16 else 'off'}"] = {"model": s["model"], "image_hw": list(s["hw"]), "batch": s["batch"],
                                                   "bf16": pred.bf16, "batches": n,
                                                   "images_per_s": round(n * s["batch"] / dt, 2)}
    return rows


def projection(speed: dict) -> dict:
    sam = speed["sam"]["bf16_on"]["s_per_image"]
    clip = 1.0 / speed["maskclip"]["bf16_off"]["images_per_s"]
    tr = speed["train_nuscenes"]
    frames_per_s = tr["steps_per_s"] * tr["batch_size"]
    return {"label_gpu_hours_nuscenes": round(NUSCENES_IMAGES * (sam + clip) / 3600, 2),
            "train_20_epochs_hours_nuscenes": round(20 * NUSCENES_TRAIN_FRAMES / frames_per_s / 3600, 2),
            "inputs": {"images": NUSCENES_IMAGES, "sam_s_per_image": sam, "maskclip_s_per_image": round(clip, 5),
                       "train_frames": NUSCENES_TRAIN_FRAMES, "train_frames_per_s": round(frames_per_s, 3)}}


DEFINITIONS = {
    "correctness.net3d.rel_l2": "||out_gpu - out_cpu||_2 / ||out_cpu||_2 of the 3D net's per-voxel features "
                                "(deterministic weights, eval mode); CPU = spconv, carried from --prepare",
    "correctness.sam.id_map_pixels_equal": "share of pixels whose mask id equals the CPU float32 id map "
                                           "(batched generator, float32, TF32 off)",
    "correctness.sam.embedding_rel_l2": "relative L2 error of the image embedding grid vs CPU",
    "correctness.maskclip.labels_equal": "share of pixels whose MaskCLIP label equals the CPU label",
    "speed.train_*.steps_per_s": "training steps per second of wall time in the measured epoch (after a warm-up "
                                 "epoch), loader wait included; a step = one batch of batch_size frames",
    "speed.train_*.data_wait_share": "time the step loop waited for the DataLoader / wall time of the epoch",
    "speed.train_*.peak_gpu_mib": "torch.cuda.max_memory_allocated during the measured epoch, MiB",
    "speed.sam.bf16_*.s_per_image": "wall seconds of BatchedMaskGenerator.generate on one image (mean of repeats)",
    "speed.sam.bf16_*.outside_forwards_share": "1 - (image encoder + prompt encoder + mask decoder forwards) / wall",
    "speed.maskclip.bf16_*.images_per_s": "images per second of MaskCLIPPredictor.predict, labels on the host",
    "projection.label_gpu_hours_nuscenes": "205000 images x (SAM s/image with bf16 + 1/MaskCLIP images/s) / 3600",
    "projection.train_20_epochs_hours_nuscenes": "20 x 28130 frames / (steps/s x batch size) / 3600, one GPU",
}


# -- the modes -----------------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    import triton
    env = {"device": device, "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "numpy": np.__version__, "triton": triton.__version__,
           "cpu_count": os.cpu_count()}
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2 ** 30, 1), sm_count=p.multi_processor_count)
    for pkg in ("spconv_triton", "spconv", "zarr", "open_clip", "segment_anything"):
        try:
            mod = __import__(pkg)
            env[pkg] = getattr(mod, "__version__", "installed")
        except ImportError:
            env[pkg] = None
    return env


def run_check(mode: str, ref: Path, out: Path) -> dict:
    sizes = SIZES[mode]
    device = "cuda" if mode == "real" else "cpu"
    if mode == "real" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (run with --dry on CPU)")
    backend = "spconv_triton" if device == "cuda" else "spconv"  # spconv-triton has no CPU kernels
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 correctness
    t0 = time.perf_counter()
    res = {"command": " ".join(["bench/gpu_check.py"] + sys.argv[1:]), "mode": mode,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": environment(device),
           "reference": json.loads((ref / "meta.json").read_text()), "correctness": {}, "speed": {},
           "seconds": {}, "definitions": DEFINITIONS}

    def part(section: str, name: str, fn, *args):
        """Run one part; an exception is recorded as the part's result (the check goes on: one run, all facts)."""
        t = time.perf_counter()
        try:
            res[section][name] = fn(*args)
        except Exception as e:  # noqa: BLE001 — the report names it; the process exit code says it failed
            traceback.print_exc()
            res[section][name] = {"error": f"{type(e).__name__}: {e}"[:2000], "pass": False}
        res["seconds"][name] = round(time.perf_counter() - t, 1)
        print(f"[{time.perf_counter() - t0:6.1f} s] {section}.{name}: {json.dumps(res[section][name])}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(res, complete=False), indent=1) + "\n")  # what a time-out leaves

    part("correctness", "net3d", check_net3d, ref, device, backend)
    part("correctness", "sam", check_sam, ref, device)
    part("correctness", "maskclip", check_maskclip, ref, device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # speed: the defaults users run
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        for dataset in ("nuscenes", "scannet"):
            part("speed", f"train_{dataset}", speed_train, dataset, sizes, device, backend, Path(work))
    part("speed", "sam", speed_sam, sizes, device)
    part("speed", "maskclip", speed_clip, sizes, device)
    try:
        res["projection"] = projection(res["speed"])
    except (KeyError, ZeroDivisionError, TypeError) as e:  # a speed part failed: nothing to project from
        res["projection"] = {"error": f"{type(e).__name__}: {e}"}
    failed = [f"{sec}.{k}" for sec in ("correctness", "speed") for k, v in res[sec].items() if "error" in v]
    res["passed"] = not failed and all(v["pass"] for v in res["correctness"].values())
    res["failed_parts"] = failed
    res["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    res["complete"] = True
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"gpu_check {mode}: correctness {'PASSED' if res['passed'] else 'FAILED'}; "
          f"{res['seconds']['total']} s; -> {out}")
    return res


def download_wheels(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest),
           *WHEELS]
    subprocess.run(cmd, check=True)


def tree_bytes(repo: Path = REPO) -> int:
    """Bytes of the files git tracks plus the untracked files it does not ignore (what the device tool sends)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                           check=True, capture_output=True).stdout.split(b"\0")
    return sum((repo / f.decode()).stat().st_size for f in files if f and (repo / f.decode()).is_file())


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def carry_report(ref: Path, wheels: Path) -> dict:
    sizes = {"working_tree": tree_bytes(), str(wheels.relative_to(REPO)): folder_bytes(wheels),
             str(ref.relative_to(REPO)): folder_bytes(ref)}
    total = sum(sizes.values())
    return {"carry": [str(wheels.relative_to(REPO)), str(ref.relative_to(REPO))], "bytes": sizes, "total_bytes": total,
            "limit_bytes": CARRY_LIMIT, "fits": total < CARRY_LIMIT, "command": RUN_COMMAND}


def prepare(ref: Path, wheels: Path, dry: bool, fetch: bool) -> dict:
    if fetch:
        download_wheels(wheels)
    prepare_references(ref, SIZES["dry" if dry else "real"])
    rep = carry_report(ref, wheels)
    mib = {k: round(v / 2 ** 20, 2) for k, v in rep["bytes"].items()}
    print(f"carry (paths for the device tool's carry): {json.dumps(rep['carry'])}")
    print(f"sizes MiB: {mib}; total {rep['total_bytes'] / 2 ** 20:.2f} MiB of {CARRY_LIMIT / 2 ** 20:.0f} "
          f"({'fits' if rep['fits'] else 'TOO LARGE'})")
    print(f"run there (timeout 600 s):\n  {RUN_COMMAND}")
    if not rep["fits"]:
        raise SystemExit("gpu_check: the carry list is over 64 MiB")
    return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepare", action="store_true", help="download the wheels and compute the CPU references")
    ap.add_argument("--dry", action="store_true", help="CPU, tiny sizes (with --prepare: tiny references)")
    ap.add_argument("--ref", type=Path, default=REF_DIR, help="the references' folder")
    ap.add_argument("--wheels", type=Path, default=WHEEL_DIR)
    ap.add_argument("--no-download", action="store_true", help="--prepare without fetching the wheels")
    ap.add_argument("--out", type=Path, default=None, help=f"results JSON (default {RESULTS.relative_to(REPO)}; "
                                                            "--dry: a temporary file)")
    a = ap.parse_args(argv)
    if a.prepare:
        prepare(a.ref.resolve(), a.wheels.resolve(), a.dry, fetch=not a.no_download)
        return 0
    if a.dry:
        torch.set_num_threads(1)  # tiny sizes: more threads only contend (the test suite's 2-core machines)
        with tempfile.TemporaryDirectory(prefix="gpu_check_ref_") as tmp:
            prepare_references(Path(tmp), SIZES["dry"])
            torch.set_grad_enabled(True)
            res = run_check("dry", Path(tmp), a.out or Path(tmp) / "gpu_dry.json")
        return 0 if res["passed"] else 1
    res = run_check("real", a.ref, a.out or RESULTS)
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
