"""Refine-through-pairs and label switching against hand-computed cases."""
import pytest
import torch

from train.config import load_config
from train.labels import (IGNORE, LabelSources, allowed_sources, first_pair_of_point, pixels_to_points,
                          points_to_pixels, refine_points_through_pairs, switch_targets)


def test_first_pair_of_point_is_the_lowest_pair_index():
    pair_point = torch.tensor([2, 0, 2, 1])
    assert first_pair_of_point(pair_point, 4).tolist() == [1, 3, 0, -1]


def test_pixels_to_points_reads_the_first_paired_pixel():
    pixels = torch.tensor([[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]])
    pair_point = torch.tensor([1, 0, 1])
    pair_image = torch.tensor([1, 0, 0])
    pair_uv = torch.tensor([[2, 1], [1, 0], [0, 0]])  # (col, row)
    # point 0 -> image 0 (row 0, col 1) = 1; point 1 -> first pair: image 1 (row 1, col 2) = 11; point 2 unpaired
    assert pixels_to_points(pixels, pair_point, pair_image, pair_uv, 3).tolist() == [1, 11, IGNORE]


def _one_image_case():
    # one 2x3 image; mask 0 covers (r0,c0) (r0,c1) (r1,c0); mask 1 covers the right column; (r1,c1) no mask
    mask_id = torch.tensor([[[0, 0, 1], [0, -1, 1]]])
    pair_point = torch.tensor([0, 1, 2, 3])
    pair_image = torch.zeros(4, dtype=torch.long)
    pair_uv = torch.tensor([[0, 0], [1, 0], [0, 1], [2, 0]])
    return mask_id, pair_point, pair_image, pair_uv


def test_refine_points_through_pairs_hand_case():
    mask_id, pp, pi, uv = _one_image_case()
    point_labels = torch.tensor([2, 2, 1, 0, 1])  # point 4 has no pair
    pixels, points = refine_points_through_pairs(point_labels, mask_id, pp, pi, uv, num_classes=3)
    # mask 0 votes {2, 2, 1} -> 2 on its three pixels; mask 1 votes {0} -> 0 on its two; the unmasked,
    # unpaired pixel has no label
    assert pixels.tolist() == [[[2, 2, 0], [2, IGNORE, 0]]]
    # point 2 voted 1 but its mask's majority is 2; the unpaired point keeps its own label
    assert points.tolist() == [2, 2, 2, 0, 1]


def test_refine_points_ignores_unlabelled_votes_and_keeps_unmasked_pairs():
    mask_id = torch.tensor([[[0, 0, -1]]])
    pair_point = torch.tensor([0, 1, 2])
    pair_image = torch.zeros(3, dtype=torch.long)
    pair_uv = torch.tensor([[0, 0], [1, 0], [2, 0]])
    point_labels = torch.tensor([IGNORE, 1, 2])
    pixels, points = refine_points_through_pairs(point_labels, mask_id, pair_point, pair_image, pair_uv, 3)
    assert pixels.tolist() == [[[1, 1, 2]]]  # 255 does not vote; the pixel outside masks keeps its point's label
    assert points.tolist() == [1, 1, 2]


def test_points_to_pixels():
    mask_id, pp, pi, uv = _one_image_case()
    pixels = points_to_pixels(torch.tensor([3, 4, 5, 6]), pp, pi, uv, (1, 2, 3))
    assert pixels.tolist() == [[[3, 4, 6], [5, IGNORE, IGNORE]]]


def _batch():
    mask_id, pp, pi, uv = _one_image_case()
    # two frames of one image and 4 points each (the second frame is a copy shifted by the offsets)
    return {
        "coord": torch.zeros(8, 3), "point_offset": torch.tensor([0, 4, 8]), "image_offset": torch.tensor([0, 1, 2]),
        "mask_id": torch.cat([mask_id, mask_id]),
        "clip_label": torch.tensor([[[1, 0, 0], [1, 1, 0]], [[1, 0, 0], [1, 1, 0]]], dtype=torch.uint8),
        "clip_refined": torch.tensor([[[1, 1, 0], [1, 1, 0]], [[1, 1, 0], [1, 1, 0]]], dtype=torch.uint8),
        "pair_point": torch.cat([pp, pp + 4]), "pair_image": torch.cat([pi, pi + 1]), "pair_uv": torch.cat([uv, uv]),
    }


def test_label_sources_hand_case():
    b = _batch()
    pred2d = torch.tensor([[[2, 2, 1], [0, 0, 1]]] * 2)
    pred3d = torch.tensor([2, 1, 1, 0] * 2)
    src = LabelSources(b, pred2d, pred3d, num_classes=3, refine=True)
    pix, pts = src.get("clip2d")
    assert torch.equal(pix, b["clip_refined"].long()) and pts[:4].tolist() == [1, 1, 1, 0]
    pix, pts = src.get("clip3d")  # raw CLIP at the pairs: [1, 0, 1, 0]; mask 0 votes {1, 0, 1} -> 1
    assert pts[:4].tolist() == [1, 1, 1, 0] and pix[0].tolist() == [[1, 1, 0], [1, IGNORE, 0]]
    pix, pts = src.get("pred2d")  # Eq. 4 per image: mask 0 {2, 2, 0} -> 2, mask 1 {1, 1} -> 1
    assert pix[0].tolist() == [[2, 2, 1], [2, 0, 1]] and pts[:4].tolist() == [2, 2, 2, 1]
    pix, pts = src.get("pred3d")  # mask 0 votes {2, 1, 1} -> 1
    assert pts[:4].tolist() == [1, 1, 1, 0]
    raw = LabelSources(b, pred2d, pred3d, num_classes=3, refine=False)
    assert torch.equal(raw.get("clip2d")[0], b["clip_label"].long())
    assert raw.get("pred3d")[1][:4].tolist() == [2, 1, 1, 0]


def test_allowed_sources_per_stage_and_switch():
    cfg = load_config(None)
    assert allowed_sources(cfg, 1) == (["clip2d"], ["clip2d"])
    assert allowed_sources(cfg, 2) == (["clip2d", "clip3d", "pred2d", "pred3d"],) * 2
    nc = load_config(None, {"ablation": "no_cross_training"})
    assert allowed_sources(nc, 2) == (["clip2d", "pred2d"], ["clip3d", "pred3d"])
    nc2 = load_config(None, {"ablation": "no_cross_training", "labels.stage2_sources": ["clip2d", "pred3d"]})
    assert allowed_sources(nc2, 2) == (["clip2d"], ["pred3d"])
    assert allowed_sources(load_config(None, {"ablation": "no_clip_stage2"}), 2) == (["pred2d", "pred3d"],) * 2


def test_switch_per_frame_draws_each_source_equally_and_per_frame():
    b = _batch()
    pred2d = torch.tensor([[[2, 2, 1], [0, 0, 1]]] * 2)
    pred3d = torch.tensor([2, 1, 1, 0] * 2)
    src = LabelSources(b, pred2d, pred3d, num_classes=3, refine=True)
    names = ["clip2d", "clip3d", "pred2d", "pred3d"]
    g = torch.Generator().manual_seed(0)
    counts = {n: 0 for n in names}
    mixed = 0
    for _ in range(1000):
        t2, t3, ch = switch_targets(src, b, names, names, g, unit="frame")
        for f in range(2):  # each frame's targets are exactly its drawn source's labels
            assert torch.equal(t2[f], src.get(ch["2d"][f])[0][f])
            assert torch.equal(t3[4 * f:4 * f + 4], src.get(ch["3d"][f])[1][4 * f:4 * f + 4])
            counts[ch["2d"][f]] += 1
        mixed += ch["2d"][0] != ch["2d"][1]
    for n in names:  # 2000 draws, p = 1/4: +-4.5 sigma is +-88
        assert abs(counts[n] - 500) < 90, counts
    assert 650 < mixed < 850  # frames draw independently (expected 750)


def test_pred3d_gives_unpaired_points_no_target():
    b = _batch()
    b["coord"] = torch.zeros(9, 3)  # a ninth point, seen by no camera
    b["point_offset"] = torch.tensor([0, 4, 9])
    pred3d = torch.tensor([2, 1, 1, 0, 2, 1, 1, 0, 2])
    for refine in (True, False):
        src = LabelSources(b, torch.zeros(2, 2, 3, dtype=torch.long), pred3d, num_classes=3, refine=refine)
        for name in ("clip2d", "clip3d", "pred2d", "pred3d"):  # consistent: no source labels the unpaired point
            assert src.get(name)[1][8].item() == IGNORE, (name, refine)
        assert (src.get("pred3d")[1][:8] != IGNORE).all()


def test_zero_pairs_give_no_point_targets():
    empty = torch.zeros(0, dtype=torch.long)
    labels = pixels_to_points(torch.zeros(1, 2, 3, dtype=torch.long), empty, empty, torch.zeros(0, 2, dtype=torch.long), 4)
    assert labels.tolist() == [IGNORE] * 4
    b = _batch()
    b.update(pair_point=empty, pair_image=empty, pair_uv=torch.zeros(0, 2, dtype=torch.long))
    src = LabelSources(b, torch.zeros(2, 2, 3, dtype=torch.long), torch.zeros(8, dtype=torch.long), 3, refine=True)
    names = ["clip2d", "clip3d", "pred2d", "pred3d"]
    t2, t3, info = switch_targets(src, b, names, names, torch.Generator().manual_seed(0))
    assert (t3 == IGNORE).all() and info["share3d"]["none"] == 1.0
    assert (t2 != IGNORE).all()  # clip2d and pred2d still label every pixel


class _ConstantSources:
    """Source k labels every pixel and point k (so a target names its source), except where ``holes`` say 255."""

    def __init__(self, names, num_images, hw, num_points, holes=None):
        self.maps = {}
        for k, n in enumerate(names):
            pix = torch.full((num_images,) + hw, k, dtype=torch.long)
            pts = torch.full((num_points,), k, dtype=torch.long)
            for where, idx in (holes or {}).get(n, []):
                (pix.view(-1) if where == "pix" else pts)[idx] = IGNORE
            self.maps[n] = (pix, pts)

    def get(self, name):
        return self.maps[name]


def _pair_batch(num_points=400, hw=(20, 30), seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(hw[0] * hw[1], generator=g)[: num_points - 50]  # distinct pixels; 50 points unpaired
    return {"coord": torch.zeros(num_points, 3), "point_offset": torch.tensor([0, num_points]),
            "image_offset": torch.tensor([0, 1]), "mask_id": torch.zeros((1,) + hw, dtype=torch.long),
            "pair_point": torch.arange(num_points - 50), "pair_image": torch.zeros(num_points - 50, dtype=torch.long),
            "pair_uv": torch.stack([flat % hw[1], flat // hw[1]], 1)}


def test_switch_per_pair_shares_the_draw_between_a_pixel_and_its_point():
    b = _pair_batch()
    names = ["clip2d", "clip3d", "pred2d", "pred3d"]
    unpaired = torch.arange(350, 400)
    holes = {n: [("pts", unpaired)] for n in names}  # as in LabelSources: unpaired points have no label
    src = _ConstantSources(names, 1, (20, 30), 400, holes)
    t2, t3, info = switch_targets(src, b, names, names, torch.Generator().manual_seed(1))
    at_pairs = t2[0, b["pair_uv"][:, 1], b["pair_uv"][:, 0]]
    assert torch.equal(at_pairs, t3[:350])  # R*_i: the same source in the 2D and the 3D term
    assert (t3[350:] == IGNORE).all() and info["share3d"]["none"] == pytest.approx(50 / 400)
    for k, n in enumerate(names):  # 600 pixels, 350 paired points: each source about a quarter
        assert abs((t2 == k).float().mean().item() - 0.25) < 0.07, (n, info)
        assert info["share2d"][n] == pytest.approx((t2 == k).float().mean().item())
        assert abs((t3[:350] == k).float().mean().item() - 0.25) < 0.08
    # two draws with different generators differ: the draw is random per element, not per frame
    t2b, _, _ = switch_targets(src, b, names, names, torch.Generator().manual_seed(2))
    assert 0.5 < (t2b != t2).float().mean().item() < 0.95


def test_switch_per_pair_draws_only_among_sources_that_label_the_element():
    b = _pair_batch()
    names = ["clip2d", "clip3d", "pred2d", "pred3d"]
    # the 3D sources reach no pixel outside the pairs (no SAM mask spread them): those pixels must draw
    # among clip2d / pred2d with equal probability, never end up without a target
    paired = torch.zeros(600, dtype=torch.bool)
    paired[b["pair_uv"][:, 1] * 30 + b["pair_uv"][:, 0]] = True
    lonely = torch.nonzero(~paired).squeeze(1)
    src = _ConstantSources(names, 1, (20, 30), 400, {"clip3d": [("pix", lonely)], "pred3d": [("pix", lonely)]})
    t2, _, info = switch_targets(src, b, names, names, torch.Generator().manual_seed(3))
    lonely_t = t2.view(-1)[lonely]
    assert (lonely_t != IGNORE).all() and set(lonely_t.unique().tolist()) == {0, 2}
    assert abs((lonely_t == 0).float().mean().item() - 0.5) < 0.12
    assert info["share2d"]["none"] == 0


def test_switch_per_pair_without_cross_training_shares_the_kind_of_source():
    b = _pair_batch()
    src = _ConstantSources(["clip2d", "pred2d"], 1, (20, 30), 400)
    src.maps.update(_ConstantSources(["clip3d", "pred3d"], 1, (20, 30), 400).maps)
    t2, t3, _ = switch_targets(src, b, ["clip2d", "pred2d"], ["clip3d", "pred3d"], torch.Generator().manual_seed(4))
    at_pairs = t2[0, b["pair_uv"][:, 1], b["pair_uv"][:, 0]]
    assert torch.equal(at_pairs, t3[:350])  # CLIP for the pixel <=> CLIP for its point
    assert 0.35 < (t3 == 0).float().mean().item() < 0.65


def test_oracle_source_is_the_ground_truth():
    b = _batch()
    b["coord"] = torch.zeros(9, 3)
    b["point_offset"] = torch.tensor([0, 4, 9])
    b["point_gt"] = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    image_gt = torch.full((2, 2, 3), IGNORE, dtype=torch.long)
    image_gt[0] = torch.tensor([[2, 2, 1], [0, 0, 1]])  # the second image has no 2D labels
    b["image_gt"] = image_gt
    src = LabelSources(b, None, None, num_classes=3, refine=True)
    pix, pts = src.get("gt")
    assert torch.equal(pix[0], image_gt[0]) and torch.equal(pts, b["point_gt"])  # the unpaired point too
    # without 2D labels: the labels of the points projecting there (points 4..7 at the frame's pairs)
    assert pix[1].tolist() == [[1, 2, 1], [0, IGNORE, IGNORE]]
    assert allowed_sources(load_config(None, ["ablation=oracle"]), 1) == (["gt"], ["gt"])
    assert allowed_sources(load_config(None, ["ablation=oracle"]), 2) == (["gt"], ["gt"])
