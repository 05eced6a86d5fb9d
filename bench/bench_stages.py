"""Throughput of the model stages with the real architectures (random weights), and the cache's bytes per image.

Builds a nuScenes-shaped store — the ``correspond`` stage on the real keyframe of
``../shared/data/nuscenes_sample`` when present (six 224x416 images, 34 688 points, their pairs), else
synthetic images without points — then:

1. ``maskclip`` — open_clip ViT-B/16 at 224x416: images/s and the share of the stage's wall time spent in
   the model's forward passes;
2. ``sam`` — SAM vit_b at 1024: images/s, encoder/decoder share of the wall time (random weights predict
   IoU ~0, so no mask survives the official thresholds: the decoder runs for every point prompt, the
   mask post-processing of kept masks is not exercised);
3. the shared single encoder pass vs the generator followed by a separate ``SamPredictor.set_image`` for the
   features (two encoder passes);
4. ``refine`` — images/s;
5. bytes per image of every per-point, per-image and per-pair array of the store (``sam/mask_id`` holds the random model's output, which is
   empty; a SAM-like map — ``--synthetic-masks`` Voronoi regions — is also written and measured, since real
   SAM maps are piecewise constant with ~100 regions).

Random weights are for timing only (``random_init=True``, an explicit benchmark flag of the stages).

    python bench/bench_stages.py [--images 6] [--sam-images 2] [--points-per-side 32] [--threads 2]
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data_cache.schema import RootAttrs
from data_cache.store import Store
from pipeline.stages.base import Shard, ShardContext, build_stage

H, W = 224, 416
NUSCENES16 = ["barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle", "pedestrian",
              "traffic_cone", "trailer", "truck", "driveable_surface", "other_flat", "sidewalk", "terrain",
              "manmade", "vegetation"]
FIXTURE = Path(os.environ.get("CNS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) \
    / "nuscenes_sample"
SAMPLE = FIXTURE / "samples"


def camera_images(n: int) -> tuple[np.ndarray, str]:
    from PIL import Image
    files = sorted(glob.glob(str(SAMPLE / "CAM_*" / "*.jpg")))
    if not files:
        rng = np.random.default_rng(0)
        base = rng.integers(0, 256, (n, H // 8, W // 8, 3), dtype=np.uint8).repeat(8, 1).repeat(8, 2)
        return base, "synthetic blocky images"
    imgs = [np.asarray(Image.open(files[i % len(files)]).convert("RGB").resize((W, H), Image.BILINEAR))
            for i in range(n)]
    return np.stack(imgs), f"{len(files)} nuScenes camera images (repeated to {n})"


def make_store(path: Path, rgb: np.ndarray, frames: int) -> Store:
    """A store of ``frames`` frames holding the images ``rgb`` [I, H, W, 3] (their size is the store's)."""
    n, h, w = rgb.shape[:3]
    store = Store.create(path, RootAttrs(dataset="nuscenes", split="bench", class_names=NUSCENES16,
                                         image_size=[h, w], point_features=["intensity"], capabilities=[],
                                         num_frames=frames))
    store.set_dims(F=frames, **{"F+1": frames + 1}, I=n, H=h, W=w, P=1, C=1)
    store.create_array("images/offsets")
    store.array("images/offsets")[:] = np.linspace(0, n, frames + 1).round().astype(np.int64)
    store.create_array("frames/token")[:] = np.array([f"bench-{i:05d}" for i in range(frames)])
    store.create_array("images/rgb")
    store.write_rows("images/rgb", 0, rgb)
    return store


def correspond_store(tmp: Path) -> Store | None:
    """The real nuScenes keyframe through the correspond stage (one frame, 6 images), or None without it."""
    if not (FIXTURE / "v1.0-mini").exists():
        return None
    from pipeline.runner import run_labels
    t0 = time.perf_counter()
    summary = run_labels("nuscenes", tmp, "correspond", data_root=FIXTURE, split="all", workers=0, progress=False)
    rep = summary.reports["correspond"]
    print(f"correspond (the real keyframe, {rep.stats.get('images', 0)} images, {rep.stats.get('points', 0)} points): "
          f"{rep.seconds:.2f} s for its shard ({rep.seconds / max(1, rep.stats.get('images', 1)):.2f} s per image); "
          f"{time.perf_counter() - t0:.1f} s with planning and the pairs commit")
    return Store(summary.store, mode="a")


def run_stage(store: Store, name: str, frames: int, adapter=None, **config):
    stage = build_stage(name, **config)
    t0 = time.perf_counter()
    stage.prepare(store, adapter)
    t_prep = time.perf_counter() - t0
    model = stage.get_model("cpu")
    ctx = ShardContext(store, Shard(0, 0, frames), adapter=adapter, model=model)
    t0 = time.perf_counter()
    stats = stage.process_shard(ctx)
    wall = time.perf_counter() - t0
    if ctx.failures:
        raise RuntimeError(ctx.failures[0]["traceback"])
    return stats, wall, t_prep


def voronoi_ids(n: int, regions: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    out = np.empty((n, H, W), np.int32)
    for i in range(n):
        c = rng.uniform([0, 0], [H, W], size=(regions, 2))
        d = (yy[..., None] - c[:, 0]) ** 2 + (xx[..., None] - c[:, 1]) ** 2
        ids = d.argmin(-1).astype(np.int32)
        ids[rng.random(regions)[ids] < 0.15] = -1  # some pixels in no mask
        out[i] = ids
    return out


def array_bytes(store: Store, name: str) -> int:
    root = store.path / name
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != "zarr.json")


def add_sam_arrays(store: Store, sam_store: Store, images: int, regions: int) -> None:
    """The ``sam/*`` arrays in ``store`` (whose images the sam stage did not see): a SAM-like id map of
    ``regions`` Voronoi regions per image, and ``sam_store``'s features and projection repeated over the images."""
    d = sam_store.dims()
    store.set_dims(h=d["h"], w=d["w"], S=d["S"], D=d["D"])
    for name in ("sam/mask_id", "sam/feat", "sam/proj", "sam/proj_mean"):
        store.create_array(name)
    store.write_rows("sam/mask_id", 0, voronoi_ids(images, regions))
    feats = sam_store.array("sam/feat")[:]
    store.write_rows("sam/feat", 0, np.concatenate([feats] * (images // len(feats) + 1))[:images])


def bytes_per_image(store: Store, images: int) -> dict[str, tuple[float, float]]:
    """``{array: (bytes on disk, bytes uncompressed)}`` per image, for every per-point, per-image and per-pair
    array of the store (``data_cache/schema.py``), each divided by the number of images."""
    from data_cache import schema
    out = {}
    for sp in schema.ARRAYS:
        if sp.ragged_axis is None or sp.name not in store:
            continue
        out[sp.name] = (array_bytes(store, sp.name) / images, store.array(sp.name).nbytes / images)
    return out


def shared_vs_separate(gen, image: np.ndarray, repeats: int = 1) -> tuple[float, float]:
    from segment_anything import SamAutomaticMaskGenerator, SamPredictor
    upstream = SamAutomaticMaskGenerator(gen.sam, **gen.thresholds)
    predictor = SamPredictor(gen.sam)
    t_shared, t_sep = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gen.generate_batch(image[None])
        t_shared.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        upstream.generate(image)
        predictor.set_image(image)
        predictor.get_image_embedding()
        t_sep.append(time.perf_counter() - t0)
    return min(t_shared), min(t_sep)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=6, help="images for maskclip/refine (one nuScenes frame = 6)")
    p.add_argument("--sam-images", type=int, default=2, help="images for the sam stage (slow on CPU)")
    p.add_argument("--points-per-side", type=int, default=32)
    p.add_argument("--sam-model", default="vit_b")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--synthetic-masks", type=int, default=100)
    p.add_argument("--skip-shared", action="store_true", help="skip the shared-vs-separate comparison")
    p.add_argument("--keep", action="store_true", help="keep the temporary store")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rgb, source = camera_images(max(a.images, a.sam_images))
    tmp = Path(tempfile.mkdtemp(prefix="cns-bench-"))
    print(f"CPU: {os.cpu_count()} cores visible, torch threads {a.threads}, torch {torch.__version__}; images: {source}")
    try:
        # -- maskclip ----------------------------------------------------------------------------------------
        store = correspond_store(tmp) if a.images == 6 else None
        if store is None:
            store = make_store(tmp / "nuscenes-bench.zarr", rgb[:a.images], frames=1)
        st, wall, prep = run_stage(store, "maskclip", 1, random_init=True, batch_size=a.images)
        print(f"maskclip ViT-B/16 @ {H}x{W}: {st['images'] / wall:6.2f} images/s  "
              f"(model forward {100 * st['model_s'] / wall:5.1f}% of {wall:.2f} s; read {st['read_s']:.3f} s, "
              f"write {st['write_s']:.3f} s; prepare incl. 85x16 prompts {prep:.1f} s)")

        # -- sam ---------------------------------------------------------------------------------------------
        sam_store = make_store(tmp / "nuscenes-sam.zarr", rgb[:a.sam_images], frames=1)
        st, wall, prep = run_stage(sam_store, "sam", 1, model_type=a.sam_model, random_init=True,
                                   points_per_side=a.points_per_side, pca_sample_images=a.sam_images,
                                   batch_size=a.sam_images, input="training")
        model_s = st["encoder_s"] + st["decoder_s"]
        print(f"sam {a.sam_model} @ 1024, {a.points_per_side}x{a.points_per_side} points: "
              f"{st['images'] / wall:6.3f} images/s  (network forwards {100 * model_s / wall:5.1f}% of {wall:.1f} s: "
              f"encoder {st['encoder_s']:.1f} s, decoder {st['decoder_s']:.1f} s; everything else "
              f"{st['other_s']:.2f} s, write {st['write_s']:.3f} s; masks kept {st['masks']}; "
              f"prepare/PCA {prep:.1f} s; bench/bench_sam.py splits this per generator)")
        if not a.skip_shared:
            gen = build_stage("sam", model_type=a.sam_model, random_init=True, generator="upstream",
                              points_per_side=a.points_per_side).get_model("cpu")
            t_sh, t_sep = shared_vs_separate(gen, rgb[0])
            print(f"one image, shared encoder pass {t_sh:.1f} s vs generator + separate predictor {t_sep:.1f} s: "
                  f"{t_sep / t_sh:.2f}x")

        # -- refine ------------------------------------------------------------------------------------------
        add_sam_arrays(store, sam_store, a.images, a.synthetic_masks)
        st, wall, _ = run_stage(store, "refine", 1)
        print(f"refine: {st['images'] / wall:6.1f} images/s (vote {100 * st['vote_s'] / wall:4.1f}% of {wall:.3f} s)")

        # -- bytes -------------------------------------------------------------------------------------------
        n = a.images
        print(f"\ncache bytes per {H}x{W} image (zarr defaults of data_cache/schema.py; {n} images):")
        total = 0
        for name, (b, _) in bytes_per_image(store, n).items():
            total += b
            note = {"sam/mask_id": f" (synthetic {a.synthetic_masks}-region SAM-like map)",
                    "sam/feat": " (random-weight features)",
                    "clip/feat": " (random-weight features)"}.get(name, "")
            print(f"  {name:20s} {b / 1e3:9.1f} KB{note}")
        empty = array_bytes(sam_store, "sam/mask_id") / a.sam_images
        print(f"  {'(sam/mask_id empty)':20s} {empty / 1e3:9.1f} KB (what the random model wrote)")
        print(f"  {'total':20s} {total / 1e6:9.3f} MB   (budget 0.6 MB) ; without images/rgb "
              f"{(total - array_bytes(store, 'images/rgb') / n) / 1e6:.3f} MB")
    finally:
        if a.keep:
            print(f"store kept at {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
