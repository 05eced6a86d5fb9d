"""``cns-cli predict``: label new data with a trained run's networks (registered in ``cli.py``).

The networks read only points (3D) and images (2D): no CLIP, no SAM. Frames come from a store that has at
least the ``correspond`` stage (``--cache``: its points, features and images at the training resolution), or
straight from a dataset adapter (``--dataset NAME --data-root DIR``, the folder dataset included; images are
resized to the adapter's training resolution as ``correspond`` does). A frame without images (a LiDAR sweep
alone) gets 3D labels only; a run without a 3D network (``model.net3d: null``) gives 2D labels only.

Per frame, in ``--out``:

* ``<token>_points.npy``: a structured array of shape [N] (N = the frame's points, in the store's / point
  file's order) with fields ``class_id`` (uint16, index into ``class_names``) and ``confidence`` (float32,
  the softmax probability of that class, in [0, 1]).
* ``<token>.ply``: binary little-endian PLY, vertex properties x y z (float32), red green blue (uint8: the
  class colour of :func:`inspection.palettes.palette_for`), class_id (uint16), confidence (float32).
* ``<token>_<i>_<image name>.png`` per image: the image, the 2D network's labels in the class palette, a legend.

and ``predictions.json``: the run and checkpoint, ``class_names``, ``open_vocabulary``, the ``teacher`` of the
run's training store (CLIP text tower, dataset, simulated stages), the source, and per frame its files.

Class embeddings come from the checkpoint (runs trained before it recorded them: from ``--cache`` when the
store's ``clip/text_embed`` is the one the run trained with). ``--classes a,b,c``: open vocabulary, the names
embedded by the training store's CLIP text tower, as ``cns-cli eval --classes``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np

from data_cache.errors import UserError

POINT_DTYPE = np.dtype([("class_id", "<u2"), ("confidence", "<f4")])


class PredictError(UserError, ValueError):
    """A run, a source or options that ``predict`` cannot use; one line naming the file or option."""


# -- the run -------------------------------------------------------------------------------------------------
class TrainedRun:
    """A run's configuration and checkpoint, with the class embeddings and teacher predict needs."""

    def __init__(self, run_dir, checkpoint=None):
        import torch

        from .config import ConfigError, load_config
        self.path = Path(run_dir)
        try:
            self.cfg = load_config(self.path / "config.yaml", {})
        except (ConfigError, OSError) as e:
            raise PredictError(f"{self.path / 'config.yaml'}: not a training run's configuration ({e})") from None
        self.checkpoint = Path(checkpoint) if checkpoint else self.path / "checkpoints" / "last.pth"
        if not self.checkpoint.is_file():
            raise PredictError(f"{self.checkpoint}: no checkpoint (the run has not finished an epoch)")
        self.state = torch.load(self.checkpoint, map_location="cpu", weights_only=False)
        self.class_names = list(self.cfg["data"]["class_names"] or [])
        self.teacher = self.state.get("teacher")

    def text_embed(self, store=None):
        """[L, E] class embeddings of the heads: the checkpoint's, else a store's matching ``clip/text_embed``."""
        import torch

        from .engine import text_embed_sha256
        if "text_embed" in self.state:
            return torch.as_tensor(self.state["text_embed"], dtype=torch.float32)
        want = self.cfg["data"]["text_embed_sha256"]
        if store is not None and "clip/text_embed" in store:
            embed = np.asarray(store.array("clip/text_embed")[:], dtype=np.float32)
            if text_embed_sha256(embed) == want:
                return torch.from_numpy(embed)
        raise PredictError(f"{self.checkpoint} predates recorded class embeddings and no --cache store holds the "
                           f"run's clip/text_embed (sha256 {str(want)[:12]}...): pass its training store as "
                           f"--cache, or --classes")

    def model(self, text_embed, point_channels: int, device):
        from .models import load_trained_model
        recorded = self.state.get("point_channels")
        if self.cfg["model"]["net3d"] and recorded is not None and recorded != point_channels:
            raise PredictError(f"the source's points have {point_channels} feature channel(s), the run's 3D "
                               f"network was trained on {recorded} ({self.checkpoint})")
        info = {"text_embed": text_embed, "feature_dims": self.state.get("feature_dims", {}),
                "point_channels": point_channels}
        model, _ = load_trained_model(self.cfg, self.checkpoint, info, device)
        return model.eval()


def open_vocabulary(run: TrainedRun, names: list[str], device):
    """The new class names embedded by the training store's CLIP text tower (as ``eval --classes``)."""
    from .evaluate import open_vocabulary_embeddings
    teacher = run.teacher or {}
    if teacher.get("simulated_stages"):
        raise PredictError("--classes needs a run trained on real CLIP labels: its training store's stages "
                           f"{', '.join(teacher['simulated_stages'])} are simulated from the ground truth")
    tower = teacher.get("text_tower")
    if not tower:
        raise PredictError(f"--classes: {run.checkpoint} records no CLIP text tower of its training store "
                           f"(a run trained before predict existed); use `cns-cli eval --classes` on that store")
    try:
        return open_vocabulary_embeddings(names, {"model": "ViT-B-16", **tower}, device)
    except (RuntimeError, ValueError, OSError) as e:  # no weights, a failed download, a wrong checkpoint
        raise PredictError(f"--classes: cannot embed the names with the teacher's text tower: {e}") from None


# -- frame sources -------------------------------------------------------------------------------------------
class StoreFrames:
    """Frames of a store with a complete ``correspond`` stage: points, features and training-size images."""

    def __init__(self, path):
        from data_cache.store import CacheError, Store
        try:
            self.store = Store(path)
            attrs = self.store.attrs
        except CacheError as e:
            raise PredictError(str(e)) from None
        if not self.store.stage_complete("correspond"):
            raise PredictError(f"{path}: the correspond stage is not complete (predict reads its points and images)")
        from data_cache.integrity import require_complete_chunks
        require_complete_chunks(self.store)  # a lost chunk would read back as the fill value: refuse the store
        self.attrs = attrs
        self.image_size = tuple(attrs.image_size)
        self.tokens = np.asarray(self.store.array("frames/token")[:]).astype(str)
        self.has_points = "points" in attrs.modalities
        self.point_off = self.store.offsets("points") if self.has_points else None
        self.image_off = self.store.offsets("images")
        self.names = np.asarray(self.store.array("images/name")[:]).astype(str)
        self.point_channels = int(self.store.array("points/feat").shape[1]) if self.has_points else 0
        self.describe = {"cache": str(path), "dataset": attrs.dataset, "split": attrs.split}

    def __len__(self) -> int:
        return len(self.tokens)

    def token(self, i: int) -> str:
        return str(self.tokens[i])

    def resolve(self, key: str) -> int:
        from pipeline.datasets.base import frame_alias
        hits = np.flatnonzero(self.tokens == key)
        if not len(hits):
            alias = frame_alias(self.attrs.dataset, self.attrs.dataset_config, key)
            hits = np.flatnonzero(self.tokens == alias) if alias else hits
        if not len(hits):
            raise PredictError(f"--frame {key}: no such frame token in {self.describe['cache']}")
        return int(hits[0])

    def read(self, i: int) -> dict:
        """``xyz`` [N, 3], ``feat`` [N, C] float32 (None without points), ``rgb`` [I, H, W, 3] uint8, names."""
        from data_cache.integrity import read_guard
        i0, i1 = int(self.image_off[i]), int(self.image_off[i + 1])
        with read_guard(self.store, frames=(i, i + 1)):  # a damaged chunk: one line naming array, chunk, frames
            rgb = np.asarray(self.store.array("images/rgb")[i0:i1]) if i1 > i0 else np.zeros((0, *self.image_size, 3),
                                                                                               np.uint8)
            out = {"token": self.token(i), "rgb": rgb, "names": list(self.names[i0:i1]), "xyz": None, "feat": None}
            if self.has_points:
                p0, p1 = int(self.point_off[i]), int(self.point_off[i + 1])
                out["xyz"] = np.asarray(self.store.array("points/xyz")[p0:p1], dtype=np.float32)
                out["feat"] = np.asarray(self.store.array("points/feat")[p0:p1], dtype=np.float32)
        return out


class AdapterFrames:
    """Frames read straight through a dataset adapter, images resized to its training resolution."""

    def __init__(self, name, root, split, options):
        from pipeline.datasets import build_adapter
        self.adapter = build_adapter(name, root, split, **options)
        self.infos = self.adapter.frames()
        self.image_size = tuple(self.adapter.image_size)
        self.has_points = "points" in self.adapter.modalities
        self.point_channels = max(1, len(self.adapter.point_features)) if self.has_points else 0
        self.describe = {"dataset": name, "data_root": str(root) if root else None, "split": self.adapter.split}

    def __len__(self) -> int:
        return len(self.infos)

    def token(self, i: int) -> str:
        return str(self.infos[i].token)

    def resolve(self, key: str) -> int:
        tokens = [fi.token for fi in self.infos]
        alias = key if key in tokens else self.adapter.frame_alias(key)
        if alias not in tokens:
            raise PredictError(f"--frame {key}: no such frame in {self.describe['dataset']}/{self.adapter.split}")
        return tokens.index(alias)

    def read(self, i: int) -> dict:
        from pipeline.stages.correspond import resize_rgb
        frame = self.adapter.load(i)
        rgb = [resize_rgb(im.rgb, self.image_size) for im in frame.images]
        feat = frame.feat
        if feat is not None and feat.ndim == 2 and feat.shape[1] == 0:  # the store keeps one channel at least
            feat = np.zeros((len(feat), 1), np.float32)
        return {"token": str(frame.token), "xyz": frame.xyz, "feat": feat, "names": [im.name for im in frame.images],
                "rgb": np.stack(rgb) if rgb else np.zeros((0, *self.image_size, 3), np.uint8)}


# -- inference -----------------------------------------------------------------------------------------------
def network_inputs(frame: dict, cfg: dict, image_size) -> dict:
    """The model's inputs for one frame, as :class:`train.data.CacheFrameDataset` builds them for evaluation:
    centred coordinates (appended to the features with ``data.use_xyz``), voxels of ``data.voxel_size``
    (mean features), images resampled to ``data.image_size`` (default: the source's training resolution)."""
    import torch

    from .data import image_affine, scatter_mean, voxelize, warp_rgb
    d = cfg["data"]
    out_size = tuple(d["image_size"] or image_size)
    rgb = frame["rgb"]
    affines = np.stack([image_affine(None, rgb.shape[1:3], out_size, {}) for _ in range(len(rgb))]) if len(rgb) \
        else np.zeros((0, 4))
    images = warp_rgb(rgb, affines, out_size) if len(rgb) else np.zeros((0, 3, *out_size), np.uint8)
    inputs = {"rgb": torch.from_numpy(images), "voxel_feat": torch.zeros((0, 1)),
              "voxel_index": torch.zeros((0, 4), dtype=torch.int32), "inverse": torch.zeros(0, dtype=torch.long)}
    if frame["xyz"] is not None:
        coord = frame["xyz"] - frame["xyz"].mean(0, keepdims=True)
        point_feat = np.concatenate([frame["feat"], coord], 1) if d["use_xyz"] else frame["feat"]
        voxel_coord, inverse = voxelize(coord, float(d["voxel_size"]))
        inputs["voxel_feat"] = torch.from_numpy(scatter_mean(point_feat, inverse, len(voxel_coord)))
        inputs["voxel_index"] = torch.cat([torch.zeros((len(voxel_coord), 1), dtype=torch.int32),
                                           torch.from_numpy(voxel_coord)], 1)
        inputs["inverse"] = torch.from_numpy(inverse)
    return inputs


def predict_frame(model, frame: dict, cfg: dict, image_size, device) -> dict:
    """``points``: [N] of :data:`POINT_DTYPE` (None without points or 3D net); ``images``: [I, H, W] uint8
    class ids at the source's training resolution (None without images or 2D net)."""
    import torch
    import torch.nn.functional as F
    x = {k: v.to(device) for k, v in network_inputs(frame, cfg, image_size).items()}
    run_3d = frame["xyz"] is not None and model.net3d is not None
    with torch.no_grad():
        if run_3d:
            out = model(x["rgb"], x["voxel_feat"], x["voxel_index"], x["inverse"], 1)
        elif len(frame["rgb"]):  # images without points: the forward of a 2D-only model (no 3D net to feed)
            net3d, model.net3d = model.net3d, None
            try:
                out = model(x["rgb"], x["voxel_feat"], x["voxel_index"], x["inverse"], 1)
            finally:
                model.net3d = net3d
        else:
            out = {}
    result = {"points": None, "images": None}
    if run_3d:
        prob = out["logits3d"].float().softmax(1)
        conf, label = prob.max(1)
        points = np.zeros(len(label), POINT_DTYPE)
        points["class_id"] = label.cpu().numpy()
        points["confidence"] = conf.cpu().numpy()
        result["points"] = points
    if "logits2d" in out and len(frame["rgb"]):
        label = out["logits2d"].argmax(1)
        if tuple(label.shape[-2:]) != tuple(image_size):
            label = F.interpolate(label[:, None].float(), size=tuple(image_size), mode="nearest")[:, 0].long()
        result["images"] = label.to(torch.uint8).cpu().numpy()
    return result


# -- outputs -------------------------------------------------------------------------------------------------
def write_ply(path: Path, xyz: np.ndarray, points: np.ndarray, palette) -> None:
    """Binary PLY: x y z float32, red green blue uint8 (class colours), class_id uint16, confidence float32."""
    from plyfile import PlyData, PlyElement
    colours = palette.colourize(points["class_id"])
    vertex = np.zeros(len(xyz), [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"),
                                 ("blue", "u1"), ("class_id", "<u2"), ("confidence", "<f4")])
    for i, axis in enumerate("xyz"):
        vertex[axis] = xyz[:, i]
    for i, channel in enumerate(("red", "green", "blue")):
        vertex[channel] = colours[:, i]
    vertex["class_id"], vertex["confidence"] = points["class_id"], points["confidence"]
    PlyData([PlyElement.describe(vertex, "vertex")], byte_order="<").write(str(path))


def image_sheet(rgb: np.ndarray, labels: np.ndarray, palette) -> np.ndarray:
    """The image, its labels in the class palette, and a legend of the classes present, side by side."""
    from PIL import Image

    from inspection.render import label_picture, legend_figure, png_bytes
    import io
    legend = np.asarray(Image.open(io.BytesIO(png_bytes(legend_figure(palette, np.unique(labels))))).convert("RGB"))
    h = max(rgb.shape[0], legend.shape[0])
    pad = lambda a: np.pad(a, ((0, h - a.shape[0]), (0, 0), (0, 0)), constant_values=255)  # noqa: E731
    return np.concatenate([pad(rgb), pad(label_picture(labels, palette)), pad(legend)], axis=1)


def write_frame(out: Path, frame: dict, result: dict, palette) -> dict:
    """The files of one frame in ``out``; returns its ``predictions.json`` entry."""
    import re

    from inspection.render import save_png
    token = frame["token"]
    entry = {"token": token, "points": 0, "images": []}
    if result["points"] is not None:
        np.save(out / f"{token}_points.npy", result["points"])
        write_ply(out / f"{token}.ply", frame["xyz"], result["points"], palette)
        entry.update(points=len(result["points"]), points_file=f"{token}_points.npy", ply=f"{token}.ply")
    if result["images"] is not None:
        for i, (rgb, labels, name) in enumerate(zip(frame["rgb"], result["images"], frame["names"])):
            file = f"{token}_{i}_{re.sub(r'[^A-Za-z0-9_.-]', '_', str(name))}.png"
            save_png(image_sheet(rgb, labels, palette), out / file)
            entry["images"].append({"name": str(name), "file": file})
    return entry


def run_predict(run_dir, out_dir, cache=None, dataset=None, data_root=None, split=None, dataset_options=None,
                classes=None, frames=(), device="cpu", progress=True) -> dict:
    """Label every frame (or ``frames``: tokens, nuScenes sample tokens) of the source; returns the index."""
    import torch
    from tqdm import tqdm

    from inspection.palettes import palette_for
    if (cache is None) == (dataset is None):
        raise PredictError("give the frames either as --cache STORE or as --dataset NAME --data-root DIR")
    run = TrainedRun(run_dir)
    source = StoreFrames(cache) if cache is not None else AdapterFrames(dataset, data_root, split,
                                                                        dataset_options or {})
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else run.class_names
    embed = (open_vocabulary(run, names, device) if classes
             else run.text_embed(source.store if isinstance(source, StoreFrames) else None))
    model = run.model(embed.to(device), source.point_channels, device)
    palette = palette_for(names)
    indices = [source.resolve(str(f)) for f in frames] if frames else list(range(len(source)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries, start = [], time.perf_counter()
    for i in tqdm(indices, desc="predict", unit="frame", disable=not progress):
        frame = source.read(i)
        entries.append(write_frame(out, frame, predict_frame(model, frame, run.cfg, source.image_size, device),
                                   palette))
    seconds = time.perf_counter() - start
    index = {"run": str(run.path), "checkpoint": str(run.checkpoint), "class_names": names,
             "open_vocabulary": bool(classes) and names != run.class_names, "teacher": run.teacher,
             "source": source.describe, "device": str(device), "points_dtype": POINT_DTYPE.descr,
             "seconds": round(seconds, 3), "frames_per_second": round(len(entries) / seconds, 3) if seconds else None,
             "frames": entries}
    (out / "predictions.json").write_text(json.dumps(index, indent=1))
    return index


@click.command("predict", context_settings={"show_default": True})
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="a training run (config.yaml, checkpoints/last.pth)")
@click.option("--cache", default=None, type=click.Path(exists=True, file_okay=False),
              help="a store with (at least) the correspond stage")
@click.option("--dataset", default=None, help="or read frames through this adapter (folder, nuscenes, scannet, ...)")
@click.option("--data-root", type=click.Path(), default=None, help="the adapter's data root")
@click.option("--split", default=None, help="the adapter's split (default: its own)")
@click.option("--dataset-option", "dataset_options", multiple=True, metavar="KEY=VALUE", help="adapter option")
@click.option("--frame", "frames", multiple=True, help="only this frame (token; nuScenes: a sample token too)")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="output directory")
@click.option("--classes", default=None, help="comma-separated class names: open vocabulary (the teacher's CLIP)")
@click.option("--device", default="cpu")
@click.option("--no-progress", is_flag=True, help="no progress bar")
def predict(run_dir, cache, dataset, data_root, split, dataset_options, frames, out_dir, classes, device, no_progress):
    """Label new data with a trained run's networks: per-point labels (.npy, .ply) and per-image PNGs."""
    from pipeline.options import parse_key_values
    index = run_predict(run_dir, out_dir, cache, dataset, data_root, split, parse_key_values(dataset_options), classes,
                        frames, device, progress=not no_progress)
    points = sum(e["points"] for e in index["frames"])
    images = sum(len(e["images"]) for e in index["frames"])
    click.echo(f"{len(index['frames'])} frame(s), {points} point labels, {images} image(s) in {out_dir} "
               f"({index['frames_per_second']} frames/s)")
