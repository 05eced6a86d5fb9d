"""The ``sam`` stage: SAM automatic masks and SAM features, from one encoder pass per image.

Writes, per image at the training resolution:

* ``sam/mask_id`` int32 [I, H, W] — automatic-mask id per pixel, ``-1`` = no mask; ids ``0..M-1`` within an
  image, ranked by area from the smallest; where masks overlap the smaller mask wins
  (:func:`pipeline.models.sam.masks_to_id_map`).
* ``sam/feat`` float16 [I, D, h, w] — the 256-channel image embedding with the padding cells cropped
  (h x w = :func:`pipeline.models.sam.feature_grid` of the training resolution, e.g. 35x64 for 224x416),
  minus ``sam/proj_mean`` and projected by ``sam/proj`` [S, D]: the frozen phi_f of Eq. 7.

SAM sees the dataset's source image (``input: source``, the default: e.g. nuScenes' 1600x900 camera image,
read through the dataset adapter's :meth:`~pipeline.datasets.base.DatasetAdapter.source_images`; SAM resizes
the long side to 1024 itself) and the masks and the feature grid are produced directly at the training
resolution: the decoder's low-resolution masks are upscaled to it, the embedding's image cells are resampled
to its grid. ``input: training`` runs SAM on the stored training image (``images/rgb``) instead.

The generator (``generator``) is the on-device :class:`pipeline.models.sam.BatchedMaskGenerator`
(``batched``, the default) or the model family's own automatic mask generator (``upstream``:
segment-anything's ``SamAutomaticMaskGenerator``, sam2's ``SAM2AutomaticMaskGenerator``, HQ-SAM's; with
``input: source`` its masks come at the source size and are each reduced to the training resolution). At the
same output size both give the same masks (CPU, float32). The model family (SAM, SAM 2.1, HQ-SAM) follows
from ``model_type`` (:mod:`pipeline.models.sam_families`); every family writes the same arrays on the same
grid.

``prepare`` fits ``sam/proj`` (PCA) once per store on ``pca_sample_images`` images spread evenly over the
store (it needs ``images/rgb``, so it runs after ``correspond``), or copies it from ``proj_store`` (e.g. use
the train split's projection for the val split). A fitted projection is reused on resume; it is refitted
when the stage's fingerprint changed (``--overwrite`` with other weights or options). The ``maskclip`` stage
does the same for ``clip/proj`` (:func:`pipeline.stages.base.ensure_projection`).

Config keys (defaults in :attr:`SAMStage.defaults`; ``None`` = the model config's generator default, see
:data:`pipeline.models.sam.GENERATOR_DEFAULTS` for every threshold):

``input``                 source | training: the image SAM sees (see above)
``generator``             batched | upstream (see above)
``bf16``                  bf16 autocast of the encoder and decoder (batched generator; CUDA, also CPU)
``model_type``            CLI ``--sam-model``: vit_h | vit_l | vit_b (SAM), sam2.1_hiera_tiny | small | base_plus |
                          large (SAM 2.1, extra ``.[sam2]``), hq_vit_b | l | h (HQ-SAM, extra ``.[hq]``); each
                          family is a module of :mod:`pipeline.models.sam_families`
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
``batch_size``            images per encoder pass and per generator call (not part of the fingerprint;
                          ``points_per_batch`` is the prompts per decoder call, of several images when batched)
``tiny``                  tiny random-weight SAM with relaxed thresholds — tests only (``--test-tiny-models``)
``random_init``           the real architecture with random weights — benchmarks only
"""
from __future__ import annotations

import time

import numpy as np

from data_cache.errors import OptionError
from data_cache.schema import IMAGE_SHARD

from ..datasets.base import DatasetError
from .base import (PAPER_FEAT_DIM, STAGES, ShardContext, Stage, cached_sha256, ensure_projection, image_groups,
                   run_group)

GENERATOR_KEYS = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
                  "stability_score_offset", "box_nms_thresh", "crop_n_layers", "crop_nms_thresh",
                  "crop_overlap_ratio", "crop_n_points_downscale_factor", "min_mask_region_area")
INPUTS = ("source", "training")
GENERATORS = ("batched", "upstream")


@STAGES.register("sam")
class SAMStage(Stage):
    name = "sam"
    version = 2  # 2: input (source image by default), generator (batched by default), bf16
    defaults = {
        "input": "source", "generator": "batched", "bf16": False,
        "model_type": "vit_h", "checkpoint": None, **{k: None for k in GENERATOR_KEYS},
        "feat_dim": None, "pca_sample_images": 32, "proj_store": None, "batch_size": 4,
        "tiny": False, "random_init": False,
    }
    uses_gpu = True
    runtime_keys = ("batch_size", "points_per_batch")
    arrays = ("sam/mask_id", "sam/feat", "sam/proj", "sam/proj_mean")

    def __init__(self, **config):
        super().__init__(**config)
        c = self.config
        for key, allowed in (("input", INPUTS), ("generator", GENERATORS)):
            if c[key] not in allowed:
                raise OptionError(f"sam option {key}={c[key]!r} is not one of {', '.join(allowed)}")
        if not isinstance(c["bf16"], bool):
            raise OptionError(f"sam option bf16={c['bf16']!r} must be true or false")
        if c["bf16"] and c["generator"] != "batched":
            raise OptionError("sam option bf16=true needs generator=batched (the upstream generator runs in float32)")
        self.family  # an unknown model or a missing extra is one line before anything runs

    @property
    def reads_dataset(self) -> bool:
        """With ``input: source`` the stage reads the source images through the dataset adapter."""
        return self.config["input"] == "source"

    # -- identity --------------------------------------------------------------------------------------
    @property
    def family(self):
        """The SAM family of ``model_type`` (:mod:`pipeline.models.sam_families`); its package must be installed."""
        from ..models.sam_families import family_of
        fam = family_of(self.config["model_type"])
        fam.require()
        return fam

    def weights_source(self) -> dict:
        c = self.config
        return self.family.resolve_weights(c["model_type"], c["checkpoint"], c["tiny"], c["random_init"])

    def model_config(self) -> dict:
        """The resolved model's embedding width, input size, stride and generator defaults."""
        return self.family.config(self.weights_source()["model_type"])

    def generator_options(self) -> dict:
        """Every generator threshold, resolved: upstream default < the model config's < this config's."""
        from ..models.sam import GENERATOR_DEFAULTS
        model_defaults = self.model_config()["generator_defaults"]
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
        return min(PAPER_FEAT_DIM, int(self.model_config()["embed_dim"]))

    # -- model -----------------------------------------------------------------------------------------
    def build_model(self, device: str):
        c, fam = self.config, self.family
        sam, info = fam.build(c["model_type"], c["checkpoint"], c["tiny"], c["random_init"], device=device)
        if self.feat_dim() > info["embed_dim"]:
            raise OptionError(f"feat_dim {self.feat_dim()} exceeds the SAM embedding's {info['embed_dim']} channels")
        gen = fam.generator(sam, c["generator"], bf16=c["bf16"], encoder_batch=max(1, int(c["batch_size"])),
                            **self.generator_options())
        gen.info = info
        return gen

    # -- driver ----------------------------------------------------------------------------------------
    def prepare(self, store, adapter) -> None:
        import torch

        from ..models.sam import feature_grid
        from ..models.sam_families import read_checked
        src = self.weights_source()
        if src["source"] == "checkpoint":  # a checkpoint of another architecture: one line, before any shard
            read_checked(src["path"], src["model_type"])
        cfg = self.model_config()
        h, w = feature_grid(store.attrs.image_size, cfg["image_size"], cfg["patch_size"])
        store.set_dims(h=h, w=w, S=cfg["embed_dim"], D=self.feat_dim())
        store.ensure_arrays(self.arrays)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        grid = (h, w)

        def encode(images):  # the model is built on first use only (cached for this process's shards)
            gen = self.get_model(device)
            emb, _ = gen.encode(images)
            return np.stack([gen.image_grid(e, im.shape[:2], grid).float().cpu().numpy()
                             for e, im in zip(emb, images)])

        def read_rows(rows):  # the images SAM sees (source or training), each frame read once
            off = store.offsets("images")
            images = []
            for f in np.unique(np.searchsorted(off, rows, side="right") - 1):
                frame_images = self.read_images(store, adapter, int(off[f]), int(off[f + 1]))
                images += [frame_images[r - off[f]] for r in rows[(rows >= off[f]) & (rows < off[f + 1])]]
            return images

        ensure_projection(self, store, "sam/proj", "sam/proj_mean", encode, read_rows)

    # -- reading ---------------------------------------------------------------------------------------
    def read_images(self, store, adapter, a: int, b: int) -> list[np.ndarray]:
        """Images of rows ``a:b``: the stored training images, or (``input: source``) the frames' source
        images through the dataset adapter, checked against the store's plan (token, image count)."""
        if self.config["input"] == "training":
            return list(store.array("images/rgb")[a:b])
        if adapter is None:
            raise OptionError("the sam stage with input=source reads the source images through the dataset adapter, "
                             "and none was given (or set the sam option input=training)")
        off = store.offsets("images")
        f0 = int(np.searchsorted(off, a, side="right")) - 1
        f1 = int(np.searchsorted(off, b, side="left"))
        tokens = store.array("frames/token")[f0:f1]
        out = []
        for f in range(f0, f1):
            token = str(tokens[f - f0])
            images = adapter.source_images(f, token)
            planned = int(off[f + 1] - off[f])
            if len(images) != planned:
                raise DatasetError(f"the frame has {len(images)} source images but {planned} were planned", token)
            lo, hi = max(a, int(off[f])), min(b, int(off[f + 1]))
            out.extend(images[lo - int(off[f]):hi - int(off[f])])
        return out

    # -- worker ----------------------------------------------------------------------------------------
    def process_shard(self, ctx: ShardContext) -> dict:
        from ..models.sam import project
        store, gen = ctx.store, ctx.model
        proj = store.array("sam/proj")[:]
        mean = store.array("sam/proj_mean")[:]
        bs = max(1, int(self.config["batch_size"]))
        out_hw = tuple(store.attrs.image_size)
        grid = store.dims()["h"], store.dims()["w"]
        stats = {"images": 0, "masks": 0, "encoder_s": 0.0, "decoder_s": 0.0, "other_s": 0.0, "read_s": 0.0,
                 "write_s": 0.0}

        def work(a: int, b: int) -> None:
            t0 = time.perf_counter()
            with ctx.timed("read_s"):
                images = self.read_images(store, ctx.adapter, a, b)
            t1 = time.perf_counter()
            before = dict(gen.timings)
            ids, feats = [], []
            with ctx.timed("model_s"):
                for i in range(0, len(images), bs):
                    for id_map, feat in gen.label_images(images[i:i + bs], out_hw, grid):
                        ids.append(id_map)
                        feats.append(project(feat, proj, mean).astype(np.float16))
                        stats["masks"] += int(id_map.max()) + 1
            t2 = time.perf_counter()
            with ctx.timed("write_s"):
                store.write_rows("sam/mask_id", a, np.stack(ids))
                store.write_rows("sam/feat", a, np.stack(feats))
            spent = {k: gen.timings.get(k, 0.0) - before.get(k, 0.0) for k in ("encoder", "decoder")}
            stats["images"] += b - a
            stats["read_s"] += t1 - t0
            stats["encoder_s"] += spent["encoder"]
            stats["decoder_s"] += spent["decoder"]
            stats["other_s"] += (t2 - t1) - spent["encoder"] - spent["decoder"]
            stats["write_s"] += time.perf_counter() - t2

        for group in image_groups(ctx, max(bs, IMAGE_SHARD)):
            run_group(ctx, group, work)
        return stats
