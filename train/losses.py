"""The training losses of CNS (paper section 3.2), each equation in one place.

* **Eq. 5** (the logits) is :meth:`train.models.CNSModel.text_logits`.
* **Eq. 6**: :func:`cotraining_loss`, cross-entropy of the 2D net on pixels and of the 3D net on points
  against the switched targets of :mod:`train.labels`.
* **Eq. 7**: :func:`latent_consistency`, 1 - cos between the projected network features and the frozen,
  normalised SAM (or dense CLIP) features, sampled at the pixels or at the paired pixels of the points
  (:func:`latent_losses`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from data_cache.schema import IGNORE_INDEX as IGNORE

from .config import CLASS_BALANCE
from .data import affine_grid


def batch_class_weights(target: torch.Tensor, num_classes: int, mode: str) -> torch.Tensor | None:
    """Per-class CE weights from the batch's own target histogram (``None`` for ``none``, the paper's plain CE).

    ``sqrt_inverse``: w_c proportional to 1 / sqrt(n_c) over the classes present in the batch, scaled so that
    the weighted count sum_c w_c n_c equals the number of labelled elements (the loss keeps its scale). Not the
    paper's: a choice for small-budget CPU studies, where a class with 0.01 % of the pixels is otherwise never
    learned; it weighs every row of an ablation alike.
    """
    if mode == "none":
        return None
    if mode != "sqrt_inverse":
        raise ValueError(f"loss.class_balance must be one of {CLASS_BALANCE}, got '{mode}'")
    t = target.reshape(-1)
    counts = torch.bincount(t[t != IGNORE].long(), minlength=num_classes)[:num_classes].float()
    weights = torch.where(counts > 0, counts.clamp(min=1).rsqrt(), torch.zeros_like(counts))
    total = (weights * counts).sum()
    return weights * (counts.sum() / total) if total > 0 else torch.ones_like(counts)


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, class_balance: str = "none") -> torch.Tensor:
    """Mean CE over the labelled elements (weighted per :func:`batch_class_weights`); 0 (with a graph) when
    none is labelled, never NaN."""
    weight = batch_class_weights(target, logits.shape[1], class_balance)
    loss = F.cross_entropy(logits.float(), target, weight=weight, ignore_index=IGNORE, reduction="sum")
    return loss / (target != IGNORE).sum().clamp(min=1)


def pair_cross_entropy(logits: torch.Tensor, pair_target: torch.Tensor, pair_point: torch.Tensor,
                       class_balance: str = "none") -> torch.Tensor:
    """Mean CE over the labelled pixel-point pairs: (1/K') sum_k w_{y_k} CE(logits[pair_point[k]], y_k), the 3D
    term of Eq. 5-6 with every pair a term (``labels.point_targets: pairs``).

    ``logits`` [P, L] (per point), ``pair_target`` [K] (255 = no label), ``pair_point`` [K]. Computed as the
    equivalent soft target per point, -sum_c n_{p,c} w_c log softmax(z_p)_c with n_{p,c} the number of the
    point's labelled pairs of class c: the same value and gradient as the per-pair sum without a [K, L] gather
    (rooms: ~10 pairs per point). Class weights as in :func:`masked_cross_entropy`, from the pairs' labels.
    0 (with a graph) when no pair is labelled."""
    labelled = pair_target != IGNORE
    counts = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    counts.index_put_((pair_point[labelled], pair_target[labelled]),
                      torch.ones(int(labelled.sum()), device=logits.device), accumulate=True)
    weight = batch_class_weights(pair_target, logits.shape[1], class_balance)
    if weight is not None:
        counts = counts * weight
    loss = -(counts * F.log_softmax(logits.float(), dim=1)).sum()
    return loss / labelled.sum().clamp(min=1)


def cotraining_loss(logits2d: torch.Tensor | None, target2d: torch.Tensor, logits3d: torch.Tensor | None,
                    target3d: torch.Tensor, weight_2d: float = 1.0, weight_3d: float = 1.0,
                    class_balance: str = "none", pair_point: torch.Tensor | None = None) -> dict:
    """**Eq. 6**: L = w2 * CE(f_2D(x), y_2D) + w3 * CE(f_3D(p), y_3D), pixels [I, L, H, W], points [P, L].

    ``target3d`` is one label per point [P], or with ``pair_point`` [K] given one label per pixel-point pair
    [K] (``labels.point_targets: pairs``, :func:`pair_cross_entropy`). Each CE is a mean over its labelled
    elements (pixels; points or pairs).

    A batch without images has a zero 2D term (with a graph); a 2D-only model (no ``logits3d``) has no 3D
    term at all. ``class_balance``: see :func:`batch_class_weights` (``none``: the paper's CE)."""
    out = {}
    if logits3d is not None:
        out["ce3d"] = (masked_cross_entropy(logits3d, target3d, class_balance) if pair_point is None
                       else pair_cross_entropy(logits3d, target3d, pair_point, class_balance))
    any_logits = logits3d if logits3d is not None else logits2d
    out["ce2d"] = (masked_cross_entropy(logits2d, target2d, class_balance) if logits2d is not None
                   else any_logits.sum() * 0)
    out["loss"] = weight_2d * out["ce2d"] + (weight_3d * out["ce3d"] if "ce3d" in out else 0)
    return out


def latent_consistency(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """**Eq. 7**: mean over elements of 1 - cos(pred, target); features on the last dimension.

    ``target`` is detached: the SAM (or CLIP) side is frozen, only the network's projection trains."""
    # the frozen side normalised once, without autograd; the network's side carries the gradient
    unit = F.normalize(target.detach().float(), dim=-1, eps=1e-6)
    pred = pred.float()
    cos = (pred * unit).sum(-1) / pred.norm(dim=-1).clamp_min(1e-6)
    if valid is not None:
        cos = cos[valid]
    return (1 - cos).mean() if cos.numel() else pred.sum() * 0


def features_at_grid(feat: torch.Tensor, affine: torch.Tensor, src_hw: torch.Tensor, out_hw,
                         grid_hw) -> torch.Tensor:
    """A cached feature grid [I, D, h, w] (``sam/feat``, ``clip/feat``: each grid spans its whole image)
    sampled at the centres of a (gh, gw) grid laid over the augmented output images: [I, D, gh, gw].

    The 2D latent loss runs at the network's feature grid (stride 8): the SAM grid (64x36 for 16:9) and the
    CLIP patch grid (stride 16) are no finer, so sampling at every output pixel would add memory and no
    information.
    """
    scaled = affine.clone().float()
    scaled[:, 0] *= out_hw[1] / grid_hw[1]
    scaled[:, 2] *= out_hw[0] / grid_hw[0]
    grid = affine_grid(scaled, src_hw, grid_hw)
    return F.grid_sample(feat.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def features_at_pairs(feat: torch.Tensor, affine: torch.Tensor, src_hw: torch.Tensor,
                          pair_image: torch.Tensor, pair_uv: torch.Tensor) -> torch.Tensor:
    """Bilinear features [K, D] of a cached grid [I, D, h, w] at the (augmented) pixel of each pair."""
    a = affine[pair_image].float()
    hw = src_hw[pair_image].float()
    x_src = a[:, 0] * (pair_uv[:, 0].float() + 0.5) + a[:, 1]
    y_src = a[:, 2] * (pair_uv[:, 1].float() + 0.5) + a[:, 3]
    h, w = feat.shape[-2:]
    x = (x_src / hw[:, 1] * w - 0.5).clamp(0, w - 1)
    y = (y_src / hw[:, 0] * h - 0.5).clamp(0, h - 1)
    x0, y0 = x.floor().long(), y.floor().long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    wx, wy = (x - x0).unsqueeze(1), (y - y0).unsqueeze(1)
    # channels-last rows, gathered whole: f[pair_image, :, y, x] would gather D strided values per pair
    rows = feat.float().permute(0, 2, 3, 1).reshape(-1, feat.shape[1])
    base = pair_image.long() * (h * w)
    g = lambda yy, xx: rows.index_select(0, base + yy * w + xx)  # noqa: E731  [K, D]
    top = torch.lerp(g(y0, x0), g(y0, x1), wx)
    return torch.lerp(top, torch.lerp(g(y1, x0), g(y1, x1), wx), wy)


def unit_features_at_pairs(feat: torch.Tensor, affine: torch.Tensor, src_hw: torch.Tensor, pair_image: torch.Tensor,
                           pair_uv: torch.Tensor, out_hw) -> torch.Tensor:
    """:func:`features_at_pairs`, L2-normalised: [K, D]. Where the pairs outnumber the output pixels (rooms:
    about four pairs per pixel) the grid is sampled once per pixel (:func:`features_at_grid` at the output
    size: the same bilinear weights) and the pairs gather their pixel's row; otherwise per pair."""
    h, w = int(out_hw[0]), int(out_hw[1])
    if len(pair_image) <= feat.shape[0] * h * w:
        return F.normalize(features_at_pairs(feat, affine, src_hw, pair_image, pair_uv), dim=-1)
    rows = F.normalize(features_at_grid(feat, affine, src_hw, (h, w), (h, w)), dim=1)
    rows = rows.permute(0, 2, 3, 1).reshape(-1, feat.shape[1])
    return rows.index_select(0, (pair_image.long() * h + pair_uv[:, 1].long()) * w + pair_uv[:, 0].long())


#: ``loss.latent_target`` -> the foundation models whose cached feature grid (store array ``<name>/feat``,
#: batch key ``<name>_feat``) its Eq. 7 target is built from.
LATENT_FEATURES = {"sam": ("sam",), "clip": ("clip",), "sam+clip": ("sam", "clip"), "none": ()}


def latent_losses(out: dict, batch: dict, target: str) -> dict:
    """The Eq. 7 terms for ``loss.latent_target`` in {sam, clip, sam+clip, none}.

    theta_f(x) is compared with the target feature at each pixel (at the 2D net's feature grid), phi_f(p)
    with the target feature at the point's paired pixel (every pair counts). The target phi_f(s) is the
    cached, frozen feature: ``sam/feat`` (SAM's image embedding through the store's fixed PCA) for ``sam``,
    ``clip/feat`` (MaskCLIP's dense features, likewise projected) for ``clip``. ``sam+clip`` uses one target,
    the concatenation of the two L2-normalised features (each half weighs the same), against a head of
    the summed width.
    """
    zero = out["logits3d" if "logits3d" in out else "logits2d"].sum() * 0
    res = {"latent2d": zero, **({"latent3d": zero} if "logits3d" in out else {})}
    keys = LATENT_FEATURES[target]
    if not keys:
        return res
    if "logits2d" in out:
        out_hw, grid_hw = batch["rgb"].shape[-2:], out["lat2d"].shape[-2:]
        tgt = torch.cat([F.normalize(features_at_grid(batch[f"{k}_feat"], batch["affine"], batch["src_hw"], out_hw,
                                                      grid_hw), dim=1) for k in keys], 1)
        res["latent2d"] = latent_consistency(out["lat2d"].movedim(1, -1), tgt.movedim(1, -1))
    if "lat3d" not in out:  # a 2D-only model
        return res
    # computed even without pairs (an empty mean is 0): DDP needs phi_f in every rank's graph
    with torch.no_grad():
        tgt = torch.cat([unit_features_at_pairs(batch[f"{k}_feat"], batch["affine"], batch["src_hw"],
                                                batch["pair_image"], batch["pair_uv"], batch["rgb"].shape[-2:])
                         for k in keys], -1)
    res["latent3d"] = latent_consistency_voxels(out["lat3d"], batch["inverse"][batch["pair_point"]], tgt)
    return res


def latent_consistency_voxels(pred_voxel: torch.Tensor, pair_voxel: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """**Eq. 7** for the 3D network, whose feature phi_f(p) is one per voxel: the mean over the K pairs of
    1 - cos(phi_f(voxel of the pair's point), target of the pair) -- :func:`latent_consistency` of
    ``pred_voxel[pair_voxel]`` and ``target``, the same value and gradient, computed per voxel.

    cos(v, t_k) = v/|v| . t_k/|t_k| is linear in the unit target, so the unit targets of a voxel's pairs are
    summed first (without autograd) and the network's side is touched once per voxel rather than once per pair
    (rooms have ten pairs per voxel: a per-pair gather and its backward were a third of a CPU step)."""
    if not len(pair_voxel):
        return pred_voxel.sum() * 0
    unit = F.normalize(target.detach().float(), dim=-1, eps=1e-6)
    summed = torch.zeros(len(pred_voxel), unit.shape[1], dtype=unit.dtype, device=unit.device)
    summed.index_add_(0, pair_voxel, unit)
    pred = pred_voxel.float()
    cos_sum = (pred * summed).sum(-1) / pred.norm(dim=-1).clamp_min(1e-6)
    return 1 - cos_sum.sum() / len(pair_voxel)
