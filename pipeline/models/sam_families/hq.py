"""HQ-SAM (Ke et al., NeurIPS 2023, ``segment-anything-hq``): ``hq_vit_b``, ``hq_vit_l``, ``hq_vit_h``.

SAM's frozen image encoder and mask decoder plus a learned *HQ output token* whose mask is computed on
features fused from the decoder's upscaled embedding and an early ViT layer (the first global-attention
block, ``compress_vit_feat``). With ``multimask_output`` (what its automatic generator uses) the decoder
returns ONE mask per point: the best of SAM's three by predicted IoU, plus the HQ mask's logits
(``MaskDecoderHQ.forward``, ``hq_token_only=False``). Preprocessing is SAM's (``ResizeLongestSide`` to
1024, padding), so ``sam/feat`` is the same embedding grid as SAM's.

Generators: ``batched`` (default) — :class:`pipeline.models.sam.BatchedMaskGenerator`'s algorithm with the
HQ decoder (the fused HQ features are computed once per image at encode time and indexed per prompt);
``upstream`` — segment_anything_hq's ``SamAutomaticMaskGenerator`` (one encoder pass per image, masks at the
image's size, then reduced). ``--test-tiny-models`` builds ``hq_tiny``: configs/sam/tiny.json's layers with
the HQ decoder, random weights.
"""
from __future__ import annotations

import numpy as np
import torch

from ..sam import RANDOM_SEED, BatchedMaskGenerator, masks_to_id_map, resize_masks, sam_config, sam_from_config
from . import SAM_FAMILIES, SamFamily, load_checked, read_checked
from .sam1 import Sam1, vit_of


@SAM_FAMILIES.register("hq")
class HQ(SamFamily):
    name = "hq"
    models = ("hq_vit_b", "hq_vit_l", "hq_vit_h")
    test_model = "hq_tiny"
    package = "segment_anything_hq"
    install = "pip install -e '.[hq]'"

    @classmethod
    def config(cls, model):
        return Sam1.config(model[len("hq_"):])  # SAM's encoder, input and grid

    @classmethod
    def build(cls, model, checkpoint=None, tiny=False, random_init=False, device="cpu"):
        cls.require()
        src = cls.resolve_weights(model, checkpoint, tiny, random_init)
        sd = read_checked(src["path"], src["model_type"]) if src["source"] == "checkpoint" else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            net = hq_from_config(sam_config(src["model_type"][len("hq_"):]))
        if sd is not None:
            load_checked(net, sd, src["path"], src["model_type"])
        return net.to(device).eval(), {**src, **cls.config(src["model_type"])}

    @classmethod
    def generator_classes(cls):
        return HQBatchedMaskGenerator, HQUpstreamGenerator

    @classmethod
    def detect(cls, state_dict):
        if "mask_decoder.hf_token.weight" not in state_dict:
            return None
        vit = vit_of(state_dict)
        return None if vit is None else f"hq_{vit}"


def hq_from_config(cfg: dict):
    """A random-weight HQ-SAM with the architecture of a ``configs/sam/<type>.json`` (segment_anything_hq's
    ``_build_sam``, configurable; the HQ decoder's ``vit_dim`` = the encoder width)."""
    from segment_anything_hq import modeling
    return sam_from_config(cfg, modeling, decoder="MaskDecoderHQ", vit_dim=cfg["encoder_embed_dim"])


class HQBatchedMaskGenerator(BatchedMaskGenerator):
    """The batched generator with HQ-SAM's encoder outputs and decoder (one mask per point prompt)."""

    @torch.no_grad()
    def encode_features(self, images):
        """``(embedding [B, S, E, E], hq_features [B, S/8, 4E, 4E])``: the HQ features fuse the embedding and
        the first global-attention block's output (``MaskDecoderHQ.forward``), once per image."""
        xs, sizes = self.preprocess(images)
        md = self.sam.mask_decoder
        with self.clock("encoder"), self.autocast():
            emb, interm = self.sam.image_encoder(torch.cat(xs))
            hq = md.embedding_encoder(emb) + md.compress_vit_feat(interm[0].permute(0, 3, 1, 2))
        return (emb.float(), hq.float()), sizes

    def decode_prompts(self, feats, points):
        """``MaskDecoderHQ.predict_masks`` + its multimask selection, each prompt against its own image:
        logits [N, 1, h, w] (best SAM mask + HQ mask) and the best SAM mask's predicted IoU [N, 1]."""
        md = self.sam.mask_decoder
        labels = torch.ones((len(points), 1), dtype=torch.int, device=points.device)
        sparse, dense = self.sam.prompt_encoder(points=(points[:, None, :], labels), boxes=None, masks=None)
        tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight, md.hf_token.weight], dim=0)
        tokens = torch.cat((tokens.unsqueeze(0).expand(len(points), -1, -1), sparse), dim=1)
        src = feats[0] + dense
        pos_src = torch.repeat_interleave(self.sam.prompt_encoder.get_dense_pe(), len(points), dim=0)
        b, c, h, w = src.shape
        hs, src = md.transformer(src, pos_src, tokens)
        n = md.num_mask_tokens  # 3 multimask + 1 single-mask SAM tokens + the HQ token
        mask_tokens = hs[:, 1:1 + n, :]
        up_sam = md.output_upscaling(src.transpose(1, 2).view(b, c, h, w))
        up_hq = md.embedding_maskfeature(up_sam) + feats[1]
        hyper = torch.stack([md.output_hypernetworks_mlps[i](mask_tokens[:, i]) for i in range(n - 1)]
                            + [md.hf_mlp(mask_tokens[:, n - 1])], dim=1)
        b, c, h, w = up_sam.shape
        masks_sam = (hyper[:, :n - 1] @ up_sam.view(b, c, h * w)).view(b, -1, h, w)
        masks_hq = (hyper[:, n - 1:] @ up_hq.view(b, c, h * w)).view(b, -1, h, w)
        iou_multi = md.iou_prediction_head(hs[:, 0, :])[:, 1:n - 1]
        iou, best = torch.max(iou_multi, dim=1)
        return masks_sam[:, 1:n - 1][torch.arange(b), best].unsqueeze(1) + masks_hq, iou.unsqueeze(1)


class HQUpstreamGenerator(HQBatchedMaskGenerator):
    """segment_anything_hq's ``SamAutomaticMaskGenerator`` (its own encoder pass per image) and the
    embedding of that pass for ``sam/feat``."""

    def __init__(self, model, **thresholds):
        from segment_anything_hq import SamAutomaticMaskGenerator
        super().__init__(model, **thresholds)
        self.amg = SamAutomaticMaskGenerator(model, output_mode="binary_mask", **self.thresholds)

    @torch.no_grad()
    def generate_masks(self, image: np.ndarray) -> np.ndarray:
        """bool [M, H, W] at the image's size, in upstream's order."""
        anns = self.amg.generate(image)
        return np.stack([a["segmentation"] for a in anns]) if anns else np.zeros((0, *image.shape[:2]), bool)

    def label_images(self, images, out_hw, grid_hw):
        res = []
        for im in images:
            with self.clock("decoder"):  # encoder, decoder and the generator's filtering together
                masks = self.generate_masks(im)
            emb = self.encode([im])[0][0]  # upstream drops its embedding (reset_image): a second encoder pass
            masks = resize_masks(torch.as_tensor(masks), out_hw).numpy()
            res.append((masks_to_id_map(masks), self.image_grid(emb, im.shape[:2], grid_hw).cpu().numpy()))
        return res
