"""The ``sam`` stage: SAM automatic masks and SAM features, from one encoder pass per image.

Writes, per image at the training resolution:

* ``sam/mask_id`` int32 [I, H, W] — automatic-mask id per pixel, ``-1`` = no mask; ids ``0..M-1`` within an
  image, ranked by area from the smallest; where masks overlap the smaller mask wins
  (:func:`pipeline.models.sam.masks_to_id_map`).
* ``sam/feat`` float16 [I, D, h, w] — the 256-channel image embedding with the padding cells cropped
  (h x w = :func:`pipeline.models.sam.feature_grid` of the training resolution, e.g. 35x64 for 224x416),
  minus ``sam/proj_mean`` and projected by ``sam/proj`` [S, D]: the frozen phi_f of Eq. 7.

``prepare`` fits ``sam/proj`` (PCA) once per store on ``pca_sample_images`` images spread evenly over the
store (it needs ``images/rgb``, so it runs after ``correspond``), or copies it from ``proj_store`` (e.g. use
the train split's projection for the val split). A fitted projection is reused on resume; it is refitted
when the stage's fingerprint changed (``--overwrite`` with other weights or options). The ``maskclip`` stage
does the same for ``clip/proj`` (:func:`pipeline.stages.base.ensure_projection`).

Config keys (defaults in :attr:`SAMStage.defaults`; ``None`` = the model config's generator default, see
:data:`pipeline.models.sam.GENERATOR_DEFAULTS` for every threshold):

``model_type``            vit_h | vit_l | vit_b
``checkpoint``            SAM checkpoint file — CLI ``--sam-checkpoint``; default: the registry's file in
                          ``$CNS_CHECKPOINTS``/``checkpoints`` (``make weights``)
``points_per_side``       CLI ``--sam-points-per-side`` (32)
``points_per_batch``, ``pred_iou_thresh``, ``stability_score_thresh``, ``stability_score_offset``,
``box_nms_thresh``, ``crop_n_layers``, ``crop_nms_thresh``, ``crop_overlap_ratio``,
``crop_n_points_downscale_factor``, ``min_mask_region_area``   the generator's options
``feat_dim``              D, channels kept by the projection (default 64, the paper's; capped at the embedding
                          width when that is smaller, as for the tiny test model)
``pca_sample_images``     images the projection is fitted on (32)
``proj_store``            path of a store whose ``sam/proj`` to reuse instead of fitting
``batch_size``            images per encoder pass (not part of the fingerprint)
``tiny``                  tiny random-weight SAM with relaxed thresholds — tests only (``--test-tiny-models``)
``random_init``           the real architecture with random weights — benchmarks only
"""
from __future__ import annotations

import time

import numpy as np

from data_cache.schema import IMAGE_SHARD

from .base import (PAPER_FEAT_DIM, STAGES, ShardContext, Stage, cached_sha256, ensure_projection, image_groups,
                   run_group)

GENERATOR_KEYS = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
                  "stability_score_offset", "box_nms_thresh", "crop_n_layers", "crop_nms_thresh",
                  "crop_overlap_ratio", "crop_n_points_downscale_factor", "min_mask_region_area")


@STAGES.register("sam")
class SAMStage(Stage):
    name = "sam"
    version = 1
    defaults = {
        "model_type": "vit_h", "checkpoint": None, **{k: None for k in GENERATOR_KEYS},
        "feat_dim": None, "pca_sample_images": 32, "proj_store": None, "batch_size": 4,
        "tiny": False, "random_init": False,
    }
    uses_gpu = True
    runtime_keys = ("batch_size", "points_per_batch")
    arrays = ("sam/mask_id", "sam/feat", "sam/proj", "sam/proj_mean")

    # -- identity --------------------------------------------------------------------------------------
    def weights_source(self) -> dict:
        from ..models.sam import resolve_weights
        c = self.config
        return resolve_weights(c["model_type"], c["checkpoint"], c["tiny"], c["random_init"])

    def generator_options(self) -> dict:
        """Every generator threshold, resolved: upstream default < the model config's < this config's."""
        from ..models.sam import GENERATOR_DEFAULTS, sam_config
        model_defaults = sam_config(self.weights_source()["model_type"]).get("generator_defaults", {})
        opts = {**GENERATOR_DEFAULTS, **model_defaults}
        opts.update({k: self.config[k] for k in GENERATOR_KEYS if self.config[k] is not None})
        return opts

    def checkpoint_sha256(self) -> str | None:
        src = self.weights_source()
        return cached_sha256(src["path"]) if src["source"] == "checkpoint" else None

    def fingerprint_config(self) -> dict:
        c = {k: v for k, v in self.config.items() if k not in self.runtime_keys and k != "checkpoint"}
        c.update({k: v for k, v in self.generator_options().items() if k not in self.runtime_keys})
        c["feat_dim"] = self.feat_dim()
        return c

    def feat_dim(self) -> int:
        """D: the configured value, else the paper's 64 capped at the embedding width."""
        if self.config["feat_dim"] is not None:
            return int(self.config["feat_dim"])
        from ..models.sam import sam_config
        return min(PAPER_FEAT_DIM, int(sam_config(self.weights_source()["model_type"])["prompt_embed_dim"]))

    # -- model -----------------------------------------------------------------------------------------
    def build_model(self, device: str):
        from ..models.sam import SamMaskFeatureGenerator, build_sam
        c = self.config
        sam, info = build_sam(c["model_type"], c["checkpoint"], c["tiny"], c["random_init"], device=device)
        if self.feat_dim() > info["embed_dim"]:
            raise ValueError(f"feat_dim {self.feat_dim()} exceeds the SAM embedding's {info['embed_dim']} channels")
        gen = SamMaskFeatureGenerator(sam, **self.generator_options())
        gen.info = info
        return gen

    # -- driver ----------------------------------------------------------------------------------------
    def prepare(self, store, adapter) -> None:
        import torch

        from ..models.sam import feature_grid, sam_config
        cfg = sam_config(self.weights_source()["model_type"])
        h, w = feature_grid(store.attrs.image_size, cfg["image_size"], cfg["vit_patch_size"])
        store.set_dims(h=h, w=w, S=cfg["prompt_embed_dim"], D=self.feat_dim())
        store.ensure_arrays(self.arrays)
        device = "cuda" if torch.cuda.is_available() else "cpu"

        def encode(images):  # the model is built on first use only (cached for this process's shards)
            emb, _ = self.get_model(device).encode(images)
            return emb[:, :, :h, :w].float().cpu().numpy()

        ensure_projection(self, store, "sam/proj", "sam/proj_mean", encode)

    # -- worker ----------------------------------------------------------------------------------------
    def process_shard(self, ctx: ShardContext) -> dict:
        from ..models.sam import masks_to_id_map, project
        store, gen = ctx.store, ctx.model
        proj = store.array("sam/proj")[:]
        mean = store.array("sam/proj_mean")[:]
        bs = max(1, int(self.config["batch_size"]))
        rgb = store.array("images/rgb")
        stats = {"images": 0, "masks": 0, "encoder_s": 0.0, "decoder_s": 0.0, "read_s": 0.0, "write_s": 0.0}

        def work(a: int, b: int) -> None:
            t0 = time.perf_counter()
            with ctx.timed("read_s"):
                images = rgb[a:b]
            t1 = time.perf_counter()
            enc0, dec0 = gen.timings["encoder"], gen.timings["decoder"]
            ids, feats = [], []
            with ctx.timed("model_s"):
                for i in range(0, len(images), bs):
                    for out in gen.generate_batch(images[i:i + bs]):
                        ids.append(masks_to_id_map(out["masks"], out["areas"]))
                        feats.append(project(out["embedding"], proj, mean).astype(np.float16))
                        stats["masks"] += int(ids[-1].max()) + 1
            t2 = time.perf_counter()
            with ctx.timed("write_s"):
                store.write_rows("sam/mask_id", a, np.stack(ids))
                store.write_rows("sam/feat", a, np.stack(feats))
            stats["images"] += b - a
            stats["read_s"] += t1 - t0
            stats["encoder_s"] += gen.timings["encoder"] - enc0
            stats["decoder_s"] += gen.timings["decoder"] - dec0
            stats["post_s"] = stats.get("post_s", 0.0) + (t2 - t1) - (gen.timings["encoder"] - enc0) - (
                gen.timings["decoder"] - dec0)
            stats["write_s"] += time.perf_counter() - t2

        for group in image_groups(ctx, max(bs, IMAGE_SHARD)):
            run_group(ctx, group, work)
        return stats
