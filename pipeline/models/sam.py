"""SAM masks and SAM features from one image-encoder pass per image.

Layers, as in segment-anything itself (model / predictor / generator):

* :func:`build_sam` — a ``Sam`` model from a JSON architecture config (``configs/sam/<type>.json``: vit_h,
  vit_l, vit_b, and ``tiny``, a random-weight test model) and an explicit checkpoint. It never falls back
  to random weights by itself.
* :class:`SamImageEncoder` — the encoder pass both generators share: images of any sizes in one batch,
  optional bf16 autocast, the embedding's image cells (:meth:`~SamImageEncoder.image_grid`).
* :class:`SharedEmbeddingPredictor` — a ``SamPredictor`` that can be *primed* with an embedding computed by a
  batched encoder pass; ``set_image`` then uses it instead of running the encoder again.
* :class:`SamMaskFeatureGenerator` (the ``upstream`` generator) — ``SamAutomaticMaskGenerator`` whose
  :meth:`~SamMaskFeatureGenerator.generate_batch` encodes a batch of images once, primes the predictor with
  each embedding and returns the masks together with the embedding (padding cropped). ``generate`` upstream
  ends with ``predictor.reset_image()``, which drops the embedding; here it is kept from the single pass.
* :class:`BatchedMaskGenerator` (the ``batched`` generator, next to it) — upstream's algorithm as tensor
  operations on the model's device, the prompts of several images per decoder call, masks made directly at
  the output size; the same masks as upstream at the same size (CPU, float32).

Helpers: :func:`feature_grid` (embedding cells that hold image, not padding), :func:`masks_to_id_map` (one
mask id per pixel), :func:`upscale_logits` (``Sam.postprocess_masks`` without the padding rows);
:func:`fit_pca`/:func:`project` (the fixed projection to D channels, phi_f of Eq. 7) live in :mod:`.pca` and
are re-exported here.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from . import weights
from .pca import fit_pca, project  # noqa: F401  (the fixed projection, shared with the maskclip stage)
from data_cache.errors import OptionError, UnknownNameError, UnknownOptionError

from .weights import WeightsError  # noqa: F401  (re-exported: the error of a missing checkpoint)
from ..registry import shipped_config_dir

CONFIG_DIR = shipped_config_dir("pipeline.models", "configs/sam")  # package data (setup.cfg)
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


@lru_cache(maxsize=None)
def sam_config(model_type: str) -> dict:
    """The architecture config ``configs/sam/<model_type>.json``."""
    p = CONFIG_DIR / f"{model_type}.json"
    if not p.is_file():
        known = sorted(q.stem for q in CONFIG_DIR.glob("*.json"))
        raise UnknownNameError(f"unknown SAM model type '{model_type}' (known: {', '.join(known)})")
    return json.loads(p.read_text())


def sam_from_config(cfg: dict, modeling=None, decoder: str = "MaskDecoder", **decoder_kwargs):
    """A randomly initialised ``Sam`` with the architecture of ``cfg`` (upstream ``_build_sam``, configurable).

    ``modeling``: the package whose layers to use (default ``segment_anything.modeling``; HQ-SAM passes
    ``segment_anything_hq.modeling``, ``decoder="MaskDecoderHQ"`` and its ``vit_dim``).
    """
    from functools import partial

    if modeling is None:
        from segment_anything import modeling
    size, patch, dim = cfg["image_size"], cfg["vit_patch_size"], cfg["prompt_embed_dim"]
    return modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            depth=cfg["encoder_depth"], embed_dim=cfg["encoder_embed_dim"], img_size=size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=cfg["encoder_num_heads"],
            patch_size=patch, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=cfg["encoder_global_attn_indexes"], window_size=cfg["window_size"],
            out_chans=dim),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=dim, image_embedding_size=(size // patch, size // patch), input_image_size=(size, size),
            mask_in_chans=cfg["mask_in_chans"]),
        mask_decoder=getattr(modeling, decoder)(
            num_multimask_outputs=3,
            transformer=modeling.TwoWayTransformer(depth=cfg["decoder_depth"], embedding_dim=dim,
                                                   mlp_dim=cfg["decoder_mlp_dim"], num_heads=cfg["decoder_num_heads"]),
            transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=cfg["iou_head_hidden_dim"], **decoder_kwargs),
        pixel_mean=list(weights.SAM_PIXEL_MEAN),
        pixel_std=list(weights.SAM_PIXEL_STD),
    )


def build_sam(model_type: str = "vit_h", checkpoint: str | None = None, tiny: bool = False,
              random_init: bool = False, device: str | torch.device = "cpu"):
    """``(sam, info)``: a ``Sam`` in eval mode and where its weights came from (see :meth:`~pipeline.models.sam_families.SamFamily.resolve_weights`)."""
    from .sam_families import load_checked, read_checked
    from .sam_families.sam1 import Sam1
    if not tiny:
        sam_config(model_type)  # an unknown model type is named first
    src = Sam1.resolve_weights(model_type, checkpoint, tiny, random_init)
    cfg = sam_config(src["model_type"])
    # a file of another architecture is one line naming it, before the network is built
    sd = read_checked(src["path"], src["model_type"]) if src["source"] == "checkpoint" else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        sam = sam_from_config(cfg)
    if sd is not None:
        load_checked(sam, sd, src["path"], src["model_type"])
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
# encoder pass, predictor and generators
# ----------------------------------------------------------------------------------------------------------
class _Clock:
    """Seconds per key, synchronising CUDA around each timed block (kernels are asynchronous)."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = {}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def __call__(self, key: str):
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0


def resample_grid(embedding: torch.Tensor, grid_hw: Sequence[int]) -> torch.Tensor:
    """[S, h, w] -> [S, *grid_hw]: bilinear (``align_corners=False``, cells as areas); unchanged when equal."""
    grid_hw = tuple(int(v) for v in grid_hw)
    if tuple(embedding.shape[-2:]) == grid_hw:
        return embedding
    return F.interpolate(embedding[None].float(), grid_hw, mode="bilinear", align_corners=False)[0]


def resize_masks(masks: torch.Tensor, out_hw: Sequence[int], chunk: int = 32) -> torch.Tensor:
    """bool [M, h, w] -> bool [M, *out_hw]: a pixel is in the mask where at least half of its area is."""
    out_hw = tuple(int(v) for v in out_hw)
    if tuple(masks.shape[-2:]) == out_hw:
        return masks
    out = torch.zeros((len(masks), *out_hw), dtype=torch.bool, device=masks.device)
    for i in range(0, len(masks), chunk):  # float copies of a few masks at a time
        out[i:i + chunk] = F.interpolate(masks[i:i + chunk, None].float(), out_hw, mode="area")[:, 0] >= 0.5
    return out


def upscale_logits(low_res: torch.Tensor, image_size: int, input_size: Sequence[int], out_hw: Sequence[int]
                   ) -> torch.Tensor:
    """``Sam.postprocess_masks`` of [N, C, h, w] logits to ``out_hw``, bit for bit, without the padding rows.

    Upstream upscales to the square model input (``image_size``), crops the image's ``input_size`` and resizes
    to the output size. Rows of the square below ``input_size[0]`` are never used: the first upscaling here
    runs only on the low-resolution rows the kept rows read (bilinear with a power-of-two factor, so the scale
    is exact and every kept row sees the same source rows, weights and arithmetic), then the same crop and
    resize follow.
    """
    low = low_res.shape[-2]
    factor = image_size // low
    rows = low
    if image_size % low == 0 and factor & (factor - 1) == 0:
        rows = min(low, int(input_size[0]) // factor + 2)
    x = F.interpolate(low_res[..., :rows, :], (rows * factor, image_size), mode="bilinear", align_corners=False)
    x = x[..., :int(input_size[0]), :int(input_size[1])]
    return F.interpolate(x, tuple(int(v) for v in out_hw), mode="bilinear", align_corners=False)


class SamImageEncoder:
    """The image-encoder pass both generators share: uint8 RGB images of any sizes -> embeddings.

    Each image goes through ``ResizeLongestSide`` (PIL, as ``SamPredictor.set_image``) and ``Sam.preprocess``
    (normalise, pad to the square input) on its own, so images of different sizes share a batch.
    """

    def __init__(self, sam, bf16: bool = False):
        from segment_anything.utils.transforms import ResizeLongestSide
        self.sam = sam
        self.transform = ResizeLongestSide(self.image_size)
        self.bf16 = bool(bf16)
        self.clock = _Clock(self.device)
        if self.bf16:
            check_bf16(self.device)

    @property
    def device(self) -> torch.device:
        return self.sam.device

    @property
    def image_size(self) -> int:
        return int(self.sam.image_encoder.img_size)

    @property
    def patch_size(self) -> int:
        return int(self.sam.image_encoder.patch_embed.proj.kernel_size[0])

    @property
    def timings(self) -> dict:
        return self.clock.seconds

    def autocast(self):
        """bf16 autocast on this model's device when enabled, else nothing."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    @torch.no_grad()
    def encode(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """One encoder pass over a batch: embeddings [B, S, E, E] (float32) and each image's resized size."""
        feats, sizes = self.encode_features(images)
        return feats[0], sizes

    @torch.no_grad()
    def encode_features(self, images: Sequence[np.ndarray]) -> tuple[tuple[torch.Tensor, ...], list[tuple[int, int]]]:
        """What the decoder needs of each image, as a tuple of tensors [B, ...] whose first is the embedding
        [B, S, E, E] (float32), and each image's resized size. SAM: the embedding alone (a family whose decoder
        reads more, e.g. HQ-SAM's early ViT features, overrides this)."""
        xs, sizes = self.preprocess(images)
        with self.clock("encoder"), self.autocast():
            emb = self.sam.image_encoder(torch.cat(xs))
        return (emb.float(),), sizes

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """``ResizeLongestSide`` + ``Sam.preprocess`` per image: inputs [1, 3, L, L] and resized sizes."""
        xs, sizes = [], []
        for im in images:
            check_image(im)
            x = torch.as_tensor(self.transform.apply_image(np.ascontiguousarray(im)), device=self.device)
            sizes.append(tuple(x.shape[:2]))
            xs.append(self.sam.preprocess(x.permute(2, 0, 1).contiguous()[None]))
        return xs, sizes

    def image_grid(self, embedding: torch.Tensor, image_hw: Sequence[int], grid_hw: Sequence[int] | None = None):
        """An image's embedding [S, E, E] -> the cells over the image (padding cropped, :func:`feature_grid`),
        resampled to ``grid_hw`` when given and different (e.g. the training resolution's grid)."""
        gh, gw = feature_grid(image_hw, self.image_size, self.patch_size)
        cells = embedding[:, :gh, :gw]
        return cells if grid_hw is None else resample_grid(cells, grid_hw)


def check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        what = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {what}")


def check_bf16(device: torch.device) -> None:
    """bf16 autocast needs a device that computes in bf16: CUDA with bf16 support, or the CPU."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"bf16 autocast: {torch.cuda.get_device_name(device)} does not support bfloat16")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"bf16 autocast is supported on cuda and cpu devices, not {device.type}")


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

    def unprime(self) -> None:
        """Forget a prime that no ``set_image`` consumed (the next image runs the encoder)."""
        self._primed = None

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


class SamMaskFeatureGenerator(SamImageEncoder):
    """The upstream generator: automatic masks and image embeddings, one encoder pass per image.

    Wraps ``SamAutomaticMaskGenerator`` (every threshold of :data:`GENERATOR_DEFAULTS` is a keyword
    argument) with a :class:`SharedEmbeddingPredictor`.

    :meth:`generate_batch` takes uint8 RGB images [H, W, 3] (a list, sizes may differ, or one array
    [B, H, W, 3]) and returns one dict per image:

    * ``masks`` — bool [M, H, W], the generator's masks after its filters, in its order;
    * ``areas`` — int64 [M] pixel counts; ``predicted_iou``, ``stability_score`` — float32 [M];
    * ``embedding`` — float32 [S, h, w], the image embedding with the padding cells cropped
      (:func:`feature_grid`).

    ``timings``: ``encoder`` (image encoder forward), ``decoder`` (prompt encoder + mask decoder forwards,
    measured by forward hooks), ``generator`` (the whole :meth:`generate_batch`, encoder included).
    """

    def __init__(self, sam, **thresholds):
        unknown = set(thresholds) - set(GENERATOR_DEFAULTS)
        if unknown:
            raise UnknownOptionError(f"unknown SAM generator options: {sorted(unknown)}")
        super().__init__(sam)
        self.thresholds = {**GENERATOR_DEFAULTS, **thresholds}
        self.generator = SamAutomaticMaskGenerator(sam, output_mode="binary_mask", **self.thresholds)
        self.generator.predictor = SharedEmbeddingPredictor(sam)
        self.predictor = self.generator.predictor
        self._timing_decoder = False
        self._t0 = 0.0
        for mod in (sam.prompt_encoder, sam.mask_decoder):
            mod.register_forward_pre_hook(self._decoder_pre)
            mod.register_forward_hook(self._decoder_post)

    def _decoder_pre(self, *_):
        if self._timing_decoder:
            self.clock.sync()
            self._t0 = time.perf_counter()

    def _decoder_post(self, *_):
        if self._timing_decoder:
            self.clock.sync()
            self.timings["decoder"] = self.timings.get("decoder", 0.0) + time.perf_counter() - self._t0

    @torch.no_grad()
    def generate_batch(self, images) -> list[dict]:
        images = list(images)
        with self.clock("generator"):
            emb, input_sizes = self.encode(images)
            self.predictor.encoded_images += len(images)
            out = []
            for i, im in enumerate(images):
                self.predictor.prime(emb[i:i + 1], im.shape[:2], input_sizes[i])
                self._timing_decoder = True
                try:
                    anns = self.generator.generate(im)
                finally:
                    self._timing_decoder = False
                    self.predictor.unprime()
                m = np.stack([a["segmentation"] for a in anns]) if anns else np.zeros((0, *im.shape[:2]), bool)
                out.append({
                    "masks": m.astype(bool, copy=False),
                    "areas": m.sum(axis=(1, 2), dtype=np.int64),
                    "predicted_iou": np.array([a["predicted_iou"] for a in anns], np.float32),
                    "stability_score": np.array([a["stability_score"] for a in anns], np.float32),
                    "embedding": self.image_grid(emb[i], im.shape[:2]).cpu().numpy(),
                })
        return out

    def label_images(self, images, out_hw: Sequence[int], grid_hw: Sequence[int]
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(mask ids int32 [*out_hw], features float32 [S, *grid_hw])`` per image.

        The masks come at the image's size; where that is not ``out_hw`` (SAM on the source image) each
        mask is reduced to ``out_hw`` by :func:`resize_masks` before :func:`masks_to_id_map`.
        """
        res = []
        for out in self.generate_batch(images):
            masks = resize_masks(torch.as_tensor(out["masks"]), out_hw).numpy()
            feat = resample_grid(torch.as_tensor(out["embedding"]), grid_hw).numpy()
            res.append((masks_to_id_map(masks), feat))
        return res


class BatchedMaskGenerator(SamImageEncoder):
    """An on-device automatic mask generator: upstream's algorithm as batched tensor operations.

    The same thresholds as ``SamAutomaticMaskGenerator`` (:data:`GENERATOR_DEFAULTS`, crop layers and
    ``min_mask_region_area`` included) and the same order of operations, per crop of each image: the point
    grid, the decoder's three masks per point, the predicted-IoU filter, the upscaling of the low-resolution
    logits (``Sam.postprocess_masks``), the stability score and its filter, the binary masks and their boxes,
    the crop-edge filter, box NMS within the crop (by predicted IoU), the uncrop, box NMS across crops
    (smaller crops first) and the small-region clean-up. Different from upstream:

    * the point prompts of several images (and crops) are decoded together, ``points_per_batch`` prompts per
      decoder call, each prompt against its own image's embedding;
    * masks stay on the model's device as tensors: no RLE round trip, no ``MaskData`` copies; the
      predicted-IoU filter runs before the upscaling (upstream upscales every mask first; the kept masks are
      the same), and the upscaling computes only the rows of the 1024x1024 intermediate the image covers;
    * the masks are produced directly at ``output_size`` (the decoder's low-resolution logits are upscaled
      to it; crop boxes, the 20-pixel crop-edge tolerance and ``min_mask_region_area`` are scaled with it);
      at the image's own size the result is upstream's, mask for mask, on CPU in float32;
    * ``min_mask_region_area > 0`` (OpenCV connected components, as upstream) is the one step that runs on
      the CPU, on the masks that survived the NMS.

    ``bf16=True`` runs the encoder and the decoder under bf16 autocast (CUDA; also accepted on CPU);
    ``encoder_batch`` is the number of images (crops) per encoder pass.
    ``timings``: ``encoder``, ``decoder`` (prompt encoder + mask decoder forwards) and ``generator`` (the
    whole :meth:`generate`).
    """

    def __init__(self, sam, bf16: bool = False, encoder_batch: int = 4, **thresholds):
        from segment_anything.utils.amg import build_all_layer_point_grids
        unknown = set(thresholds) - set(GENERATOR_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown SAM generator options: {sorted(unknown)}")
        super().__init__(sam, bf16=bf16)
        t = {**GENERATOR_DEFAULTS, **thresholds}
        for key, low in (("points_per_side", 1), ("points_per_batch", 1), ("crop_n_layers", 0),
                         ("crop_n_points_downscale_factor", 1), ("min_mask_region_area", 0)):
            if int(t[key]) != t[key] or t[key] < low:
                raise OptionError(f"SAM generator option {key}={t[key]!r} must be an integer >= {low}")
        if t["min_mask_region_area"] > 0:
            try:
                import cv2  # noqa: F401
            except ImportError:
                raise OptionError("min_mask_region_area > 0 needs OpenCV (opencv-python-headless)") from None
        if int(encoder_batch) < 1:
            raise OptionError(f"encoder_batch must be >= 1, got {encoder_batch}")
        self.thresholds = t
        self.encoder_batch = int(encoder_batch)
        self.point_grids = build_all_layer_point_grids(int(t["points_per_side"]), int(t["crop_n_layers"]),
                                                       int(t["crop_n_points_downscale_factor"]))

    # -- the model-specific pieces (a SAM family overrides these; the algorithm below is shared) ------------
    @property
    def mask_threshold(self) -> float:
        return float(self.sam.mask_threshold)

    def prompt_coords(self, points: np.ndarray, crop_hw: Sequence[int]) -> np.ndarray:
        """Point prompts [N, 2] (x, y) in crop pixels -> the model's input frame (float64, as upstream)."""
        return self.transform.apply_coords(points, crop_hw)

    def decode_prompts(self, feats: tuple[torch.Tensor, ...], points: torch.Tensor):
        """One point prompt per row against its own image's features (``feats`` indexed per prompt, [N, ...]):
        low-resolution mask logits [N, K, h, w] and predicted IoUs [N, K] (SAM: the K = 3 multimask outputs)."""
        labels = torch.ones((len(points), 1), dtype=torch.int, device=points.device)
        sparse, dense = self.sam.prompt_encoder(points=(points[:, None, :], labels), boxes=None, masks=None)
        return self._decode(feats[0], sparse, dense)

    def upscale(self, low: torch.Tensor, input_size: Sequence[int], out_hw: Sequence[int]) -> torch.Tensor:
        """Low-resolution logits [N, 1, h, w] -> logits at ``out_hw`` (``Sam.postprocess_masks``)."""
        return upscale_logits(low, self.image_size, input_size, out_hw)

    # -- the pieces ------------------------------------------------------------------------------------
    def _decode(self, src: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor):
        """``MaskDecoder.forward`` (multimask) with one image embedding per prompt: src [N, S, E, E]."""
        md = self.sam.mask_decoder
        output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1)
        tokens = torch.cat((output_tokens, sparse), dim=1)
        src = src + dense
        pos_src = torch.repeat_interleave(self.sam.prompt_encoder.get_dense_pe(), tokens.shape[0], dim=0)
        b, c, h, w = src.shape
        hs, src = md.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1:(1 + md.num_mask_tokens), :]
        src = src.transpose(1, 2).view(b, c, h, w)
        upscaled = md.output_upscaling(src)
        hyper_in = torch.stack([md.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :])
                                for i in range(md.num_mask_tokens)], dim=1)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        iou_pred = md.iou_prediction_head(iou_token_out)
        return masks[:, 1:], iou_pred[:, 1:]

    @staticmethod
    def _near_crop_edge(boxes: torch.Tensor, crop: Sequence[int], full: Sequence[int], atol) -> torch.Tensor:
        """``is_box_near_crop_edge`` with a per-axis tolerance: boxes in crop coordinates [N, 4]."""
        crop_t = torch.as_tensor(crop, dtype=torch.float, device=boxes.device)
        full_t = torch.as_tensor(full, dtype=torch.float, device=boxes.device)
        tol = torch.as_tensor([atol[0], atol[1], atol[0], atol[1]], dtype=torch.float, device=boxes.device)
        b = (boxes + crop_t[[0, 1, 0, 1]].to(boxes.dtype)).float()
        near_crop = (b - crop_t).abs() <= tol
        near_full = (b - full_t).abs() <= tol
        return (near_crop & ~near_full).any(dim=1)

    @staticmethod
    def id_map(masks: torch.Tensor) -> torch.Tensor:
        """:func:`masks_to_id_map` on the device: int32 [H, W], the smaller mask wins, ``-1`` = none."""
        m, (h, w) = len(masks), masks.shape[-2:]
        chunk = max(1, (1 << 23) // max(1, h * w))  # int64 [chunk, H, W] of at most 64 MiB
        if m == 0:
            return torch.full((h, w), -1, dtype=torch.int32, device=masks.device)
        areas = masks.sum(dim=(1, 2))
        order = torch.sort(areas, stable=True).indices
        rank = torch.empty_like(order)
        rank[order] = torch.arange(m, device=masks.device)
        first = torch.full((h, w), m, dtype=torch.int64, device=masks.device)
        for i in range(0, m, chunk):  # the smallest-ranked mask covering each pixel
            r = rank[i:i + chunk].view(-1, 1, 1)
            first = torch.minimum(first, torch.where(masks[i:i + chunk], r, m).amin(dim=0))
        covered = first < m
        visible = torch.zeros(m + 1, dtype=torch.bool, device=masks.device)
        visible[first[covered]] = True
        new_id = torch.cumsum(visible[:m].to(torch.int64), 0) - 1
        return torch.where(covered, new_id[first.clamp(max=m - 1)], -1).to(torch.int32)

    def _small_regions(self, masks: torch.Tensor, min_area: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Upstream ``postprocess_small_regions`` on one image's masks (CPU: OpenCV): the cleaned masks in
        upstream's order and the indices of the input masks they come from."""
        from segment_anything.utils.amg import batched_mask_to_box, remove_small_regions
        from torchvision.ops import batched_nms
        if len(masks) == 0:
            return masks, torch.zeros(0, dtype=torch.int64, device=masks.device)
        new, scores = [], []
        for mask in masks.cpu().numpy():
            mask, changed = remove_small_regions(mask, min_area, mode="holes")
            unchanged = not changed
            mask, changed = remove_small_regions(mask, min_area, mode="islands")
            new.append(torch.as_tensor(mask))
            scores.append(float(unchanged and not changed))
        new = torch.stack(new)
        keep = batched_nms(batched_mask_to_box(new).float(), torch.as_tensor(scores), torch.zeros(len(new)),
                           iou_threshold=max(self.thresholds["box_nms_thresh"], self.thresholds["crop_nms_thresh"]))
        return new[keep].to(masks.device), keep.to(masks.device)

    # -- the generator -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, images, output_size: Sequence[int] | None = None, grid_size: Sequence[int] | None = None
                 ) -> list[dict]:
        """Masks of a batch of uint8 RGB images (sizes may differ), on the model's device.

        ``output_size`` (H, W): the size the masks are produced at (default: each image's own size);
        ``grid_size``: the feature grid the embedding is resampled to (default: the image's cells).
        One dict per image: ``masks`` bool [M, H, W] (upstream's order), ``predicted_iou``,
        ``stability_score`` [M], ``id_map`` int32 [H, W] (:meth:`id_map`) and ``embedding`` [S, h, w].
        """
        images = list(images)
        for im in images:
            check_image(im)
        with self.clock("generator"):
            jobs = self._crop_jobs(images, output_size)
            emb = self._encode_jobs(images, jobs)
            kept = self._decode_and_filter(jobs, emb)
            per_job = self._nms_within_crops(kept)
            results = []
            for i, im in enumerate(images):
                mine = [j for j, jb in enumerate(jobs) if jb["image"] == i]
                masks, iou, stab = self._merge_crops(im, [jobs[j] for j in mine], [per_job.get(j) for j in mine])
                results.append({"masks": masks, "predicted_iou": iou, "stability_score": stab,
                                "id_map": self.id_map(masks),  # crop 0 (mine[0]) is the whole image
                                "embedding": self.image_grid(emb[0][mine[0]], im.shape[:2], grid_size)})
        return results

    def _crop_jobs(self, images, output_size) -> list[dict]:
        """Upstream's crop boxes of every image (crop 0 = the whole image), each also in output pixels."""
        from segment_anything.utils.amg import generate_crop_boxes
        t, jobs = self.thresholds, []
        for i, im in enumerate(images):
            ih, iw = im.shape[:2]
            oh, ow = (ih, iw) if output_size is None else (int(output_size[0]), int(output_size[1]))
            boxes, layers = generate_crop_boxes((ih, iw), int(t["crop_n_layers"]), t["crop_overlap_ratio"])
            for (x0, y0, x1, y1), layer in zip(boxes, layers):
                obox = [round(x0 * ow / iw), round(y0 * oh / ih), round(x1 * ow / iw), round(y1 * oh / ih)]
                jobs.append({"image": i, "box": [x0, y0, x1, y1], "layer": layer, "obox": obox, "out": (oh, ow),
                             "scale": (ow / iw, oh / ih)})
        return jobs

    def _encode_jobs(self, images, jobs) -> tuple[torch.Tensor, ...]:
        """The crops through the encoder, ``encoder_batch`` at a time: :meth:`encode_features` of every crop,
        concatenated (the embeddings [J, S, E, E] first)."""
        embs = []
        for j in range(0, len(jobs), self.encoder_batch):
            batch = jobs[j:j + self.encoder_batch]
            crops = [images[jb["image"]][jb["box"][1]:jb["box"][3], jb["box"][0]:jb["box"][2]] for jb in batch]
            e, sizes = self.encode_features(crops)
            embs.append(e)
            for jb, size, crop in zip(batch, sizes, crops):
                jb["input_size"], jb["crop_hw"] = size, crop.shape[:2]
        return tuple(torch.cat(parts) for parts in zip(*embs))

    def _decode_and_filter(self, jobs, emb) -> dict:
        """Upstream ``_process_batch`` for the point prompts of every crop, ``points_per_batch`` per decoder
        call: per crop, the masks (in crop output pixels), boxes, predicted IoUs and stability scores kept."""
        from segment_anything.utils.amg import batched_mask_to_box, calculate_stability_score
        t, dev = self.thresholds, self.device
        coords, owner = [], []
        for j, jb in enumerate(jobs):  # point prompts in the model's input frame (float64, as upstream)
            pts = self.point_grids[jb["layer"]] * np.array(jb["crop_hw"])[None, ::-1]
            coords.append(self.prompt_coords(pts, jb["crop_hw"]))
            owner.append(np.full(len(pts), j))
        coords = torch.as_tensor(np.concatenate(coords), device=dev)
        owner = torch.as_tensor(np.concatenate(owner), device=dev)
        kept = {}
        ppb = int(t["points_per_batch"])
        for s in range(0, len(coords), ppb):
            pts, own = coords[s:s + ppb], owner[s:s + ppb]
            with self.clock("decoder"), self.autocast():
                low, iou = self.decode_prompts(tuple(f.index_select(0, own) for f in emb), pts)
            low, iou = low.float().flatten(0, 1), iou.float().flatten(0, 1)
            own3 = own.repeat_interleave(low.shape[0] // len(own))
            keep = iou > t["pred_iou_thresh"] if t["pred_iou_thresh"] > 0.0 else torch.ones_like(iou, dtype=torch.bool)
            for j in torch.unique_consecutive(own).tolist():
                sel = (keep & (own3 == j)).nonzero()[:, 0]
                if len(sel) == 0:
                    continue
                jb = jobs[j]
                ox0, oy0, ox1, oy1 = jb["obox"]
                logits = self.upscale(low[sel][:, None], jb["input_size"], (oy1 - oy0, ox1 - ox0))[:, 0]
                stab = calculate_stability_score(logits, self.mask_threshold, t["stability_score_offset"])
                if t["stability_score_thresh"] > 0.0:
                    ok = stab >= t["stability_score_thresh"]
                    logits, stab, sel = logits[ok], stab[ok], sel[ok]
                masks = logits > self.mask_threshold
                boxes = batched_mask_to_box(masks)
                full = [0, 0, jb["out"][1], jb["out"][0]]
                if jb["obox"] != full:  # masks touching the crop's edge inside the image
                    edge = self._near_crop_edge(boxes, jb["obox"], full, (20.0 * jb["scale"][0], 20.0 * jb["scale"][1]))
                    masks, boxes, stab, sel = masks[~edge], boxes[~edge], stab[~edge], sel[~edge]
                k = kept.setdefault(j, {"masks": [], "boxes": [], "iou": [], "stab": []})
                for key, value in (("masks", masks), ("boxes", boxes), ("iou", iou[sel]), ("stab", stab)):
                    k[key].append(value)
        return {j: {key: torch.cat(v) for key, v in k.items()} for j, k in kept.items()}

    def _nms_within_crops(self, kept: dict) -> dict:
        """Box NMS within each crop by predicted IoU (upstream ``_process_crop``), one call for every crop of
        every image (a crop is an NMS category); each crop's survivors in upstream's order."""
        from torchvision.ops import batched_nms
        if not kept:
            return {}
        present = list(kept)
        boxes = torch.cat([kept[j]["boxes"] for j in present])
        scores = torch.cat([kept[j]["iou"] for j in present])
        job_of = torch.cat([torch.full((len(kept[j]["boxes"]),), j, device=boxes.device) for j in present])
        start = dict(zip(present, np.cumsum([0] + [len(kept[j]["boxes"]) for j in present])[:-1].tolist()))
        keep = batched_nms(boxes.float(), scores, job_of, iou_threshold=self.thresholds["box_nms_thresh"])
        kept_job = job_of[keep]
        out = {}
        for j in present:
            idx = keep[kept_job == j] - start[j]
            out[j] = {key: v[idx] for key, v in kept[j].items()}
        return out

    def _merge_crops(self, image, jobs, crops) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image: its crops' masks uncropped, NMS across crops (smaller crops first), the small-region
        clean-up; ``(masks, predicted_iou, stability_score)`` in upstream's order."""
        from torchvision.ops import batched_nms
        t, dev = self.thresholds, self.device
        oh, ow = jobs[0]["out"]
        masks, iou, stab, boxes, crop_area = [], [], [], [], []
        for jb, d in zip(jobs, crops):
            if d is None:
                continue
            (ox0, oy0, ox1, oy1), (x0, y0, x1, y1) = jb["obox"], jb["box"]
            whole = (ox0, oy0, ox1, oy1) == (0, 0, ow, oh)
            masks.append(d["masks"] if whole else F.pad(d["masks"], (ox0, ow - ox1, oy0, oh - oy1), value=False))
            boxes.append(d["boxes"] + torch.tensor([[ox0, oy0, ox0, oy0]], device=dev))
            iou.append(d["iou"])
            stab.append(d["stab"])
            crop_area.append(torch.full((len(d["iou"]),), (x1 - x0) * (y1 - y0), dtype=torch.int64))
        if not masks:
            return torch.zeros((0, oh, ow), dtype=torch.bool, device=dev), torch.zeros(0, device=dev), \
                torch.zeros(0, device=dev)
        masks, iou, stab, boxes = (torch.cat(v) for v in (masks, iou, stab, boxes))
        if len(jobs) > 1:
            keep = batched_nms(boxes.float(), (1 / torch.cat(crop_area)).to(dev), torch.zeros(len(boxes), device=dev),
                               iou_threshold=t["crop_nms_thresh"])
            masks, iou, stab = masks[keep], iou[keep], stab[keep]
        if t["min_mask_region_area"] > 0:
            ih, iw = image.shape[:2]
            masks, keep = self._small_regions(masks, t["min_mask_region_area"] * (oh * ow) / (ih * iw))
            iou, stab = iou[keep], stab[keep]
        return masks, iou, stab

    def label_images(self, images, out_hw: Sequence[int], grid_hw: Sequence[int]
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(mask ids int32 [*out_hw], features float32 [S, *grid_hw])`` per image, made at ``out_hw``."""
        return [(r["id_map"].cpu().numpy(), r["embedding"].float().cpu().numpy())
                for r in self.generate(images, output_size=out_hw, grid_size=grid_hw)]


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
