"""The foundation models behind the label stages: MaskCLIP (dense CLIP labels) and SAM (masks + features).

* :mod:`.maskclip` — :func:`~.maskclip.build_text_embeddings`, :class:`~.maskclip.MaskCLIP`,
  :class:`~.maskclip.MaskCLIPPredictor`
* :mod:`.sam` — :func:`~.sam.build_sam`, :class:`~.sam.BatchedMaskGenerator`, :class:`~.sam.SamMaskFeatureGenerator`,
  :func:`~.sam.masks_to_id_map`
* :mod:`.dense` — the dense CLIP teachers (``maskclip``, ``sclip``, ``clearclip``, ``naclip``): CLIP's last vision
  block per teacher, behind a registry (``maskclip.dense``); :mod:`.pamr` — PAMR post-processing
* :mod:`.sam_families` — the SAM families behind ``--sam-model`` (SAM, SAM 2.1, HQ-SAM), one module each
  behind a registry; :func:`~.sam_families.family_of`, :func:`~.sam_families.check_architecture`
* :mod:`.pca` — :func:`~.pca.fit_pca`, :func:`~.pca.project`: the fixed projection of SAM and dense CLIP
  features to D channels
* :mod:`.prompts` — the 85 prompt templates and the per-dataset class names
* :mod:`.weights` — the checkpoint registry (``python -m pipeline.models.weights`` downloads)

Architectures are JSON files under ``configs/`` (open_clip style): ``configs/clip/*.json`` are registered with
open_clip's model factory, ``configs/sam/<model_type>.json`` are read by :func:`~.sam.build_sam`.
Submodules import torch, open_clip and segment-anything lazily: importing this package is cheap.
"""
from data_cache.exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "build_maskclip": "pipeline.models.maskclip", "build_text_embeddings": "pipeline.models.maskclip",
    "MaskCLIPPredictor": "pipeline.models.maskclip", "build_sam": "pipeline.models.sam",
    "resolve_weights": "pipeline.models.weights", "WeightsError": "pipeline.models.weights",
})
