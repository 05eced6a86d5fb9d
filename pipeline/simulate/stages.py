"""The simulated ``maskclip`` and ``sam`` stages: the real stages' arrays, computed from the ground truth.

They are registered under the real stage names in their own registry, :data:`SIMULATED_STAGES`;
:func:`pipeline.stages.base.build_stage` picks them when a stage's options carry ``simulate`` (what
``cns-cli labels --simulate`` passes), so the runner, the done markers, ``refine``, the trainer and
``cns-cli cache validate`` see the stages they know, while every fingerprint says ``"simulated": true``
with the simulator's name, version, seed and knobs.

Stage options: ``simulate`` (the validated knobs, :func:`pipeline.simulate.config.load_config`, or a
config name/path to load) and ``source`` (the YAML the knobs came from; not part of the fingerprint).
"""
from __future__ import annotations

import json
import zlib

import numpy as np

from data_cache.schema import IGNORE_INDEX

from ..registry import Registry
from ..stages.base import ShardContext, Stage
from . import noise
from .config import load_config, validate

SIMULATOR_NAME = "cns-simulated-foundation-models"
SIMULATOR_VERSION = 1
SIMULATED_STAGES = Registry("simulated stage")

# independent random streams of one seed
STREAM_CLIP, STREAM_SAM, STREAM_TEXT, STREAM_SAM_CLASSES = 1, 2, 3, 4


def image_rng(seed: int, stream: int, token: str, name: str) -> np.random.Generator:
    """The random stream of one image: seed, stream and the image's identity (frame token and image name),
    so the draws do not depend on the row, the shard layout or the workers, and two stores (train/val)
    never share noise."""
    entropy = [int(seed), stream, zlib.crc32(str(token).encode()), zlib.crc32(str(name).encode())]
    return np.random.default_rng(np.random.SeedSequence(entropy))


# -- ground truth ----------------------------------------------------------------------------------------
def frame_pixel_gt(store, frame: int, from_points: bool = False) -> np.ndarray:
    """uint8 [n_images, H, W] of one frame: ``images/gt`` where the store has it (unless ``from_points``), else
    its labelled points projected through the correspond stage's pairs (the nearest point wins a pixel; other
    pixels stay 255)."""
    off = store.offsets("images")
    i0, i1 = int(off[frame]), int(off[frame + 1])
    attrs = store.attrs
    if not from_points and "image_gt" in attrs.capabilities and "images/gt" in store:
        return np.asarray(store.array("images/gt")[i0:i1])
    if "point_gt" not in attrs.capabilities or "points/gt" not in store:
        raise ValueError(f"{store.path} has neither images/gt nor points/gt: the simulated foundation models "
                         f"need ground truth")
    H, W = attrs.image_size
    out = np.full((i1 - i0, H, W), IGNORE_INDEX, dtype=np.uint8)
    p0 = int(store.offsets("points")[frame])
    k = store.offsets("pairs")
    k0, k1 = int(k[frame]), int(k[frame + 1])
    if k1 == k0:
        return out
    point = np.asarray(store.array("pairs/point")[k0:k1], dtype=np.int64)
    image = np.asarray(store.array("pairs/image")[k0:k1], dtype=np.int64) - i0
    uv = np.asarray(store.array("pairs/uv")[k0:k1], dtype=np.int64)
    depth = np.asarray(store.array("pairs/depth")[k0:k1], dtype=np.float32)
    gt = np.asarray(store.array("points/gt")[p0:p0 + int(point.max()) + 1])[point]
    key = (image * H + uv[:, 1]) * W + uv[:, 0]
    order = np.lexsort((depth, key))
    first = order[np.concatenate([[True], key[order][1:] != key[order][:-1]])]
    out.reshape(-1)[key[first]] = gt[first]
    return out


def _frame_of_row(store, row: int) -> tuple[int, int]:
    off = store.offsets("images")
    f = int(np.searchsorted(off, row, side="right") - 1)
    return f, row - int(off[f])


class _SimulatedStage(Stage):
    defaults = {"simulate": None, "source": None}
    runtime_keys = ("source",)
    uses_gpu = False
    section = ""  # the config section of this stage's knobs

    def __init__(self, **config):
        super().__init__(**config)
        sim = self.config["simulate"]
        if sim is None:
            raise ValueError(f"the simulated {self.name} stage needs its knobs (option 'simulate')")
        if not isinstance(sim, dict):  # a config name or path
            self.config["source"] = self.config["source"] or str(sim)
            sim = load_config(sim)
        self.config["simulate"] = validate(sim)

    @property
    def knobs(self) -> dict:
        return self.config["simulate"]

    def fingerprint_config(self) -> dict:
        k = self.knobs
        return {"simulated": True, "simulator": SIMULATOR_NAME, "simulator_version": SIMULATOR_VERSION,
                "seed": k["seed"], "ground_truth": k["ground_truth"], self.section: k[self.section]}

    def _fit_key(self) -> str:
        return json.dumps(self.fingerprint(), sort_keys=True, default=str)

    def filled(self, gt: np.ndarray) -> np.ndarray:
        return noise.fill_ground_truth(gt, float(self.knobs["ground_truth"]["fill_max_distance_px"]))

    def tables(self, store):
        """What every image of the store shares (text embeddings, confusion matrix, projection, ...)."""
        raise NotImplementedError

    def ensure_projection(self, store, proj_name: str, mean_name: str, output_index: int, knobs: dict) -> None:
        """Fit the store's fixed PCA projection ``proj_name`` (+ ``mean_name``) to ``knobs["feat_dim"]`` channels
        on the raw features (``simulate_image(...)[output_index]``) of ``knobs["pca_sample_images"]`` images
        spread over the store, as the real stages fit theirs; kept on resume with this fingerprint."""
        from ..models.pca import fit_pca
        from ..stages.base import sample_rows
        proj = store.array(proj_name)
        if proj.attrs.get("fit_key") == self._fit_key():
            return
        n_images = store.array("images/rgb").shape[0]
        if n_images == 0:
            raise ValueError(f"{store.path} has no images to fit {proj_name} on")
        tables = self.tables(store)
        tokens, names = store.array("frames/token"), store.array("images/name")
        rows = sample_rows(n_images, knobs["pca_sample_images"])
        samples, gt_cache = [], {}
        for row in rows:
            f, j = _frame_of_row(store, int(row))
            if f not in gt_cache:
                gt_cache = {f: frame_pixel_gt(store, f)}
            out = self.simulate_image(self.filled(gt_cache[f][j]), str(tokens[f]), str(names[int(row)]), tables)
            feat = out[output_index]
            samples.append(feat.reshape(feat.shape[0], -1).T)
        p, mean = fit_pca(np.concatenate(samples), int(knobs["feat_dim"]))
        proj[:] = p
        store.array(mean_name)[:] = mean
        proj.attrs.update({"fit_key": self._fit_key(), "fitted_on_rows": rows.tolist(), "simulated": True,
                           "simulator": SIMULATOR_NAME})

    @staticmethod
    def projection(store, proj_name: str, mean_name: str) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(store.array(proj_name)[:]), np.asarray(store.array(mean_name)[:])

    def process_shard(self, ctx: ShardContext) -> dict:
        store = ctx.store
        off = store.offsets("images")
        tokens = store.array("frames/token")[ctx.shard.frame_start:ctx.shard.frame_stop]
        names = store.array("images/name")
        stats = {"images": 0, "simulate_s": 0.0}
        tables = self.tables(store)
        for j, f in enumerate(ctx.shard.frames):
            token = str(tokens[j])
            with ctx.frame(f, token):
                a, b = int(off[f]), int(off[f + 1])
                if b == a:
                    continue
                with ctx.timed("simulate_s"):
                    gt = frame_pixel_gt(store, f)
                    image_names = [str(n) for n in names[a:b]]
                    outputs = [self.simulate_image(self.filled(g), token, n, tables)
                               for g, n in zip(gt, image_names)]
                self.write(store, a, outputs, tables)
                stats["images"] += b - a
        stats["simulate_s"] = ctx.timings.get("simulate_s", 0.0)
        return stats


@SIMULATED_STAGES.register("maskclip")
class SimulatedMaskCLIPStage(_SimulatedStage):
    """Simulated MaskCLIP: ``clip/text_embed``, ``clip/label``, ``clip/confidence``, and the dense features
    ``clip/feat`` on the patch grid, PCA-projected by ``clip/proj``/``clip/proj_mean``."""

    name = "maskclip"
    section = "maskclip"
    version = SIMULATOR_VERSION
    arrays = ("clip/text_embed", "clip/label", "clip/confidence", "clip/feat", "clip/proj", "clip/proj_mean")

    def text(self, class_names) -> np.ndarray:
        m = self.knobs["maskclip"]
        rng = np.random.default_rng(np.random.SeedSequence([int(self.knobs["seed"]), STREAM_TEXT]))
        return noise.text_embeddings(list(class_names), m["confusion_groups"], m["embed_dim"],
                                     m["text_group_similarity"], rng)

    def confusion(self, class_names) -> np.ndarray:
        m = self.knobs["maskclip"]
        return noise.confusion_matrix(list(class_names), m["confusion_groups"], m["accuracy"], m["group_confusion"],
                                      m["uniform_confusion"])

    def tables(self, store):
        # the text embeddings are computed from the seed alone: no need to wait for clip/text_embed
        return {"text": self.text(store.attrs.class_names), "confusion": self.confusion(store.attrs.class_names)}

    def prepare(self, store, adapter) -> None:
        attrs = store.attrs
        m = self.knobs["maskclip"]
        H, W = attrs.image_size
        p = int(m["patch_size"])
        store.set_dims(L=len(attrs.class_names), E=int(m["embed_dim"]), Dc=int(m["feat_dim"]), hc=max(1, H // p),
                       wc=max(1, W // p))
        store.ensure_arrays(self.arrays)
        arr = store.array("clip/text_embed")
        if arr.attrs.get("fit_key") != self._fit_key():
            arr[:] = self.text(attrs.class_names)
            arr.attrs.update({"fit_key": self._fit_key(), "simulated": True, "simulator": SIMULATOR_NAME})
        self.ensure_projection(store, "clip/proj", "clip/proj_mean", 2, m)

    def simulate_image(self, filled, token, name, tables):
        rng = image_rng(self.knobs["seed"], STREAM_CLIP, token, name)
        return noise.simulate_clip(filled, tables["text"], tables["confusion"], self.knobs["maskclip"], rng)

    def write(self, store, row: int, outputs, tables) -> None:
        from ..models.pca import project
        proj = self.projection(store, "clip/proj", "clip/proj_mean")
        store.write_rows("clip/label", row, np.stack([o[0] for o in outputs]))
        store.write_rows("clip/confidence", row, np.stack([o[1] for o in outputs]))
        store.write_rows("clip/feat", row, np.stack([project(o[2], *proj) for o in outputs]).astype(np.float16))


@SIMULATED_STAGES.register("sam")
class SimulatedSAMStage(_SimulatedStage):
    """Simulated SAM: ``sam/mask_id`` and ``sam/feat`` (+ its fitted ``sam/proj``, ``sam/proj_mean``)."""

    name = "sam"
    section = "sam"
    version = SIMULATOR_VERSION
    arrays = ("sam/mask_id", "sam/feat", "sam/proj", "sam/proj_mean")
    model_type = "vit_h"  # whose feature grid the simulated features take

    def grid(self, image_size) -> tuple[int, int]:
        from ..models.sam import feature_grid, sam_config
        cfg = sam_config(self.model_type)
        return feature_grid(image_size, cfg["image_size"], cfg["vit_patch_size"])

    def directions(self, num_classes: int) -> np.ndarray:
        rng = np.random.default_rng(np.random.SeedSequence([int(self.knobs["seed"]), STREAM_SAM_CLASSES]))
        return noise.class_directions(num_classes, int(self.knobs["sam"]["embed_dim"]), rng)

    def simulate_image(self, filled, token, name, tables):
        rng = image_rng(self.knobs["seed"], STREAM_SAM, token, name)
        ids, mask_class = noise.simulate_sam_masks(filled, self.knobs["sam"], rng)
        emb = noise.simulate_sam_embedding(ids, mask_class, tables["directions"], tables["grid"], self.knobs["sam"],
                                           rng)
        return ids, emb

    def tables(self, store):
        return {"grid": self.grid(store.attrs.image_size), "directions": self.directions(len(store.attrs.class_names))}

    def prepare(self, store, adapter) -> None:
        s = self.knobs["sam"]
        h, w = self.grid(store.attrs.image_size)
        store.set_dims(h=h, w=w, S=int(s["embed_dim"]), D=int(s["feat_dim"]))
        store.ensure_arrays(self.arrays)
        self.ensure_projection(store, "sam/proj", "sam/proj_mean", 1, s)

    def write(self, store, row: int, outputs, tables) -> None:
        from ..models.pca import project
        proj = self.projection(store, "sam/proj", "sam/proj_mean")
        store.write_rows("sam/mask_id", row, np.stack([o[0] for o in outputs]))
        store.write_rows("sam/feat", row, np.stack([project(o[1], *proj) for o in outputs]).astype(np.float16))


def simulated_stage_options(config: str | dict = "default") -> dict:
    """The ``stage_options`` of :func:`pipeline.runner.run_labels` that make ``maskclip`` and ``sam`` simulated
    (``cns-cli labels --simulate``): the validated knobs of the config name/path (or dict) for both."""
    source = None if isinstance(config, dict) else str(config)
    knobs = validate(config) if isinstance(config, dict) else load_config(config)
    return {name: {"simulate": knobs, "source": source} for name in SIMULATED_STAGES.names()}


__all__ = ["SIMULATED_STAGES", "SIMULATOR_NAME", "SIMULATOR_VERSION", "SimulatedMaskCLIPStage",
           "SimulatedSAMStage", "frame_pixel_gt", "image_rng", "simulated_stage_options"]
