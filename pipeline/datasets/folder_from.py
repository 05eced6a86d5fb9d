"""Write any dataset adapter's frames in the folder layout (:mod:`pipeline.datasets.folder`).

``python -m pipeline.datasets.folder_from nuscenes|scannet|synthetic SRC DST [--split S] [--dataset-option K=V]``

The writer goes through the source adapter itself (:meth:`DatasetAdapter.load`), so the folder holds what the
adapter hands the pipeline: points (xyz and features, as the adapter scales them) in ``points.npy``, the
per-point ground truth as the adapter maps it (``points_gt.npy``, uint8), each image's file copied byte for
byte where the adapter read one at its native size (else a PNG of its pixels), and per image the composed
point->camera transform the adapter built (nuScenes: lidar -> ego(t_lidar) -> global -> ego(t_camera) ->
camera), its intrinsics, its depth map (a uint16 PNG in millimetres where that is exact, else ``.npy`` metres)
with the depth intrinsics, and its label map (PNG). JSON floats round-trip float64 exactly, so the folder
adapter reproduces every (image, point, pixel) pair of the source adapter.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import click
import numpy as np
from PIL import Image

from data_cache.errors import CnsCommand
from pipeline.options import parse_key_values

from .base import DatasetAdapter, DatasetError, build_adapter, read_rgb
from .classes import PROMPT_NAMES

DEPTH_SCALE = 1000.0  # written depth PNGs hold millimetres
LIKE_OF = {"nuscenes": "nuscenes", "scannet": "scannet"}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))


def like_of(adapter: DatasetAdapter) -> str | None:
    """Which benchmark's settings the source follows (synthetic: street = nuScenes, indoor = ScanNet)."""
    if adapter.name == "synthetic":
        return "nuscenes" if getattr(adapter, "kind", "") == "street" else "scannet"
    return LIKE_OF.get(adapter.name)


def dataset_json(adapter: DatasetAdapter, tokens: list[str]) -> dict:
    """``dataset.json`` of the source: its classes, the CLIP2Scene prompt words, settings and split."""
    like = like_of(adapter)
    prompts = {n: w for n, w in PROMPT_NAMES.get(like or "", {}).items() if n in adapter.class_names and w != n}
    meta = {"classes": list(adapter.class_names), "image_size": list(adapter.image_size),
            "point_fields": list(adapter.point_features), "like": like, "min_depth": adapter.min_depth,
            "occlusion_tolerance": adapter.occlusion_tolerance, "voxel_size": adapter.voxel_size,
            "depth_scale": DEPTH_SCALE, "splits": {adapter.split: tokens} if adapter.split != "all" else {}}
    if prompts:
        meta["prompt_names"] = prompts
    return {k: v for k, v in meta.items() if v is not None}


def _write_depth(depth: np.ndarray, stem: Path) -> str:
    mm = np.rint(depth.astype(np.float64) * DEPTH_SCALE)
    if mm.max() < 65536 and np.array_equal(mm.astype(np.float32) / np.float32(DEPTH_SCALE), depth):
        Image.fromarray(mm.astype(np.uint16)).save(stem.with_suffix(".png"))
        return stem.with_suffix(".png").name
    np.save(stem.with_suffix(".npy"), depth.astype(np.float32))
    return stem.with_suffix(".npy").name


def _write_rgb(im, stem: Path) -> str:
    """The image's own file where it decodes to exactly the adapter's pixels, else a PNG of them."""
    src = Path(im.file)
    if src.is_file():
        same = read_rgb(src, "")
        if same.shape == im.rgb.shape and np.array_equal(same, im.rgb):
            dst = stem.with_suffix(src.suffix.lower())
            shutil.copyfile(src, dst)
            return dst.name
    Image.fromarray(im.rgb).save(stem.with_suffix(".png"))
    return stem.with_suffix(".png").name


def write_frame(frame, out: Path) -> dict:
    """One loaded :class:`Frame` into ``out`` (its folder); returns its calibration."""
    out.mkdir(parents=True, exist_ok=True)
    points = np.concatenate([frame.xyz, frame.feat.reshape(len(frame.xyz), -1)], axis=1).astype(np.float32)
    np.save(out / "points.npy", points)
    if frame.gt is not None:
        np.save(out / "points_gt.npy", frame.gt.astype(np.uint8))
    images = []
    for i, im in enumerate(frame.images):
        stem = out / f"{i:03d}_{_safe(im.name)}"
        entry = {"name": str(im.name), "file": _write_rgb(im, stem), "width": int(im.rgb.shape[1]),
                 "height": int(im.rgb.shape[0]), "intrinsics": np.asarray(im.intrinsics, np.float64).tolist(),
                 "points_to_camera": np.asarray(im.points_to_camera, np.float64).tolist()}
        if im.depth is not None:
            entry["depth"] = _write_depth(im.depth, stem.with_name(stem.name + "_depth"))
            entry["depth_intrinsics"] = np.asarray(im.depth_intrinsics, np.float64).tolist()
        if im.gt is not None:
            gt_name = stem.name + "_gt.png"
            Image.fromarray(im.gt.astype(np.uint8)).save(out / gt_name)
            entry["gt"] = gt_name
        images.append(entry)
    calib = {"images": images}
    (out / "calib.json").write_text(json.dumps(calib, indent=1))
    return calib


def write_folder(adapter: DatasetAdapter, dst, progress: bool = True) -> Path:
    """Every frame of ``adapter`` into the folder layout under ``dst`` (created; must not hold a dataset)."""
    from tqdm import tqdm
    dst = Path(dst)
    if (dst / "dataset.json").exists():
        raise DatasetError("already holds a folder dataset (dataset.json); choose another DST", file=dst)
    infos = adapter.frames()
    for i in tqdm(range(len(infos)), desc=f"{adapter.name} -> folder", unit="frame", disable=not progress):
        frame = adapter.load(i)
        write_frame(frame, dst / "frames" / frame.token)
    dst.mkdir(parents=True, exist_ok=True)
    meta = dataset_json(adapter, [fi.token for fi in infos])
    (dst / "dataset.json").write_text(json.dumps(meta, indent=1))  # last: a half-written folder has none
    return dst


@click.command(cls=CnsCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("dataset")
@click.argument("src")
@click.argument("dst")
@click.option("--split", default="all", show_default=True, help="the source split to write")
@click.option("--dataset-option", "dataset_options", multiple=True, metavar="KEY=VALUE",
              help="source adapter option (as cns-cli labels takes it), e.g. kind=indoor for synthetic")
def main(dataset, src, dst, split, dataset_options):
    """Write the DATASET (nuscenes, scannet, synthetic, ...) at SRC in the folder layout at DST (SRC: - for
    synthetic, which has no root)."""
    adapter = build_adapter(dataset, src, split, **parse_key_values(dataset_options))
    out = write_folder(adapter, dst)
    frames = len(json.loads((out / "dataset.json").read_text()).get("splits", {}).get(split, [])) or \
        sum(1 for p in (out / "frames").iterdir())
    click.echo(f"wrote {frames} frame(s) of {dataset}/{split} to {out}")


if __name__ == "__main__":
    main()
