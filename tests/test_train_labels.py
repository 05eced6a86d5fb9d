"""Refine-through-pairs and label switching against hand-computed cases."""
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


def test_switch_targets_draws_each_source_equally_and_per_sample():
    b = _batch()
    pred2d = torch.tensor([[[2, 2, 1], [0, 0, 1]]] * 2)
    pred3d = torch.tensor([2, 1, 1, 0] * 2)
    src = LabelSources(b, pred2d, pred3d, num_classes=3, refine=True)
    names = ["clip2d", "clip3d", "pred2d", "pred3d"]
    g = torch.Generator().manual_seed(0)
    counts = {n: 0 for n in names}
    mixed = 0
    for _ in range(1000):
        t2, t3, ch = switch_targets(src, b, names, names, g)
        for f in range(2):  # each frame's targets are exactly its drawn source's labels
            assert torch.equal(t2[f], src.get(ch["2d"][f])[0][f])
            assert torch.equal(t3[4 * f:4 * f + 4], src.get(ch["3d"][f])[1][4 * f:4 * f + 4])
            counts[ch["2d"][f]] += 1
        mixed += ch["2d"][0] != ch["2d"][1]
    for n in names:  # 2000 draws, p = 1/4: +-4.5 sigma is +-88
        assert abs(counts[n] - 500) < 90, counts
    assert 650 < mixed < 850  # frames draw independently (expected 750)
