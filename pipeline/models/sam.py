"""SAM masks and SAM features from one image-encoder pass per image.

Layers, as in segment-anything itself:

* :func:`build_sam` — a ``Sam`` model from a JSON architecture config (``configs/sam/<type>.json``: vit_h,
  vit_l, vit_b, and ``tiny``, a random-weight test model) and an explicit checkpoint. It never falls back
  to random weights by itself.
* :class:`SharedEmbeddingPredictor` — a ``SamPredictor`` that can be *primed* with an embedding computed by a
  batched encoder pass; ``set_image`` then uses it instead of running the encoder again.
* :class:`SamMaskFeatureGenerator` — ``SamAutomaticMaskGenerator`` whose :meth:`~SamMaskFeatureGenerator.
  generate_batch` encodes a batch of images once, primes the predictor with each embedding and returns the
  masks together with the embedding (padding cropped). ``generate`` upstream ends with
  ``predictor.reset_image()``, which drops the embedding; here it is kept from the single pass instead.

Helpers: :func:`feature_grid` (embedding cells that hold image, not padding), :func:`masks_to_id_map` (one
mask id per pixel); :func:`fit_pca`/:func:`project` (the fixed projection to D channels, phi_f of Eq. 7) live in
:mod:`.pca` and are re-exported here.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from . import weights
from .pca import fit_pca, project  # noqa: F401  (the fixed projection, shared with the maskclip stage)
from .weights import WeightsError

CONFIG_DIR = Path(__file__).parent / "configs" / "sam"
#: seed of every random-weight build (driver and workers build the same random model)
RANDOM_SEED = 0

#: SamAutomaticMaskGenerator's thresholds and their upstream defaults (tuned for ViT-H):
GENERATOR_DEFAULTS = {
    "points_per_side": 32,          # grid of points_per_side**2 point prompts over the image
    "points_per_batch": 64,         # point prompts decoded together
    "pred_iou_thresh": 0.88,        # keep masks whose predicted IoU is above this (0 = no filter)
    "stability_score_thresh": 0.95,  # keep masks whose stability score is at least this (0 = no filter)
    "stability_score_offset": 1.0,  # logit offset of the two cut-offs the stability score compares
    "box_nms_thresh": 0.7,          # box IoU above which the lower predicted-IoU mask is dropped
    "crop_n_layers": 0,             # extra crop layers (each runs the encoder again on its crops)
    "crop_nms_thresh": 0.7,         # box NMS across crops
    "crop_overlap_ratio": 512 / 1500,
    "crop_n_points_downscale_factor": 1,
    "min_mask_region_area": 0,      # >0: remove holes/islands smaller than this many pixels (OpenCV)
}

WEIGHTS_HELP = ("get weights with `make weights` (python -m pipeline.models.weights --sam vit_h), then pass "
                "--sam-checkpoint PATH")


@lru_cache(maxsize=None)
def sam_config(model_type: str) -> dict:
    """The architecture config ``configs/sam/<model_type>.json``."""
    p = CONFIG_DIR / f"{model_type}.json"
    if not p.is_file():
        known = sorted(q.stem for q in CONFIG_DIR.glob("*.json"))
        raise KeyError(f"unknown SAM model type '{model_type}' (known: {', '.join(known)})")
    return json.loads(p.read_text())


def resolve_weights(model_type: str = "vit_h", checkpoint: str | None = None, tiny: bool = False,
                    random_init: bool = False) -> dict:
    """``{"source": "tiny"|"random"|"checkpoint", "model_type", "path"?}`` or :class:`WeightsError`.

    Order: ``tiny``/``random_init`` (explicit test flags) > ``checkpoint`` > the registry's default file in
    ``$CNS_CHECKPOINTS``/``checkpoints`` (what ``make weights`` downloads).
    """
    if tiny:
        return {"source": "tiny", "model_type": "tiny"}
    sam_config(model_type)
    if random_init:
        return {"source": "random", "model_type": model_type}
    if checkpoint:
        if not Path(checkpoint).is_file():
            raise WeightsError(f"SAM checkpoint {checkpoint} does not exist; {WEIGHTS_HELP}")
        return {"source": "checkpoint", "model_type": model_type, "path": str(checkpoint)}
    local = weights.find_local("sam", model_type)
    if local is not None:
        return {"source": "checkpoint", "model_type": model_type, "path": str(local)}
    raise WeightsError(f"no SAM {model_type} checkpoint given and {weights.checkpoint_dir()}/ holds none; "
                       f"{WEIGHTS_HELP}")


def sam_from_config(cfg: dict):
    """A randomly initialised ``Sam`` with the architecture of ``cfg`` (upstream ``_build_sam``, configurable)."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    size, patch, dim = cfg["image_size"], cfg["vit_patch_size"], cfg["prompt_embed_dim"]
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=cfg["encoder_depth"], embed_dim=cfg["encoder_embed_dim"], img_size=size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=cfg["encoder_num_heads"],
            patch_size=patch, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=cfg["encoder_global_attn_indexes"], window_size=cfg["window_size"],
            out_chans=dim),
        prompt_encoder=PromptEncoder(
            embed_dim=dim, image_embedding_size=(size // patch, size // patch), input_image_size=(size, size),
            mask_in_chans=cfg["mask_in_chans"]),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=cfg["decoder_depth"], embedding_dim=dim,
                                          mlp_dim=cfg["decoder_mlp_dim"], num_heads=cfg["decoder_num_heads"]),
            transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=cfg["iou_head_hidden_dim"]),
        pixel_mean=list(weights.SAM_PIXEL_MEAN),
        pixel_std=list(weights.SAM_PIXEL_STD),
    )


def build_sam(model_type: str = "vit_h", checkpoint: str | None = None, tiny: bool = False,
              random_init: bool = False, device: str | torch.device = "cpu"):
    """``(sam, info)``: a ``Sam`` in eval mode and where its weights came from (see :func:`resolve_weights`)."""
    src = resolve_weights(model_type, checkpoint, tiny, random_init)
    cfg = sam_config(src["model_type"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        sam = sam_from_config(cfg)
    if src["source"] == "checkpoint":
        sd = torch.load(src["path"], map_location="cpu", weights_only=True)
        sam.load_state_dict(sd, strict=True)
    info = {**src, "embed_dim": cfg["prompt_embed_dim"], "image_size": cfg["image_size"],
            "patch_size": cfg["vit_patch_size"], "generator_defaults": cfg.get("generator_defaults", {})}
    return sam.to(device).eval(), info


def feature_grid(image_hw: Sequence[int], long_side: int = 1024, patch: int = 16) -> tuple[int, int]:
    """Embedding cells (rows, cols) that cover the image rather than the padding.

    SAM resizes the long side to ``long_side`` (``ResizeLongestSide``) and pads to a square; the image then
    spans ``ceil(resized / patch)`` cells per axis: 900x1600 -> 576x1024 -> 36x64, 224x416 -> 551x1024 ->
    35x64, 240x320 -> 768x1024 -> 48x64.
    """
    from segment_anything.utils.transforms import ResizeLongestSide
    h, w = ResizeLongestSide.get_preprocess_shape(int(image_hw[0]), int(image_hw[1]), long_side)
    return math.ceil(h / patch), math.ceil(w / patch)


# ----------------------------------------------------------------------------------------------------------
# predictor and generator
# ----------------------------------------------------------------------------------------------------------
class SharedEmbeddingPredictor(SamPredictor):
    """A ``SamPredictor`` that takes its image embedding from a batched encoder pass when primed.

    :meth:`prime` stores an embedding [1, S, E, E] for an image of ``original_size``; the next ``set_image``
    of an image of that size uses it (and clears the prime) instead of running the encoder.
    ``encoded_images`` counts every image that went through the encoder, here or in a batched pass that
    reports to it (the test that nothing is encoded twice reads it).
    """

    def __init__(self, sam_model):
        super().__init__(sam_model)
        self._primed = None
        self.encoded_images = 0

    def prime(self, features: torch.Tensor, original_size: tuple, input_size: tuple) -> None:
        self._primed = (features, tuple(original_size), tuple(input_size))

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        if self._primed is not None and self._primed[1] == tuple(image.shape[:2]):
            self.reset_image()
            self.features, self.original_size, self.input_size = self._primed
            self.is_image_set = True
            self._primed = None
            return
        super().set_image(image, image_format)

    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size) -> None:
        self.encoded_images += len(transformed_image)
        super().set_torch_image(transformed_image, original_image_size)


class SamMaskFeatureGenerator:
    """Automatic masks and image embeddings, one encoder pass per image.

    Wraps ``SamAutomaticMaskGenerator`` (every threshold of :data:`GENERATOR_DEFAULTS` is a keyword
    argument) with a :class:`SharedEmbeddingPredictor`.

    :meth:`generate_batch` takes uint8 RGB images [B, H, W, 3] (all the same size) and returns one dict per
    image:

    * ``masks`` — bool [M, H, W], the generator's masks after its filters, in its order;
    * ``areas`` — int64 [M] pixel counts; ``predicted_iou``, ``stability_score`` — float32 [M];
    * ``embedding`` — float32 [S, h, w], the image embedding with the padding cells cropped
      (:func:`feature_grid`).
    """

    def __init__(self, sam, **thresholds):
        unknown = set(thresholds) - set(GENERATOR_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown SAM generator options: {sorted(unknown)}")
        self.thresholds = {**GENERATOR_DEFAULTS, **thresholds}
        self.sam = sam
        self.generator = SamAutomaticMaskGenerator(sam, output_mode="binary_mask", **self.thresholds)
        self.generator.predictor = SharedEmbeddingPredictor(sam)
        self.predictor = self.generator.predictor
        self.timings = {"encoder": 0.0, "decoder": 0.0}

    @property
    def device(self) -> torch.device:
        return self.sam.device

    @property
    def image_size(self) -> int:
        return int(self.sam.image_encoder.img_size)

    @property
    def patch_size(self) -> int:
        return int(self.sam.image_encoder.patch_embed.proj.kernel_size[0])

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """One encoder pass over a batch: embeddings [B, S, E, E] and the resized image size (h', w')."""
        tf = self.predictor.transform
        x = [torch.as_tensor(tf.apply_image(np.ascontiguousarray(im))) for im in images]
        input_size = tuple(x[0].shape[:2])
        batch = torch.stack(x).to(self.device).permute(0, 3, 1, 2).contiguous()
        return self.sam.image_encoder(self.sam.preprocess(batch)), input_size

    @torch.no_grad()
    def generate_batch(self, images: np.ndarray) -> list[dict]:
        import time
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images [B, H, W, 3], got {images.dtype} {images.shape}")
        t0 = time.perf_counter()
        emb, input_size = self.encode(images)
        self.predictor.encoded_images += len(images)
        t1 = time.perf_counter()
        gh, gw = feature_grid(images.shape[1:3], self.image_size, self.patch_size)
        out = []
        for i, im in enumerate(images):
            self.predictor.prime(emb[i:i + 1], im.shape[:2], input_size)
            anns = self.generator.generate(im)
            self.predictor._primed = None
            m = np.stack([a["segmentation"] for a in anns]) if anns else np.zeros((0, *im.shape[:2]), bool)
            out.append({
                "masks": m.astype(bool, copy=False),
                "areas": m.sum(axis=(1, 2), dtype=np.int64),
                "predicted_iou": np.array([a["predicted_iou"] for a in anns], np.float32),
                "stability_score": np.array([a["stability_score"] for a in anns], np.float32),
                "embedding": emb[i, :, :gh, :gw].float().cpu().numpy(),
            })
        self.timings["encoder"] += t1 - t0
        self.timings["decoder"] += time.perf_counter() - t1
        return out


# ----------------------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------------------
def masks_to_id_map(masks: np.ndarray, areas: np.ndarray | None = None) -> np.ndarray:
    """One int32 mask id per pixel, ``-1`` where no mask covers the pixel.

    Overlaps: the smaller mask wins (fewer pixels; equal areas: the earlier mask). Ids are ``0..M'-1``,
    ranked by area from the smallest, over the ``M'`` masks that keep at least one pixel (masks hidden
    entirely by smaller ones, and empty masks, get no id). int32 throughout: no wrap-around at 255.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [M, H, W], got {masks.shape}")
    h, w = masks.shape[1:]
    if len(masks) == 0:
        return np.full((h, w), -1, np.int32)
    if areas is None:
        areas = masks.sum(axis=(1, 2))
    order = np.argsort(np.asarray(areas), kind="stable")
    stack = masks[order]
    first = stack.argmax(axis=0)  # the smallest mask covering each pixel
    covered = stack.any(axis=0)
    visible = np.zeros(len(masks), bool)
    visible[np.unique(first[covered])] = True
    rank = np.cumsum(visible) - 1
    return np.where(covered, rank[first], -1).astype(np.int32)
