"""``labels.point_targets``: every pixel-point pair a term of the 3D CE (``pairs``) or a point's first pair
only (``first_pair``, which must reproduce the targets of the code before the option existed)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.point_targets_toy import GOLDEN, SOURCES, toy_batch, toy_targets
from train.config import ConfigError, load_config
from train.labels import IGNORE, LabelSources, point_target_mode, switch_targets, vote_through_pairs
from train.losses import cotraining_loss, pair_cross_entropy


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_batch(tmp_path_factory.mktemp("point_targets"))


def test_first_pair_reproduces_the_targets_before_the_option(toy):
    golden = np.load(GOLDEN)
    now = toy_targets(toy, point_targets="first_pair")
    assert sorted(now) == sorted(golden.files)
    for key in golden.files:
        assert np.array_equal(now[key], golden[key]), key
    # the toy batch does exercise several views: many points have pairs in more than one image
    per_point = torch.bincount(toy["pair_point"], minlength=len(toy["coord"]))
    assert (per_point > 1).float().mean() > 0.3


def test_pairs_differ_from_first_pair_on_the_toy_batch(toy):
    pairs = toy_targets(toy, point_targets="pairs")
    assert pairs["refine1_stage1_3d"].shape == (len(toy["pair_point"]),)
    first = np.load(GOLDEN)["refine1_stage1_3d"]
    # a pair of a point's first pair carries the same stage-1 label as first_pair gave the point
    pp = toy["pair_point"].numpy()
    lowest = np.full(len(first), len(pp))
    np.minimum.at(lowest, pp, np.arange(len(pp)))
    assert np.array_equal(pairs["refine1_stage1_3d"][lowest], first)
    assert (pairs["refine1_stage1_3d"] != first[pp]).any()  # other views disagree somewhere


def _two_view_batch():
    """One point (of two) seen in two images: CLIP says class 1 in image 0, class 2 in image 1."""
    clip = torch.zeros(2, 2, 3, dtype=torch.uint8)
    clip[0, 0, 0], clip[1, 1, 2] = 1, 2
    return {"coord": torch.zeros(2, 3), "point_offset": torch.tensor([0, 2]), "image_offset": torch.tensor([0, 2]),
            "mask_id": torch.full((2, 2, 3), -1, dtype=torch.long), "clip_label": clip, "clip_refined": clip,
            "pair_point": torch.tensor([0, 0, 1]), "pair_image": torch.tensor([0, 1, 1]),
            "pair_uv": torch.tensor([[0, 0], [2, 1], [0, 0]])}


def test_a_point_with_pairs_of_two_labels_gets_both_terms():
    b = _two_view_batch()
    src = LabelSources(b, None, None, num_classes=3, refine=True)
    _, t3, info = switch_targets(src, b, ["clip2d"], ["clip2d"], torch.Generator().manual_seed(0),
                                 point_targets="pairs")
    assert t3.tolist() == [1, 2, 0] and info["share3d"]["clip2d"] == 1.0
    _, t3_first, _ = switch_targets(src, b, ["clip2d"], ["clip2d"], torch.Generator().manual_seed(0),
                                    point_targets="first_pair")
    assert t3_first.tolist() == [1, 0]  # the second view's class 2 is dropped
    logits = torch.randn(2, 3, requires_grad=True)
    loss = cotraining_loss(None, torch.zeros(0), logits, t3, pair_point=b["pair_point"])["ce3d"]
    by_hand = (F.cross_entropy(logits[0:1], torch.tensor([1])) + F.cross_entropy(logits[0:1], torch.tensor([2]))
               + F.cross_entropy(logits[1:2], torch.tensor([0]))) / 3
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)


@pytest.mark.parametrize("balance", ["none", "sqrt_inverse"])
def test_pair_cross_entropy_is_the_per_pair_sum(balance):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 5, generator=g, dtype=torch.float64)
    pair_point = torch.randint(50, (400,), generator=g)
    target = torch.randint(5, (400,), generator=g)
    target[::7] = IGNORE
    a = logits.clone().requires_grad_(True)
    pair_cross_entropy(a, target, pair_point, balance).backward()
    b = logits.clone().requires_grad_(True)
    from train.losses import masked_cross_entropy
    masked_cross_entropy(b[pair_point], target, balance).backward()  # one CE term per pair, [K, L]
    c = logits.clone().requires_grad_(True)
    ref = masked_cross_entropy(c[pair_point], target, balance)
    assert pair_cross_entropy(logits, target, pair_point, balance).item() == pytest.approx(ref.item(), rel=1e-9)
    assert torch.allclose(a.grad.float(), b.grad.float(), atol=1e-7)
    empty = pair_cross_entropy(a, torch.full((3,), IGNORE), torch.zeros(3, dtype=torch.long))
    assert empty.item() == 0 and empty.requires_grad


def test_voted_pairs_take_their_own_mask_majority():
    # point 0 lies in mask 0 of image 0 (votes 1, 1) and in mask 0 of image 1 (votes 2, 2)
    mask_id = torch.zeros(2, 1, 2, dtype=torch.long)
    pair_point, pair_image = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 1, 1])
    pair_uv = torch.tensor([[0, 0], [1, 0], [0, 0], [1, 0]])
    labels = torch.tensor([0, 1, 2, 2])
    pair_point = torch.cat([pair_point, torch.tensor([0])])
    pair_image = torch.cat([pair_image, torch.tensor([1])])
    pair_uv = torch.cat([pair_uv, torch.tensor([[1, 0]])])
    _, points, pairs = vote_through_pairs(labels, mask_id, pair_point, pair_image, pair_uv, 3)
    # image 0's mask: votes {0, 1} -> 0 (ties to the lowest class); image 1's: {2, 2, 0} -> 2
    assert pairs.tolist() == [0, 0, 2, 2, 2] and points.tolist() == [0, 0, 2, 2]


class _ConstantPairSources:
    """Source k labels every pixel, point and pair k."""

    def __init__(self, names, batch):
        H, W = batch["mask_id"].shape[1:]
        self.k = {n: k for k, n in enumerate(names)}
        self.shape, self.P, self.K = batch["mask_id"].shape, len(batch["coord"]), len(batch["pair_point"])

    def get(self, name):
        return torch.full(self.shape, self.k[name]), torch.full((self.P,), self.k[name])

    def pairs(self, name):
        return torch.full((self.K,), self.k[name])


def test_pairs_draw_with_their_pixel_and_independently_per_view(toy):
    src = _ConstantPairSources(SOURCES, toy)
    t2, t3, info = switch_targets(src, toy, SOURCES, SOURCES, torch.Generator().manual_seed(3), point_targets="pairs")
    assert torch.equal(t2[toy["pair_image"], toy["pair_uv"][:, 1], toy["pair_uv"][:, 0]], t3)  # R*_i shared
    assert abs(info["share3d"]["clip3d"] - 0.25) < 0.05
    # the pairs of one point do not all draw one source (they would under first_pair)
    pp = toy["pair_point"]
    spread = torch.zeros(len(toy["coord"]), 4).index_put_((pp, t3), torch.ones(len(pp)), accumulate=True)
    assert ((spread > 0).sum(1) > 1).any()


def test_frame_unit_gives_every_pair_its_frames_source(toy):
    src = _ConstantPairSources(SOURCES, toy)
    _, t3, info = switch_targets(src, toy, SOURCES, SOURCES, torch.Generator().manual_seed(5), unit="frame",
                                 point_targets="pairs")
    frame = (toy["pair_point"] >= toy["point_offset"][1]).long()
    for f, name in enumerate(info["3d"]):
        assert (t3[frame == f] == SOURCES.index(name)).all()


def test_config_defaults_and_pins():
    assert load_config(None)["labels"]["point_targets"] == "pairs"
    for name in ("nuscenes", "scannet"):
        assert load_config(name)["labels"]["point_targets"] == "pairs"
    for name in ("bench_street_cpu", "bench_indoor_cpu", "demo_street_cpu"):
        assert load_config(name)["labels"]["point_targets"] == "first_pair", name
    with pytest.raises(ConfigError, match="labels.point_targets"):
        load_config(None, ["labels.point_targets=every_pair"])
    assert point_target_mode(load_config(None, ["ablation=oracle"])) == "first_pair"
    assert point_target_mode(load_config(None)) == "pairs"


def _gate_batch():
    """One image 1x4, one SAM mask over pixels 0-1 and another over 2-3; four points, one pair each."""
    clip = torch.tensor([[[1, 1, 2, 2]]], dtype=torch.uint8)
    return {"coord": torch.zeros(4, 3), "point_offset": torch.tensor([0, 4]), "image_offset": torch.tensor([0, 1]),
            "mask_id": torch.tensor([[[0, 0, 1, 1]]]), "clip_label": clip, "clip_refined": clip,
            "pair_point": torch.arange(4), "pair_image": torch.zeros(4, dtype=torch.long),
            "pair_uv": torch.tensor([[0, 0], [1, 0], [2, 0], [3, 0]])}


def test_switch_gate_confidence_drops_unsure_predictions_before_the_vote():
    b = _gate_batch()
    pred2d, pred3d = torch.tensor([[[0, 0, 2, 3]]]), torch.tensor([0, 1, 3, 3])
    conf2d, conf3d = torch.tensor([[[0.95, 0.5, 0.5, 0.5]]]), torch.tensor([0.3, 0.99, 0.2, 0.1])
    src = LabelSources(b, pred2d, pred3d, 4, refine=True, gate="confidence", confidence=(conf2d, conf3d),
                       threshold=0.9)
    pix, _ = src.get("pred2d")
    assert pix[0].tolist() == [[0, 0, IGNORE, IGNORE]]  # mask 0 keeps its one confident vote; mask 1 has none
    _, pts = src.get("pred3d")
    assert pts.tolist() == [1, 1, IGNORE, IGNORE] and src.pairs("pred3d").tolist() == [1, 1, IGNORE, IGNORE]
    # where every prediction is gated away, the Eq. 6 draw falls to the CLIP sources
    _, t3, _ = switch_targets(src, b, SOURCES, SOURCES, torch.Generator().manual_seed(0), point_targets="pairs")
    assert t3[2:].tolist() == [2, 2]
    ungated = LabelSources(b, pred2d, pred3d, 4, refine=True)
    assert ungated.get("pred2d")[0][0].tolist() == [[0, 0, 2, 2]]  # the paper's reading: every prediction


def test_switch_gate_agree_sam_keeps_predictions_that_match_the_refined_clip_label():
    b = _gate_batch()
    src = LabelSources(b, torch.tensor([[[1, 1, 3, 3]]]), torch.tensor([1, 1, 2, 0]), 4, refine=False,
                       gate="agree_sam")
    pix, pts = src.get("pred2d")
    assert pix[0].tolist() == [[1, 1, IGNORE, IGNORE]] and pts.tolist() == [1, 1, IGNORE, IGNORE]
    _, pts = src.get("pred3d")
    assert pts.tolist() == [1, 1, 2, IGNORE] and src.pairs("pred3d").tolist() == [1, 1, 2, IGNORE]


def test_switch_gate_config():
    assert load_config(None)["labels"]["switch_gate"] == "none"
    assert load_config(None, ["ablation=gate_confidence"])["labels"]["switch_gate"] == "confidence"
    with pytest.raises(ConfigError, match="labels.switch_gate"):
        load_config(None, ["labels.switch_gate=always"])
    with pytest.raises(ConfigError, match="labels.gate_confidence"):
        load_config(None, ["labels.gate_confidence=1.5"])


def test_a_run_dumped_before_the_new_keys_reads_them_as_it_computed():
    from train.config import backfill_added_keys
    from train.engine import diff_configs
    bench = load_config("bench_indoor_cpu")
    old = copy.deepcopy(bench)
    for key in ("point_targets", "switch_gate", "gate_confidence"):
        old["labels"].pop(key)  # a config.yaml written before issue 26
    assert diff_configs(backfill_added_keys(copy.deepcopy(old)), bench) == []  # its resume goes on
    paper = load_config("scannet")
    old_paper = copy.deepcopy(paper)
    old_paper["labels"].pop("point_targets")
    # a ScanNet run made with first-pair targets is not resumed with pairs: the difference is named
    assert diff_configs(backfill_added_keys(old_paper), paper) == ["labels.point_targets: 'first_pair' -> 'pairs'"]
