"""SAM (segment-anything, Kirillov et al. 2023): ``vit_h``, ``vit_l``, ``vit_b``; test model ``tiny``.

The model code, both generators and the architecture configs live in :mod:`pipeline.models.sam`; this module
registers them as the ``sam1`` family.
"""
from __future__ import annotations

from . import SAM_FAMILIES, SamFamily, blocks_in

#: (patch-embedding width, ViT depth) -> model, as in segment-anything's builders and configs/sam/tiny.json
VIT_SHAPES = {(768, 12): "vit_b", (1024, 24): "vit_l", (1280, 32): "vit_h", (32, 2): "tiny"}


def vit_of(state_dict: dict) -> str | None:
    """``vit_b|vit_l|vit_h|tiny`` from the image encoder's patch-embedding width and block count."""
    bias = state_dict.get("image_encoder.patch_embed.proj.bias")
    if bias is None or not hasattr(bias, "shape"):
        return None
    return VIT_SHAPES.get((int(bias.shape[0]), blocks_in(state_dict, "image_encoder.blocks.")))


@SAM_FAMILIES.register("sam1")
class Sam1(SamFamily):
    name = "sam1"
    models = ("vit_h", "vit_l", "vit_b")
    test_model = "tiny"
    package = "segment_anything"
    install = "pip install segment-anything"

    @classmethod
    def config(cls, model: str) -> dict:
        from ..sam import sam_config
        cfg = sam_config(model)
        return {"embed_dim": cfg["prompt_embed_dim"], "image_size": cfg["image_size"],
                "patch_size": cfg["vit_patch_size"], "generator_defaults": cfg.get("generator_defaults", {})}

    @classmethod
    def build(cls, model, checkpoint=None, tiny=False, random_init=False, device="cpu"):
        from ..sam import build_sam
        return build_sam(model, checkpoint, tiny, random_init, device=device)

    @classmethod
    def generator_classes(cls):
        from ..sam import BatchedMaskGenerator, SamMaskFeatureGenerator
        return BatchedMaskGenerator, SamMaskFeatureGenerator

    @classmethod
    def detect(cls, state_dict):
        if "mask_decoder.hf_token.weight" in state_dict:  # HQ-SAM's extra output token
            return None
        return vit_of(state_dict)
