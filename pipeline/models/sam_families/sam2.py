"""SAM 2.1 (Ravi et al. 2024, the ``sam2`` package): ``sam2.1_hiera_tiny|small|base_plus|large``.

Built by the package's own ``build_sam2`` from its shipped configs (``configs/sam2.1/sam2.1_hiera_*.yaml``);
images go through its ``SAM2ImagePredictor`` (``set_image_batch``: the image *stretched* to the square
1024x1024 input, ImageNet normalisation, the Hiera backbone and FPN neck, ``no_mem_embed`` added), so the
256-channel embedding [S, 64, 64] covers the whole image with no padding; ``sam/feat`` resamples it to the
store's SAM grid (:func:`pipeline.models.sam.feature_grid`), the same grid every family writes.

Generators (the stage's ``generator`` option):

* ``batched`` (default): :class:`pipeline.models.sam.BatchedMaskGenerator`'s algorithm (point grid, the
  decoder's three masks per point, predicted-IoU and stability filters, crop-edge filter, box NMS, crops,
  small regions) with SAM 2's encoder, prompt encoder, mask decoder (its high-resolution features indexed per
  prompt, so the prompts of several images share a decoder call) and mask upscaling — at the image's own size
  the masks of ``SAM2AutomaticMaskGenerator`` (tests/test_sam_families.py), on the device, bf16 possible.
* ``upstream``: the package's ``SAM2AutomaticMaskGenerator``, its predictor primed with the embedding of the
  one encoder pass (so ``sam/feat`` costs no second pass); masks at the image's size, then reduced.

``--test-tiny-models`` builds ``sam2.1_hiera_tiny_test``: the hiera_tiny configuration, random weights, at a
256x256 input (``++model.image_size=256``), with relaxed thresholds (an untrained decoder predicts IoU ~0).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..sam import GENERATOR_DEFAULTS as SAM_DEFAULTS
from ..sam import RANDOM_SEED, BatchedMaskGenerator, SamImageEncoder, check_image, masks_to_id_map, resample_grid, \
    resize_masks
from . import SAM_FAMILIES, SamFamily, blocks_in, load_checked, read_checked

#: model -> the sam2 package's config (as build_sam2 names it) and input size
CONFIGS = {
    "sam2.1_hiera_tiny": ("configs/sam2.1/sam2.1_hiera_t.yaml", 1024),
    "sam2.1_hiera_small": ("configs/sam2.1/sam2.1_hiera_s.yaml", 1024),
    "sam2.1_hiera_base_plus": ("configs/sam2.1/sam2.1_hiera_b+.yaml", 1024),
    "sam2.1_hiera_large": ("configs/sam2.1/sam2.1_hiera_l.yaml", 1024),
    "sam2.1_hiera_tiny_test": ("configs/sam2.1/sam2.1_hiera_t.yaml", 256),
}
#: (Hiera patch-embedding width, number of Hiera blocks) -> model (the configs' embed_dim and sum(stages))
HIERA_SHAPES = {(96, 12): "sam2.1_hiera_tiny", (96, 16): "sam2.1_hiera_small", (112, 24): "sam2.1_hiera_base_plus",
                (144, 48): "sam2.1_hiera_large"}
#: SAM2AutomaticMaskGenerator's own default that differs from SAM's (pred_iou_thresh 0.88 there)
GENERATOR_DEFAULTS = {"pred_iou_thresh": 0.8}
TEST_GENERATOR_DEFAULTS = {"points_per_side": 4, "points_per_batch": 16, "pred_iou_thresh": 0.0,
                           "stability_score_thresh": 0.0, "box_nms_thresh": 0.99, "min_mask_region_area": 0}


@SAM_FAMILIES.register("sam2")
class Sam2(SamFamily):
    name = "sam2"
    models = ("sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus", "sam2.1_hiera_large")
    test_model = "sam2.1_hiera_tiny_test"
    package = "sam2"
    install = "pip install -e '.[sam2]' (SAM2_BUILD_CUDA=0 skips its optional CUDA extension)"

    @classmethod
    def config(cls, model):
        size = CONFIGS[model][1]
        test = model == cls.test_model
        return {"embed_dim": 256, "image_size": size, "patch_size": 16,
                "generator_defaults": TEST_GENERATOR_DEFAULTS if test else GENERATOR_DEFAULTS}

    @classmethod
    def build(cls, model, checkpoint=None, tiny=False, random_init=False, device="cpu"):
        cls.require()
        from sam2.build_sam import build_sam2
        src = cls.resolve_weights(model, checkpoint, tiny, random_init)
        name = src["model_type"]
        config, size = CONFIGS[name]
        sd = read_checked(src["path"], name) if src["source"] == "checkpoint" else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            net = build_sam2(config, None, device="cpu", hydra_overrides_extra=[f"++model.image_size={size}"])
        if sd is not None:
            load_checked(net, sd, src["path"], name)
        return net.to(device).eval(), {**src, **cls.config(name)}

    @classmethod
    def generator_classes(cls):
        return Sam2BatchedMaskGenerator, Sam2UpstreamGenerator

    @classmethod
    def detect(cls, state_dict):
        w = state_dict.get("image_encoder.trunk.patch_embed.proj.weight")
        if w is None or not hasattr(w, "shape"):
            return None
        return HIERA_SHAPES.get((int(w.shape[0]), blocks_in(state_dict, "image_encoder.trunk.blocks.")))


def make_predictor(model):
    """A ``SAM2ImagePredictor`` whose feature sizes follow the model's input size (the package assumes 1024)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    class PrimedPredictor(SAM2ImagePredictor):
        """``set_image`` takes the features of a batched encoder pass when primed for that image's size."""
        primed = None

        def set_image(self, image):
            if self.primed is not None and self.primed[1] == tuple(image.shape[:2]):
                self.reset_predictor()
                self._features, self._orig_hw = self.primed[0], [tuple(image.shape[:2])]
                self._is_image_set, self.primed = True, None
                return
            super().set_image(image)

    p = PrimedPredictor(model)
    s = int(model.image_size)
    p._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    return p


class Sam2Features(SamImageEncoder):
    """The SAM 2 encoder pass (through ``SAM2ImagePredictor``) in the shape the shared generator code reads:
    features ``(image_embed [B, 256, E, E], high_res_s0 [B, 32, 4E, 4E], high_res_s1 [B, 64, 2E, 2E])``."""

    @property
    def predictor(self):
        if getattr(self, "_predictor", None) is None:
            self._predictor = make_predictor(self.sam)
        return self._predictor

    @property
    def image_size(self) -> int:
        return int(self.sam.image_size)

    @property
    def patch_size(self) -> int:
        return int(self.sam.backbone_stride)

    @property
    def mask_threshold(self) -> float:
        return 0.0  # SAM2AutomaticMaskGenerator's and SAM2ImagePredictor's default

    @torch.no_grad()
    def encode_features(self, images):
        for im in images:
            check_image(im)
        with self.clock("encoder"), self.autocast():
            self.predictor.set_image_batch([np.ascontiguousarray(im) for im in images])
        f = self.predictor._features
        feats = (f["image_embed"].float(), *(h.float() for h in f["high_res_feats"]))
        self.predictor.reset_predictor()
        return feats, [(self.image_size, self.image_size)] * len(images)

    def image_grid(self, embedding, image_hw, grid_hw=None):
        """The embedding covers the whole (stretched) image: every cell is image; resampled to ``grid_hw``."""
        return embedding if grid_hw is None else resample_grid(embedding, grid_hw)


class Sam2BatchedMaskGenerator(Sam2Features, BatchedMaskGenerator):
    """:class:`~pipeline.models.sam.BatchedMaskGenerator` with SAM 2's prompt frame, decoder and upscaling."""

    def prompt_coords(self, points, crop_hw):
        """Crop pixels -> the square input frame, float32 as ``SAM2AutomaticMaskGenerator._process_batch``."""
        t = torch.as_tensor(points, dtype=torch.float32)
        return self.predictor._transforms.transform_coords(t, normalize=True, orig_hw=tuple(crop_hw)).numpy()

    def decode_prompts(self, feats, points):
        """SAM 2's prompt encoder and mask decoder, one image's features per prompt (``repeat_image=False``)."""
        m = self.sam
        labels = torch.ones((len(points), 1), dtype=torch.int, device=points.device)
        sparse, dense = m.sam_prompt_encoder(points=(points[:, None, :], labels), boxes=None, masks=None)
        low, iou, _, _ = m.sam_mask_decoder(
            image_embeddings=feats[0], image_pe=m.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
            repeat_image=False, high_res_features=list(feats[1:]))
        return low, iou

    def upscale(self, low, input_size, out_hw):
        """``SAM2Transforms.postprocess_masks``: bilinear from the stretched low-resolution grid to ``out_hw``."""
        return self.predictor._transforms.postprocess_masks(low, tuple(int(v) for v in out_hw))


class Sam2UpstreamGenerator(Sam2Features):
    """``SAM2AutomaticMaskGenerator`` with its predictor primed by one batched encoder pass per call."""

    def __init__(self, model, **thresholds):
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
        unknown = set(thresholds) - set(SAM_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown SAM generator options: {sorted(unknown)}")
        super().__init__(model)
        self.thresholds = {**SAM_DEFAULTS, **GENERATOR_DEFAULTS, **thresholds}
        self.amg = SAM2AutomaticMaskGenerator(model, output_mode="binary_mask", **self.thresholds)
        self.amg.predictor = self.predictor

    @torch.no_grad()
    def generate(self, images) -> list[dict]:
        """Per image: ``masks`` bool [M, H, W] at the image's size (upstream's order) and ``embedding``."""
        images = list(images)
        with self.clock("generator"):
            feats, _ = self.encode_features(images)
            out = []
            for i, im in enumerate(images):
                self.predictor.primed = ({"image_embed": feats[0][i:i + 1],
                                          "high_res_feats": [f[i:i + 1] for f in feats[1:]]}, tuple(im.shape[:2]))
                t0 = time.perf_counter()  # the decoder calls and the generator's own filtering together
                anns = self.amg.generate(im)
                self.timings["decoder"] = self.timings.get("decoder", 0.0) + time.perf_counter() - t0
                self.predictor.primed = None
                m = np.stack([a["segmentation"] for a in anns]) if anns else np.zeros((0, *im.shape[:2]), bool)
                out.append({"masks": m.astype(bool, copy=False), "embedding": feats[0][i]})
        return out

    def label_images(self, images, out_hw, grid_hw):
        """``(mask ids int32 [*out_hw], features float32 [S, *grid_hw])`` per image."""
        res = []
        for r in self.generate(images):
            masks = resize_masks(torch.as_tensor(r["masks"]), out_hw).numpy()
            res.append((masks_to_id_map(masks), self.image_grid(r["embedding"], None, grid_hw).cpu().numpy()))
        return res

