"""The ``maskclip`` stage: dense CLIP pseudo-labels per image (paper Eq. 1) and the dense CLIP features.

Writes ``clip/text_embed`` [L, E] and the projection ``clip/proj`` [E, Dc] / ``clip/proj_mean`` [E] (in
``prepare``), and per image ``clip/label`` and ``clip/confidence`` uint8 [H, W] and ``clip/feat`` float16
[Dc, hc, wc]: the dense features the labels were scored from (the L2-normalised MaskCLIP patch embeddings,
one per ViT patch, hc x wc = H/16 x W/16), minus ``clip/proj_mean``, projected by ``clip/proj`` -- a PCA
fitted once per store exactly like ``sam/proj`` (:func:`pipeline.stages.base.ensure_projection`: on
``pca_sample_images`` images spread over the store, reused on resume, or copied from ``proj_store``).
The model (:mod:`pipeline.models.maskclip`) is built at the store's training resolution on first use in a
worker; the text embeddings are computed once on the driver and read back from the store by every shard.

Config keys (defaults in :attr:`MaskCLIPStage.defaults`):

``model``              open_clip architecture (``ViT-B-16``)
``pretrained``         open_clip pretrained tag, e.g. ``openai`` (downloads) — CLI ``--clip-pretrained``
``checkpoint``         checkpoint file, OpenAI or open_clip format — CLI ``--clip-checkpoint``; when neither is
                       given, the registry's file in ``$CNS_CHECKPOINTS``/``checkpoints`` (``make weights``)
``descriptive_names``  use the descriptive class names of :mod:`pipeline.models.prompts` (default: the
                       names CLIP2Scene used, :data:`pipeline.datasets.classes.PROMPT_NAMES`; the words used
                       per class enter the fingerprint as ``prompt_names``)
``key_smoothing``      MaskCLIP key-smoothing threshold, 0 = off (MaskCLIP: 1.0)
``prompt_denoising``   MaskCLIP prompt-denoising threshold, 0 = off (MaskCLIP: 0.5)
``logit_scale``        temperature of the softmax behind ``clip/confidence`` (CLIP's 100)
``feat_dim``           Dc, channels of ``clip/feat`` (default 64, the paper's D; capped at the embedding width E
                       when that is smaller, as for the tiny test model)
``pca_sample_images``  images the projection is fitted on (32)
``proj_store``         path of a store whose ``clip/proj`` to reuse instead of fitting
``batch_size``         images per forward pass, across the frames of a shard (not part of the fingerprint)
``bf16``               the image tower under bfloat16 autocast (for CUDA; changes the output slightly, so it is
                       part of the fingerprint; ``tests/test_maskclip.py`` compares it with float32)
``tiny``               tiny random-weight model — tests only (CLI ``--test-tiny-models``)
``random_init``        the real architecture with random weights — benchmarks only
``dense``              the dense teacher: ``maskclip`` (default, the paper), ``sclip``, ``clearclip``, ``naclip``
                       (:mod:`pipeline.models.dense`: only CLIP's last vision block changes), or ``import``
                       (labels from an external segmenter, :mod:`pipeline.stages.import_labels`)
``naclip_sigma``       sigma of NACLIP's Gaussian window over patch positions (5; only with ``dense=naclip``)
``pamr``               PAMR post-processing of the upsampled scores (NACLIP's defaults; off)

The teacher enters the fingerprint as ``config.teacher`` = ``{"name", "options", "label_free"}`` (read by
:func:`data_cache.schema.teacher_of`; ``cns-cli inspect`` and ``cns-cli eval`` print it).
"""
from __future__ import annotations

import time

import numpy as np

from data_cache.errors import OptionError
from data_cache.schema import IMAGE_SHARD

from ..registry import Registry
from .base import (PAPER_FEAT_DIM, STAGES, ShardContext, Stage, cached_sha256, ensure_projection, image_groups,
                   run_group)

#: stage classes that replace :class:`MaskCLIPStage` for a ``dense`` value that is no CLIP variant (``import``)
TEACHER_STAGES = Registry("maskclip teacher stage")


class _ModelsBySize:
    """A worker's models, one per training resolution (built on first use, then reused)."""

    def __init__(self, factory, device: str):
        self.factory, self.device, self.models = factory, device, {}

    def get(self, image_size):
        key = tuple(int(s) for s in image_size)
        if key not in self.models:
            self.models[key] = self.factory(key, self.device)
        return self.models[key]


@STAGES.register("maskclip")
class MaskCLIPStage(Stage):
    name = "maskclip"
    version = 2  # 2: clip/feat, clip/proj, clip/proj_mean
    defaults = {
        "model": "ViT-B-16", "pretrained": None, "checkpoint": None, "descriptive_names": False,
        "key_smoothing": 0.0, "prompt_denoising": 0.0, "logit_scale": 100.0, "feat_dim": None,
        "pca_sample_images": 32, "proj_store": None, "batch_size": 8, "bf16": False, "tiny": False,
        "random_init": False, "dense": "maskclip", "naclip_sigma": 5.0, "pamr": False,
    }
    #: the keys that make up ``config.teacher`` in the fingerprint instead of standing alone
    teacher_keys = ("dense", "naclip_sigma", "pamr")
    uses_gpu = True
    runtime_keys = ("batch_size",)
    arrays = ("clip/text_embed", "clip/label", "clip/confidence", "clip/feat", "clip/proj", "clip/proj_mean")

    @classmethod
    def for_config(cls, config: dict):
        """The stage class for ``config``: a registered teacher stage (``dense=import``), else this one."""
        dense = config.get("dense", "maskclip")
        return TEACHER_STAGES.get(dense) if dense in TEACHER_STAGES else cls

    def __init__(self, **config):
        super().__init__(**config)
        self.dense_teacher()  # an unknown teacher or option fails here, before anything runs

    def dense_teacher(self):
        """The :class:`pipeline.models.dense.DenseTeacher` of ``config.dense`` with its options."""
        from ..models.dense import TeacherError, get_teacher, teacher_names
        name = self.config["dense"]
        try:
            cls = type(get_teacher(name))
        except KeyError:
            raise TeacherError(f"maskclip.dense '{name}' is no dense teacher (known: "
                               f"{', '.join(teacher_names() + TEACHER_STAGES.names())})") from None
        return cls(**{k: self.config[k] for k in cls.options})

    def teacher_record(self) -> dict:
        """``{"name", "options", "label_free"}``: the teacher as the store records it."""
        teacher = self.dense_teacher()
        return {"name": teacher.name, "options": {**teacher.config, "pamr": bool(self.config["pamr"])},
                "label_free": teacher.label_free}

    # -- identity --------------------------------------------------------------------------------------
    def weights_source(self) -> dict:
        from ..models.weights import resolve_weights
        c = self.config
        return resolve_weights("clip", c["model"], c["checkpoint"], c["pretrained"], c["tiny"], c["random_init"])

    def checkpoint_sha256(self) -> str | None:
        src = self.weights_source()
        return cached_sha256(src["path"]) if src["source"] == "checkpoint" else None

    def fingerprint_config(self) -> dict:
        # the checkpoint's content enters through checkpoint_sha256, not its path
        skip = set(self.runtime_keys) | set(self.teacher_keys) | {"checkpoint"}
        c = {k: v for k, v in self.config.items() if k not in skip}
        c["teacher"] = self.teacher_record()
        c["feat_dim"] = self.feat_dim()
        if self.store_attrs is not None:  # the words put in the prompts, per class (bound to a store)
            c["prompt_names"] = [list(words) for words in self.prompt_words(self.store_attrs)]
        return c

    def prompt_words(self, attrs) -> list[tuple[str, ...]]:
        from ..models.prompts import class_texts
        return class_texts(list(attrs.class_names), descriptive=bool(self.config["descriptive_names"]),
                           dataset=attrs.dataset, own_names=(attrs.dataset_config or {}).get("prompt_names"))

    def architecture(self) -> dict:
        from ..models.maskclip import architecture
        return architecture(self.weights_source()["model"])

    def feat_dim(self) -> int:
        """Dc: the configured value, else the paper's 64 capped at the embedding width E."""
        e = self.architecture()["embed_dim"]
        d = int(self.config["feat_dim"]) if self.config["feat_dim"] is not None else min(PAPER_FEAT_DIM, e)
        if not 0 < d <= e:
            raise OptionError(f"maskclip feat_dim {d} must be in 1..{e} (the CLIP embedding width)")
        return d

    # -- model -----------------------------------------------------------------------------------------
    def _build(self, image_size, device: str):
        from ..models.maskclip import MaskCLIPPredictor, build_maskclip
        c = self.config
        teacher = self.dense_teacher()
        model, tokenizer, info = build_maskclip(c["model"], c["pretrained"], c["checkpoint"], image_size,
                                                c["tiny"], c["random_init"], device=device, dense=teacher.name,
                                                dense_options=teacher.config)
        pred = MaskCLIPPredictor(model, None, logit_scale=c["logit_scale"], prompt_denoising=c["prompt_denoising"],
                                 key_smoothing=c["key_smoothing"], bf16=c["bf16"], pamr=c["pamr"])
        pred.tokenizer, pred.info = tokenizer, info
        return pred

    def build_model(self, device: str):
        self.weights_source()  # fail early, with the message on how to get weights
        return _ModelsBySize(self._build, device)

    # -- driver ----------------------------------------------------------------------------------------
    def prepare(self, store, adapter) -> None:
        import torch
        attrs = store.attrs
        self.prepare_arrays(store, self.arrays)
        device = "cuda" if torch.cuda.is_available() else "cpu"

        def predictor():  # built on first use only, then cached for this process's shards
            return self.get_model(device).get(attrs.image_size)

        self.write_text_embeddings(store, predictor)

        def encode(images):
            return predictor().features(torch.from_numpy(images))[0].cpu().numpy()

        ensure_projection(self, store, "clip/proj", "clip/proj_mean", encode)

    def prepare_arrays(self, store, arrays) -> None:
        """Bind to the store, record the dimensions L, E, Dc, hc, wc and create ``arrays``."""
        attrs = store.attrs
        self.bind(attrs)
        arch = self.architecture()
        h, w = attrs.image_size
        store.set_dims(L=len(attrs.class_names), E=arch["embed_dim"], Dc=self.feat_dim(),
                       hc=h // arch["patch_size"], wc=w // arch["patch_size"])
        store.ensure_arrays(arrays)

    def write_text_embeddings(self, store, encoder) -> None:
        """``clip/text_embed`` from CLIP's text tower (``encoder()`` -> an object with ``model`` and ``tokenizer``,
        called only when this configuration's embeddings are not stored yet)."""
        import json

        from ..models.maskclip import embed_class_words
        fit_key = json.dumps(self.fingerprint(), sort_keys=True, default=str)
        arr = store.array("clip/text_embed")
        if arr.attrs.get("fit_key") == fit_key:  # resume: the text embeddings of this configuration are stored
            return
        enc = encoder()
        words = self.prompt_words(store.attrs)
        text = embed_class_words(enc.model, enc.tokenizer, words)
        arr[:] = text.numpy().astype(np.float32)
        arr.attrs.update({"fit_key": fit_key, "templates": 85, "prompt_names": [list(w) for w in words],
                          "descriptive_names": self.config["descriptive_names"]})

    # -- worker ----------------------------------------------------------------------------------------
    def process_shard(self, ctx: ShardContext) -> dict:
        from ..models.pca import project
        store = ctx.store
        pred = ctx.model.get(store.attrs.image_size)
        pred.set_text(store.array("clip/text_embed")[:])
        proj, mean = store.array("clip/proj")[:], store.array("clip/proj_mean")[:]
        bs = max(1, int(self.config["batch_size"]))
        rgb = store.array("images/rgb")
        stats = {"images": 0, "model_s": 0.0, "read_s": 0.0, "write_s": 0.0}

        def work(a: int, b: int) -> None:
            t0 = time.perf_counter()
            with ctx.timed("read_s"):
                images = rgb[a:b]
            t1 = time.perf_counter()
            labels, conf, feats = [], [], []
            with ctx.timed("model_s"):
                for i in range(0, len(images), bs):
                    lab, c, f = pred.predict(images[i:i + bs], return_features=True)
                    labels.append(lab)
                    conf.append(c)
                    feats.append(project(f, proj, mean).astype(np.float16))
            t2 = time.perf_counter()
            with ctx.timed("write_s"):
                store.write_rows("clip/label", a, np.concatenate(labels))
                store.write_rows("clip/confidence", a, np.concatenate(conf))
                store.write_rows("clip/feat", a, np.concatenate(feats))
            t3 = time.perf_counter()
            stats["images"] += b - a
            stats["read_s"] += t1 - t0
            stats["model_s"] += t2 - t1
            stats["write_s"] += t3 - t2

        for group in image_groups(ctx, max(bs, IMAGE_SHARD)):
            run_group(ctx, group, work)
        return stats
