"""Eq. 5-7 against hand-computed values."""
import math

import pytest
import torch

from train.data import affine_grid
from train.losses import (cotraining_loss, features_at_grid, features_at_pairs, latent_consistency,
                          latent_consistency_voxels, latent_losses, masked_cross_entropy, unit_features_at_pairs)
from train.models import CNSModel


def test_eq5_text_logits_are_dot_products_with_the_text_embeddings():
    emb = torch.tensor([[1.0, 2.0], [0.0, -1.0]])  # two points, E = 2
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # three classes
    logits = CNSModel.text_logits(emb, text, dim=1)
    assert torch.allclose(logits, torch.tensor([[1.0, 2.2, 2.0], [0.0, -0.8, -1.0]]))
    image = emb.T.reshape(1, 2, 1, 2)  # [I, E, H, W]: the same two vectors as pixels
    assert torch.allclose(CNSModel.text_logits(image, text, dim=1)[0, :, 0].T, logits)


def test_eq6_masked_cross_entropy_hand_case():
    logits = torch.tensor([[0.0, math.log(3.0)], [5.0, 0.0]])
    target = torch.tensor([1, 255])
    assert masked_cross_entropy(logits, target).item() == pytest.approx(math.log(4 / 3), rel=1e-6)
    none = masked_cross_entropy(logits.requires_grad_(), torch.tensor([255, 255]))
    assert none.item() == 0.0 and none.requires_grad  # all ignored: 0, not NaN
    l2d = torch.zeros(1, 2, 1, 1)  # uniform: CE = log 2
    out = cotraining_loss(l2d, torch.tensor([[[0]]]), logits, target, weight_2d=2.0, weight_3d=1.0)
    assert out["loss"].item() == pytest.approx(2 * math.log(2) + math.log(4 / 3), rel=1e-6)


def test_class_balance_weights_hand_case_and_none_is_plain_ce():
    from train.losses import batch_class_weights
    target = torch.tensor([0, 0, 0, 0, 1, 255, 2, 2, 2, 2, 2, 2, 2, 2, 2])  # counts 4, 1, 9 (one ignored)
    w = batch_class_weights(target, 4, "sqrt_inverse")
    raw = torch.tensor([1 / 2, 1.0, 1 / 3, 0.0])  # 1/sqrt(n), 0 for an absent class
    assert torch.allclose(w, raw * 14 / (raw * torch.tensor([4.0, 1, 9, 0])).sum())
    assert batch_class_weights(target, 4, "none") is None
    logits = torch.randn(15, 4)
    assert torch.allclose(masked_cross_entropy(logits, target, "none"), masked_cross_entropy(logits, target))
    per = torch.nn.functional.cross_entropy(logits, target, ignore_index=255, reduction="none")
    expected = (per * torch.cat([w, torch.zeros(252)])[target.clamp(max=255)]).sum() / 14
    assert torch.allclose(masked_cross_entropy(logits, target, "sqrt_inverse"), expected)
    with pytest.raises(ValueError, match="class_balance"):
        batch_class_weights(target, 4, "inverse")
    all_ignored = torch.full((5,), 255)
    assert masked_cross_entropy(torch.randn(5, 4, requires_grad=True), all_ignored, "sqrt_inverse").item() == 0


def test_eq7_latent_consistency_hand_case():
    pred = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 0.0]])
    target = torch.tensor([[0.0, 2.0], [2.0, 2.0], [-1.0, 0.0]])
    # 1 - cos: orthogonal 1, parallel 0, opposite 2
    assert latent_consistency(pred, target).item() == pytest.approx(1.0)
    valid = torch.tensor([False, True, True])
    assert latent_consistency(pred, target, valid).item() == pytest.approx(1.0)
    assert latent_consistency(pred, target, torch.tensor([False, True, False])).item() == pytest.approx(0.0, abs=1e-6)
    p = pred.clone().requires_grad_()
    t = target.clone().requires_grad_()
    latent_consistency(p, t).backward()
    assert t.grad is None and p.grad is not None  # the SAM side is frozen


def test_features_at_pairs_identity_and_flip():
    feat = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)  # D=2 grid 3x4 == image 3x4
    src_hw = torch.tensor([[3, 4]])
    ident = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    uv = torch.tensor([[0, 0], [3, 2], [1, 2]])
    img = torch.zeros(3, dtype=torch.long)
    got = features_at_pairs(feat, ident, src_hw, img, uv)
    assert torch.allclose(got, feat[0, :, uv[:, 1], uv[:, 0]].T)
    flip = torch.tensor([[-1.0, 4.0, 1.0, 0.0]])  # x_src = 4 - x_out
    got = features_at_pairs(feat, flip, src_hw, img, uv)
    assert torch.allclose(got, feat[0, :, uv[:, 1], 3 - uv[:, 0]].T)
    # a coarser SAM grid (half resolution): the pixel centre (1.5, 0.5) of a 2x4 image on a 1x2 grid
    coarse = torch.tensor([[[[0.0, 10.0]]]])
    v = features_at_pairs(coarse, ident, torch.tensor([[2, 4]]), torch.zeros(1, dtype=torch.long),
                              torch.tensor([[1, 0]]))
    assert v.item() == pytest.approx(2.5)  # grid x = 1.5 / 4 * 2 - 0.5 = 0.25 -> 0.75*0 + 0.25*10


def test_features_at_grid_identity_and_crop():
    feat = torch.randn(1, 3, 4, 6)
    ident = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    got = features_at_grid(feat, ident, torch.tensor([[8, 12]]), (8, 12), (4, 6))
    assert torch.allclose(got, feat, atol=1e-5)
    # the right half of the image, resized to the full output: output cell 1 (centre x = 3) is source x = 7.5, SAM cell 3.25
    crop = torch.tensor([[0.5, 6.0, 1.0, 0.0]])
    got = features_at_grid(feat, crop, torch.tensor([[8, 12]]), (8, 12), (4, 6))
    assert torch.allclose(got[..., 1], 0.75 * feat[..., 3] + 0.25 * feat[..., 4], atol=1e-5)
    g = affine_grid(ident, torch.tensor([[8, 12]]), (8, 12))
    assert g.shape == (1, 8, 12, 2) and g[0, 0, 0].tolist() == pytest.approx([-1 + 1 / 12, -1 + 1 / 8])


def test_latent_targets_switch_terms():
    """Eq. 7 with the SAM feature, the dense CLIP feature, both (one concatenated target) or none."""
    torch.manual_seed(0)
    out = {"logits3d": torch.randn(5, 3), "logits2d": torch.randn(1, 3, 4, 4)}
    batch = {"rgb": torch.zeros(1, 3, 4, 4), "sam_feat": torch.randn(1, 2, 2, 2), "clip_feat": torch.randn(1, 3, 2, 2),
             "affine": torch.tensor([[1.0, 0, 1, 0]]), "src_hw": torch.tensor([[4, 4]]),
             "pair_point": torch.tensor([0, 3]), "pair_image": torch.tensor([0, 0]),
             "pair_uv": torch.tensor([[0, 0], [3, 3]]), "inverse": torch.arange(5)}
    none = latent_losses(dict(out), batch, "none")
    assert none["latent3d"].item() == 0 and none["latent2d"].item() == 0
    sam = latent_losses(dict(out, lat2d=torch.randn(1, 2, 2, 2), lat3d=torch.randn(5, 2)), batch, "sam")
    assert sam["latent3d"].item() > 0 and sam["latent2d"].item() > 0
    # the CLIP target is clip/feat at the paired pixel: a head equal to it gives 0 loss at the pairs
    clip_at_pairs = features_at_pairs(batch["clip_feat"], batch["affine"], batch["src_hw"], batch["pair_image"],
                                      batch["pair_uv"])
    lat3d = torch.randn(5, 3)
    lat3d[batch["pair_point"]] = 2.5 * clip_at_pairs  # cosine ignores the scale
    grid = features_at_grid(batch["clip_feat"], batch["affine"], batch["src_hw"], (4, 4), (2, 2))
    clip = latent_losses(dict(out, lat2d=grid.clone(), lat3d=lat3d), batch, "clip")
    assert clip["latent3d"].item() == pytest.approx(0, abs=1e-6) and clip["latent2d"].item() == pytest.approx(0, abs=1e-6)
    # sam+clip: one target, the concatenation of the two normalised features (width 2 + 3)
    sam_at_pairs = features_at_pairs(batch["sam_feat"], batch["affine"], batch["src_hw"], batch["pair_image"],
                                     batch["pair_uv"])
    head = torch.randn(5, 5)
    both = latent_losses(dict(out, lat2d=torch.randn(1, 5, 2, 2), lat3d=head), batch, "sam+clip")
    target = torch.cat([torch.nn.functional.normalize(sam_at_pairs, dim=-1),
                        torch.nn.functional.normalize(clip_at_pairs, dim=-1)], -1)
    expect = (1 - torch.nn.functional.cosine_similarity(head[batch["pair_point"]], target)).mean()
    assert both["latent3d"].item() == pytest.approx(expect.item(), rel=1e-5)


def test_latent_consistency_per_voxel_equals_per_pair():
    """Eq. 7 in 3D summed per voxel: the value and the gradient of the per-pair mean over pred[voxel of pair]."""
    torch.manual_seed(0)
    pred = torch.randn(7, 4, requires_grad=True)
    pair_voxel = torch.tensor([0, 0, 0, 2, 2, 5, 6, 6, 6, 6, 1])  # several pairs per voxel, voxels 3 and 4 unpaired
    target = torch.randn(len(pair_voxel), 4) * torch.rand(len(pair_voxel), 1) * 3
    per_pair = latent_consistency(pred[pair_voxel], target)
    (grad_pair,) = torch.autograd.grad(per_pair, pred)
    per_voxel = latent_consistency_voxels(pred, pair_voxel, target)
    (grad_voxel,) = torch.autograd.grad(per_voxel, pred)
    assert per_voxel.item() == pytest.approx(per_pair.item(), rel=1e-6)
    assert torch.allclose(grad_voxel, grad_pair, atol=1e-7) and grad_voxel[3:5].abs().sum() == 0
    empty = latent_consistency_voxels(pred, torch.zeros(0, dtype=torch.long), torch.zeros(0, 4))
    assert empty.item() == 0 and empty.requires_grad


@pytest.mark.parametrize("pairs_per_pixel", [0.5, 3])
def test_unit_features_at_pairs_per_pixel_equals_per_pair(pairs_per_pixel):
    """Sampling the grid once per output pixel (many pairs) gives the per-pair bilinear features, normalised."""
    torch.manual_seed(0)
    feat = torch.randn(2, 5, 6, 8)
    affine = torch.tensor([[0.75, 2.0, 0.8, 1.0], [-1.0, 16.0, 1.0, 0.0]])  # a crop, and a flip
    src_hw, out_hw = torch.tensor([[12, 16], [12, 16]]), (10, 16)
    k = int(pairs_per_pixel * 2 * 10 * 16)
    pair_image, pair_uv = torch.randint(0, 2, (k,)), torch.stack([torch.randint(0, 16, (k,)), torch.randint(0, 10, (k,))], 1)
    got = unit_features_at_pairs(feat, affine, src_hw, pair_image, pair_uv, out_hw)
    expect = torch.nn.functional.normalize(features_at_pairs(feat, affine, src_hw, pair_image, pair_uv), dim=-1)
    assert got.shape == (k, 5) and torch.allclose(got, expect, atol=1e-5)
