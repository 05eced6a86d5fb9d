"""The training losses of CNS (paper section 3.2), each equation in one place.

* **Eq. 5** (the logits) is :meth:`train.models.CNSModel.text_logits`.
* **Eq. 6**: :func:`cotraining_loss`, cross-entropy of the 2D net on pixels and of the 3D net on points
  against the switched targets of :mod:`train.labels`.
* **Eq. 7**: :func:`latent_consistency`, 1 - cos between the projected network features and the frozen,
  normalised SAM features (sampled at the pixels, or at the paired pixels of the points).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from data_cache.schema import IGNORE_INDEX as IGNORE

from .data import affine_grid


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean CE over the labelled elements; 0 (with a graph) when none is labelled, never NaN."""
    loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="sum")
    return loss / (target != IGNORE).sum().clamp(min=1)


def cotraining_loss(logits2d: torch.Tensor | None, target2d: torch.Tensor, logits3d: torch.Tensor,
                    target3d: torch.Tensor, weight_2d: float = 1.0, weight_3d: float = 1.0) -> dict:
    """**Eq. 6**: L = w2 * CE(f_2D(x), y_2D) + w3 * CE(f_3D(p), y_3D), pixels [I, L, H, W], points [P, L]."""
    out = {"ce3d": masked_cross_entropy(logits3d, target3d)}
    out["ce2d"] = masked_cross_entropy(logits2d, target2d) if logits2d is not None else logits3d.sum() * 0
    out["loss"] = weight_2d * out["ce2d"] + weight_3d * out["ce3d"]
    return out


def latent_consistency(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """**Eq. 7**: mean over elements of 1 - cos(pred, target); features on the last dimension.

    ``target`` is detached: the SAM (or CLIP) side is frozen, only the network's projection trains."""
    cos = F.cosine_similarity(pred.float(), target.detach().float(), dim=-1, eps=1e-6)
    if valid is not None:
        cos = cos[valid]
    return (1 - cos).mean() if cos.numel() else pred.sum() * 0


def sam_features_at_grid(sam_feat: torch.Tensor, affine: torch.Tensor, src_hw: torch.Tensor, out_hw,
                         grid_hw) -> torch.Tensor:
    """SAM features [I, D, gh, gw] at the centres of a (gh, gw) grid laid over the augmented output images.

    The 2D latent loss runs at the network's feature grid (stride 8): the SAM grid (64x36 for 16:9) is no
    finer than that, so sampling at every output pixel would add memory and no information.
    """
    scaled = affine.clone().float()
    scaled[:, 0] *= out_hw[1] / grid_hw[1]
    scaled[:, 2] *= out_hw[0] / grid_hw[0]
    grid = affine_grid(scaled, src_hw, grid_hw)
    return F.grid_sample(sam_feat.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def sam_features_at_pairs(sam_feat: torch.Tensor, affine: torch.Tensor, src_hw: torch.Tensor,
                          pair_image: torch.Tensor, pair_uv: torch.Tensor) -> torch.Tensor:
    """Bilinear SAM features [K, D] at the (augmented) pixel of each pair."""
    a = affine[pair_image].float()
    hw = src_hw[pair_image].float()
    x_src = a[:, 0] * (pair_uv[:, 0].float() + 0.5) + a[:, 1]
    y_src = a[:, 2] * (pair_uv[:, 1].float() + 0.5) + a[:, 3]
    h, w = sam_feat.shape[-2:]
    x = (x_src / hw[:, 1] * w - 0.5).clamp(0, w - 1)
    y = (y_src / hw[:, 0] * h - 0.5).clamp(0, h - 1)
    x0, y0 = x.floor().long(), y.floor().long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    wx, wy = (x - x0).unsqueeze(1), (y - y0).unsqueeze(1)
    f = sam_feat.float()
    g = lambda yy, xx: f[pair_image, :, yy, xx]  # noqa: E731  [K, D]
    return (g(y0, x0) * (1 - wx) * (1 - wy) + g(y0, x1) * wx * (1 - wy)
            + g(y1, x0) * (1 - wx) * wy + g(y1, x1) * wx * wy)


def latent_losses(out: dict, batch: dict, target: str, clip_pixels: torch.Tensor, clip_points: torch.Tensor,
                  text_embed: torch.Tensor) -> dict:
    """The Eq. 7 terms for ``loss.latent_target`` in {sam, clip, sam+clip, none}.

    * SAM: theta_f(x) against the SAM feature at each pixel; phi_f(p) against the SAM feature at the point's
      paired pixel (every pair counts).
    * CLIP: the store caches CLIP's labels, not its dense features, so the CLIP-space target of a pixel or
      point is the text embedding t_y of its (refined) CLIP label y; theta_s / phi_s are compared to it.
    """
    zero = out["logits3d"].sum() * 0
    res = {"latent2d": zero, "latent3d": zero}
    if target == "none":
        return res
    out_hw = batch["rgb"].shape[-2:]
    has_images = "logits2d" in out
    if "sam" in target:
        if has_images:
            grid_hw = out["lat2d"].shape[-2:]
            sam2d = sam_features_at_grid(batch["sam_feat"], batch["affine"], batch["src_hw"], out_hw, grid_hw)
            res["latent2d"] = res["latent2d"] + latent_consistency(out["lat2d"].movedim(1, -1), sam2d.movedim(1, -1))
        # computed even without pairs (an empty mean is 0): DDP needs phi_f in every rank's graph
        sam3d = sam_features_at_pairs(batch["sam_feat"], batch["affine"], batch["src_hw"],
                                      batch["pair_image"], batch["pair_uv"])
        res["latent3d"] = res["latent3d"] + latent_consistency(out["lat3d"][batch["pair_point"]], sam3d)
    if "clip" in target:
        t = text_embed.float()
        if has_images:
            grid_hw = out["emb2d"].shape[-2:]
            ys = ((torch.arange(grid_hw[0], device=t.device) + 0.5) * out_hw[0] / grid_hw[0]).long()
            xs = ((torch.arange(grid_hw[1], device=t.device) + 0.5) * out_hw[1] / grid_hw[1]).long()
            lab = clip_pixels[:, ys][:, :, xs]
            valid = lab != IGNORE
            res["latent2d"] = res["latent2d"] + latent_consistency(
                out["emb2d"].movedim(1, -1), t[lab.clamp(max=len(t) - 1)], valid)
        valid = clip_points != IGNORE
        res["latent3d"] = res["latent3d"] + latent_consistency(out["emb3d"], t[clip_points.clamp(max=len(t) - 1)],
                                                               valid)
    return res
