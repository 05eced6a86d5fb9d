"""SAM max-voting (Eq. 4): the vectorised vote against the per-mask loop, a hand case, the ``refine`` stage."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.refine import sam_max_vote, sam_max_vote_loop
from pipeline.stages.base import Shard, ShardContext, build_stage

from .test_maskclip import H, W, make_store

IGNORE = 255


def random_case(rng, shape, num_classes, num_masks, p_ignore, p_nomask):
    labels = rng.integers(0, num_classes, size=shape)
    labels[rng.random(shape) < p_ignore] = IGNORE
    ids = rng.integers(0, max(1, num_masks), size=shape)
    ids[rng.random(shape) < p_nomask] = -1
    return torch.from_numpy(labels.astype(np.uint8)), torch.from_numpy(ids.astype(np.int32))


@pytest.mark.parametrize("seed", range(40))
def test_vectorised_equals_loop(seed):
    rng = np.random.default_rng(seed)
    batch = [(), (2,), (3, 2)][seed % 3]
    shape = (*batch, int(rng.integers(1, 12)), int(rng.integers(1, 12)))
    # few classes and tiny masks make ties frequent; some cases are all-ignore or all-no-mask
    labels, ids = random_case(rng, shape, num_classes=int(rng.integers(1, 4)), num_masks=int(rng.integers(0, 6)),
                              p_ignore=[0.0, 0.3, 1.0][seed % 4 % 3], p_nomask=[0.0, 0.2, 1.0][seed % 5 % 3])
    got = sam_max_vote(labels, ids, num_classes=3)
    want = sam_max_vote_loop(labels, ids, num_classes=3)
    assert got.dtype == labels.dtype and got.shape == labels.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_hand_computed_case():
    labels = torch.tensor([[0, 0, 1, 255],
                           [1, 1, 2, 2],
                           [255, 255, 2, 0]], dtype=torch.uint8)
    ids = torch.tensor([[0, 0, 0, 1],
                        [0, 1, 2, 2],
                        [3, 3, -1, -1]], dtype=torch.int32)
    # mask 0: votes 0,0,1,1 -> tie -> class 0; mask 1: votes 1 (255 ignored) -> 1;
    # mask 2: votes 2,2 -> 2; mask 3: only ignore votes -> unchanged; -1: unchanged
    want = torch.tensor([[0, 0, 0, 1],
                         [0, 1, 2, 2],
                         [255, 255, 2, 0]], dtype=torch.uint8)
    torch.testing.assert_close(sam_max_vote(labels, ids, num_classes=3), want, rtol=0, atol=0)


def test_same_id_in_two_images_is_two_masks():
    labels = torch.tensor([[[1, 1, 0]], [[0, 0, 1]]], dtype=torch.uint8)
    ids = torch.zeros(2, 1, 3, dtype=torch.int32)
    want = torch.tensor([[[1, 1, 1]], [[0, 0, 0]]], dtype=torch.uint8)
    torch.testing.assert_close(sam_max_vote(labels, ids, num_classes=2), want, rtol=0, atol=0)


def test_stage_refines_the_stored_labels(tmp_path):
    store = make_store(tmp_path / "s.zarr", n_images=(2, 1))
    store.set_dims(L=3)
    rng = np.random.default_rng(0)
    labels, ids = random_case(rng, (3, H, W), num_classes=3, num_masks=40, p_ignore=0.1, p_nomask=0.2)
    store.create_array("clip/label")
    store.create_array("sam/mask_id")
    store.write_rows("clip/label", 0, labels.numpy())
    store.write_rows("sam/mask_id", 0, ids.numpy())
    stage = build_stage("refine", batch_size=2)
    stage.prepare(store, None)
    ctx = ShardContext(store, Shard(0, 0, 2), adapter=None, model=stage.build_model("cpu"))
    stats = stage.process_shard(ctx)
    assert not ctx.failures, ctx.failures
    out = store.array("clip/label_refined")[:]
    np.testing.assert_array_equal(out, sam_max_vote_loop(labels, ids, 3).numpy())
    assert stats["images"] == 3 and stats["changed_pixels"] == int((out != labels.numpy()).sum()) > 0


def test_stage_records_a_failing_frame(tmp_path):
    store = make_store(tmp_path / "s.zarr", n_images=(2, 1))
    store.set_dims(L=3)
    store.create_array("clip/label")
    store.create_array("sam/mask_id")
    bad = np.zeros((3, H, W), np.uint8)
    bad[2, 0, 0] = 7  # not a class of this store (nor 255)
    store.write_rows("clip/label", 0, bad)
    store.write_rows("sam/mask_id", 0, np.zeros((3, H, W), np.int32))
    stage = build_stage("refine")
    stage.prepare(store, None)
    ctx = ShardContext(store, Shard(0, 0, 2), adapter=None, model=None)
    stage.process_shard(ctx)
    # the frames were voted in one batch: both are reported, with the error
    assert [f["frame"] for f in ctx.failures] == [0, 1]
    assert "out of range" in ctx.failures[1]["error"]


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_equals_loop_on_sam_like_batches(seed):
    """Nested masks (smaller ones painted last, as the ``sam`` stage resolves overlaps), 16 classes, uint8 and
    int64 labels, one image and a batch whose images hold different numbers of masks."""
    from bench.bench_refine import sam_like_case
    cases = [sam_like_case(48, 80, num_masks=5 + 20 * i, num_classes=16, seed=seed * 10 + i) for i in range(3)]
    labels, ids = torch.stack([c[0] for c in cases]), torch.stack([c[1] for c in cases])
    for lab, mid in ((labels[0], ids[0]), (labels, ids), (labels.long(), ids.long())):
        got = sam_max_vote(lab, mid, num_classes=16)
        assert got.dtype == lab.dtype
        torch.testing.assert_close(got, sam_max_vote_loop(lab, mid, num_classes=16), rtol=0, atol=0)


@pytest.mark.parametrize("ignore_index", [0, 2, 7])
def test_other_ignore_indices_equal_the_loop(ignore_index):
    rng = np.random.default_rng(ignore_index)
    labels = torch.from_numpy(rng.integers(0, 3, size=(2, 9, 11)).astype(np.int64))
    labels[torch.from_numpy(rng.random((2, 9, 11)) < 0.3)] = ignore_index
    ids = torch.from_numpy(rng.integers(-1, 6, size=(2, 9, 11)).astype(np.int32))
    torch.testing.assert_close(sam_max_vote(labels, ids, 3, ignore_index),
                               sam_max_vote_loop(labels, ids, 3, ignore_index), rtol=0, atol=0)


@pytest.mark.parametrize("bad,dtype", [(16, torch.uint8), (254, torch.uint8), (-1, torch.int64), (300, torch.int64)])
def test_label_out_of_range_is_an_error(bad, dtype):
    labels = torch.zeros(4, 5, dtype=dtype)
    labels[2, 3] = bad
    ids = torch.zeros(4, 5, dtype=torch.int32)
    with pytest.raises(ValueError, match=f"label {bad} out of range for 16 classes"):
        sam_max_vote(labels, ids, num_classes=16)
