"""SAM: one encoder pass per image, the mask-id map, the feature grid, the projection and the ``sam`` stage.

The model is a tiny random-weight SAM built from ``configs/sam/tiny.json`` by the same code as vit_h.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator

from data_cache.store import CacheError
from pipeline.models import sam as ms
from pipeline.models.pca import unproject
from pipeline.stages.base import Shard, ShardContext, build_stage

from .test_maskclip import H, W, images, make_store


@pytest.fixture(autouse=True)
def _no_local_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("CNS_CHECKPOINTS", str(tmp_path / "no-checkpoints"))


@pytest.fixture(scope="module")
def tiny():
    sam, info = ms.build_sam(tiny=True)
    return sam, info


# -- mask ids ---------------------------------------------------------------------------------------------
def test_mask_id_map_hand_case():
    m = np.zeros((4, 4, 6), bool)
    m[0, :, :] = True          # area 24: the background mask
    m[1, 1:3, 1:4] = True      # area 6
    m[2, 2:4, 3:5] = True      # area 4, overlaps mask 1 at (2, 3)
    m[3, 1:3, 1:4] = True      # area 6 again, identical to mask 1: hidden (equal areas: the earlier wins)
    ids = ms.masks_to_id_map(m)
    want = np.array([[2, 2, 2, 2, 2, 2],
                     [2, 1, 1, 1, 2, 2],
                     [2, 1, 1, 0, 0, 2],
                     [2, 2, 2, 0, 0, 2]])
    np.testing.assert_array_equal(ids, want)
    assert ids.dtype == np.int32


def test_mask_id_map_no_mask_and_many_masks():
    assert (ms.masks_to_id_map(np.zeros((0, 3, 5), bool)) == -1).all()
    one = np.zeros((1, 3, 5), bool)
    one[0, 1, 1:3] = True
    ids = ms.masks_to_id_map(one)
    assert ids[1, 1] == 0 and (ids == -1).sum() == 13
    # 300 disjoint single-pixel masks: ids past 255 do not wrap
    m = np.zeros((300, 10, 30), bool)
    m[np.arange(300), np.arange(300) // 30, np.arange(300) % 30] = True
    ids = ms.masks_to_id_map(m)
    assert ids.max() == 299 and len(np.unique(ids)) == 300


def test_feature_grid_crops_the_padding():
    # long side resized to 1024, the other rounded: 900x1600 -> 576x1024, 224x416 -> 551x1024, 240x320 -> 768x1024
    assert ms.feature_grid((900, 1600)) == (36, 64)
    assert ms.feature_grid((224, 416)) == (35, 64)
    assert ms.feature_grid((240, 320)) == (48, 64)
    assert ms.feature_grid((416, 224)) == (64, 35)
    assert ms.feature_grid((H, W), long_side=256) == (11, 16)  # tiny: 64x96 -> 171x256


# -- one encoder pass -------------------------------------------------------------------------------------
def test_generator_encodes_each_image_once_and_matches_upstream(tiny):
    sam, info = tiny
    opts = info["generator_defaults"]
    gen = ms.SamMaskFeatureGenerator(sam, **opts)
    imgs = images(3, seed=1)
    calls = []
    hook = sam.image_encoder.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    try:
        outs = gen.generate_batch(imgs)
    finally:
        hook.remove()
    assert sum(calls) == 3 and gen.predictor.encoded_images == 3  # one pass, three images, never again
    upstream = SamAutomaticMaskGenerator(sam, **opts)
    gh, gw = ms.feature_grid((H, W), info["image_size"])
    n_masks = 0
    for im, out in zip(imgs, outs):
        anns = upstream.generate(im)
        want = np.stack([a["segmentation"] for a in anns]) if anns else np.zeros((0, H, W), bool)
        np.testing.assert_array_equal(out["masks"], want)
        n_masks += len(want)
        upstream.predictor.set_image(im)
        emb = upstream.predictor.get_image_embedding()[0].numpy()
        assert out["embedding"].shape == (info["embed_dim"], gh, gw)
        np.testing.assert_allclose(out["embedding"], emb[:, :gh, :gw], atol=1e-4)
    assert n_masks > 3  # the tiny model's relaxed thresholds keep several masks


def test_no_mask_survives_strict_thresholds(tiny):
    sam, info = tiny
    gen = ms.SamMaskFeatureGenerator(sam, **{**info["generator_defaults"], "pred_iou_thresh": 0.99})
    out = gen.generate_batch(images(1))[0]
    assert out["masks"].shape == (0, H, W) and out["areas"].shape == (0,)
    assert (ms.masks_to_id_map(out["masks"], out["areas"]) == -1).all()


# -- projection -------------------------------------------------------------------------------------------
def test_pca_finds_the_principal_axes():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    x = (rng.normal(size=(4000, 8)) * np.array([10, 5, 2, 1, .5, .3, .2, .1])) @ basis.T + 3.0
    proj, mean = ms.fit_pca(x, 3)
    assert proj.shape == (8, 3) and mean.shape == (8,)
    np.testing.assert_allclose(mean, 3.0, atol=0.5)
    np.testing.assert_allclose(proj.T @ proj, np.eye(3), atol=1e-5)
    for j in range(3):  # the j-th axis is the j-th generating direction, up to sign
        assert abs(proj[:, j] @ basis[:, j]) > 0.99
    proj2, _ = ms.fit_pca(x[::-1], 3)
    np.testing.assert_allclose(proj, proj2, atol=1e-5)  # deterministic signs
    emb = x[:6].T.reshape(8, 2, 3)
    np.testing.assert_allclose(ms.project(emb, proj, mean), ((x[:6] - mean) @ proj).T.reshape(3, 2, 3), rtol=1e-4)
    full, mean = ms.fit_pca(x, 8)  # D = S: un-projecting gives the input back
    np.testing.assert_allclose(unproject(ms.project(emb, full, mean), full, mean), emb, rtol=1e-4, atol=1e-4)


# -- stage ------------------------------------------------------------------------------------------------
def test_stage_writes_mask_ids_and_projected_features(tmp_path, tiny):
    sam, info = tiny
    store = make_store(tmp_path / "s.zarr", n_images=(2, 1))
    stage = build_stage("sam", tiny=True, feat_dim=8, batch_size=2, pca_sample_images=2, input="training")
    stage.prepare(store, None)
    d = store.dims()
    gh, gw = ms.feature_grid((H, W), info["image_size"])
    assert (d["h"], d["w"], d["S"], d["D"]) == (gh, gw, info["embed_dim"], 8)
    proj, mean = store.array("sam/proj")[:], store.array("sam/proj_mean")[:]
    np.testing.assert_allclose(proj.T @ proj, np.eye(8), atol=1e-4)
    assert store.array("sam/proj").attrs["fitted_on_rows"] == [0, 2]

    # resume: the projection is not refitted (no image goes through the model)
    fitted = store.array("sam/proj").attrs.asdict()
    stage.get_model = lambda *a: pytest.fail("refitted on resume")
    stage.prepare(store, None)
    del stage.get_model
    assert store.array("sam/proj").attrs.asdict() == fitted

    ctx = ShardContext(store, Shard(0, 0, 2), adapter=None, model=stage.build_model("cpu"))
    stats = stage.process_shard(ctx)
    assert not ctx.failures, ctx.failures
    assert stats["images"] == 3 and stats["masks"] > 0
    ids = store.array("sam/mask_id")[:]
    feat = store.array("sam/feat")[:]
    assert ids.dtype == np.int32 and ids.shape == (3, H, W) and ids.min() >= -1
    for im in ids:  # ids are 0..M-1 within each image
        present = np.unique(im[im >= 0])
        np.testing.assert_array_equal(present, np.arange(len(present)))
    assert feat.dtype == np.float16 and feat.shape == (3, 8, gh, gw)
    # features = the upstream embedding, cropped and projected; masks = upstream's (same encoder batches of 2)
    gen = ms.SamMaskFeatureGenerator(sam, **info["generator_defaults"])
    rgb = store.array("images/rgb")[:]
    out = gen.generate_batch(rgb[:2]) + gen.generate_batch(rgb[2:])
    want = np.stack([ms.project(o["embedding"], proj, mean) for o in out])
    np.testing.assert_allclose(feat.astype(np.float32), want, rtol=1e-2, atol=1e-2)
    np.testing.assert_array_equal(ids, np.stack([ms.masks_to_id_map(o["masks"]) for o in out]))


def test_stage_refuses_unwritten_images(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    store.write_rows("images/rgb", 0, np.zeros((3, H, W, 3), np.uint8))
    stage = build_stage("sam", tiny=True, feat_dim=8, input="training")
    with pytest.raises(CacheError, match="run the correspond stage first"):
        stage.prepare(store, None)


def test_stage_reuses_another_stores_projection(tmp_path):
    train = make_store(tmp_path / "train.zarr")
    build_stage("sam", tiny=True, feat_dim=4, pca_sample_images=3, input="training").prepare(train, None)
    val = make_store(tmp_path / "val.zarr", seed=5)
    build_stage("sam", tiny=True, feat_dim=4, proj_store=str(train.path), input="training").prepare(val, None)
    np.testing.assert_array_equal(val.array("sam/proj")[:], train.array("sam/proj")[:])
    np.testing.assert_array_equal(val.array("sam/proj_mean")[:], train.array("sam/proj_mean")[:])
    assert val.array("sam/proj").attrs["copied_from"] == str(train.path)
    with pytest.raises(ValueError, match="sam/proj of .* is \\(32, 4\\), this store needs \\(32, 8\\)"):
        build_stage("sam", tiny=True, feat_dim=8, proj_store=str(train.path)).prepare(make_store(tmp_path / "x.zarr"),
                                                                                    None)


def test_missing_checkpoint_says_how_to_get_it():
    with pytest.raises(ms.WeightsError, match="make weights.*--sam-checkpoint PATH"):
        build_stage("sam").fingerprint()
    with pytest.raises(ms.WeightsError, match="does not exist"):
        ms.build_sam("vit_b", checkpoint="/nonexistent/sam.pth")
    with pytest.raises(KeyError, match="unknown SAM model type"):
        ms.build_sam("vit_x")


def test_thresholds_resolve_and_enter_the_fingerprint():
    real = build_stage("sam", model_type="vit_b", random_init=True, pred_iou_thresh=0.8)
    opts = real.generator_options()
    assert opts["pred_iou_thresh"] == 0.8 and opts["stability_score_thresh"] == 0.95
    assert opts["points_per_side"] == 32
    tiny_opts = build_stage("sam", tiny=True).generator_options()
    assert tiny_opts["pred_iou_thresh"] == 0.0 and tiny_opts["points_per_side"] == 4
    fp = real.fingerprint()["config"]
    assert fp["pred_iou_thresh"] == 0.8 and "batch_size" not in fp
