"""MaskCLIP: the value path, text embeddings, the predictor, weight sources and the ``maskclip`` stage.

Every model here is a tiny random-weight open_clip ViT built by the same code paths as ViT-B/16.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_cache.schema import RootAttrs
from data_cache.store import Store
from pipeline.models import maskclip as mc
from pipeline.models import prompts
from pipeline.models.pca import project, unproject
from pipeline.stages.base import Shard, ShardContext, build_stage

H, W = 64, 96
CLASSES = ["car", "driveable_surface", "vegetation"]


@pytest.fixture(autouse=True)
def _no_local_checkpoints(tmp_path, monkeypatch):
    # the default-checkpoint lookup must not find files of the machine running the tests
    monkeypatch.setenv("CNS_CHECKPOINTS", str(tmp_path / "no-checkpoints"))


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer, info = mc.build_maskclip(image_size=(H, W), tiny=True)
    return model, tokenizer


def images(n: int, seed: int = 0) -> np.ndarray:
    """Blocky colour images: structure that a ViT can tell apart."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n, H // 16, W // 16, 3), dtype=np.uint8)
    img = blocks.repeat(16, axis=1).repeat(16, axis=2)
    return np.clip(img + rng.integers(-10, 10, size=img.shape), 0, 255).astype(np.uint8)


def make_store(path, n_images=(2, 1), class_names=CLASSES, seed=0, dataset="synthetic") -> Store:
    store = Store.create(path, RootAttrs(dataset=dataset, split="train", class_names=list(class_names),
                                         image_size=[H, W], point_features=["intensity"], capabilities=[],
                                         num_frames=len(n_images)))
    n = sum(n_images)
    store.set_dims(F=len(n_images), **{"F+1": len(n_images) + 1}, I=n, H=H, W=W, P=10, C=1)
    store.create_array("images/offsets")
    store.array("images/offsets")[:] = np.concatenate([[0], np.cumsum(n_images)])
    store.create_array("images/rgb")
    store.write_rows("images/rgb", 0, images(n, seed))
    return store


# -- the value path ---------------------------------------------------------------------------------------
def identity_attention_mask(n: int) -> torch.Tensor:
    m = torch.full((n, n), float("-inf"))
    m.fill_diagonal_(0.0)
    return m


@pytest.mark.parametrize("ls_init_value", [None, 0.3])
def test_value_path_is_the_block_with_identity_attention(ls_init_value):
    from open_clip.transformer import VisionTransformer
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=(32, 48), patch_size=16, width=64, layers=2, heads=4, mlp_ratio=4.0,
                            ls_init_value=ls_init_value, output_dim=16).eval()
    block = vit.transformer.resblocks[-1]
    x = torch.randn(3, 1 + 2 * 3, 64)
    with torch.no_grad():
        forced = block(x, attn_mask=identity_attention_mask(x.shape[1]))
        ours = mc.value_path(block, x)
        normal = block(x)
    torch.testing.assert_close(ours, forced, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, normal, atol=1e-3), "the real attention should differ from the value path"


def test_dense_features_follow_the_value_path(tiny):
    model, _ = tiny
    imgs = torch.from_numpy(images(2))
    with torch.no_grad():
        feat = model(imgs)
        x = model.tokens(model.preprocess(imgs))
        last = model.visual.transformer.resblocks[-1]
        y = last(x, attn_mask=identity_attention_mask(x.shape[1]))[:, 1:]  # class token dropped
        y = F.normalize(model.visual.ln_post(y) @ model.visual.proj, dim=-1)
    gh, gw = model.grid_size
    assert (gh, gw) == (H // 16, W // 16)
    assert feat.shape == (2, model.embed_dim, gh, gw)
    torch.testing.assert_close(feat.flatten(2).transpose(1, 2), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feat.norm(dim=1), torch.ones(2, gh, gw))


def test_tokens_are_what_enters_open_clips_last_block(tiny):
    """The public forward_intermediates path (no private open_clip call): finishing the last block, ln_post,
    the class token and the projection by hand gives open_clip's own image embedding."""
    model, _ = tiny
    vis = model.visual
    pixels = model.preprocess(torch.from_numpy(images(2)))
    with torch.no_grad():
        x = model.tokens(pixels)
        ours = vis.ln_post(vis.transformer.resblocks[-1](x))[:, 0] @ vis.proj
        reference = vis(pixels)
    assert x.shape == (2, 1 + model.grid_size[0] * model.grid_size[1], vis.transformer.width)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_clip_normalisation_comes_from_the_model(tiny):
    model, _ = tiny
    torch.testing.assert_close(model.mean.flatten(), torch.tensor(mc.weights.OPENAI_CLIP_MEAN))
    torch.testing.assert_close(model.std.flatten(), torch.tensor(mc.weights.OPENAI_CLIP_STD))
    img = torch.full((1, H, W, 3), 255, dtype=torch.uint8)
    x = model.preprocess(img)
    torch.testing.assert_close(x[0, :, 0, 0], (1 - model.mean.flatten()) / model.std.flatten())


# -- text embeddings --------------------------------------------------------------------------------------
def test_templates():
    assert len(prompts.TEMPLATES) == 85 and len(set(prompts.TEMPLATES)) == 85
    assert prompts.TEMPLATES[-5:] == prompts.SCENE_TEMPLATES
    assert all(t.count("{}") == 1 for t in prompts.TEMPLATES)


def test_text_embeddings_average_normalised_prompts(tiny):
    model, tok = tiny
    t = mc.text_embeddings(model, tok, CLASSES)
    assert t.shape == (3, model.embed_dim) and t.dtype == torch.float32
    torch.testing.assert_close(t.norm(dim=1), torch.ones(3))
    with torch.no_grad():
        e = F.normalize(model.clip.encode_text(tok([p.format("driveable surface") for p in prompts.TEMPLATES])),
                        dim=-1)
    torch.testing.assert_close(t[1], F.normalize(e.mean(0), dim=0), rtol=1e-5, atol=1e-5)


def test_truncated_text_context_equals_open_clip(tiny):
    model, tok = tiny
    ids = tok(["a photo of a car.", "this is one construction vehicle in the scene.", "x"])
    with torch.no_grad():
        torch.testing.assert_close(model._encode_text(ids), model.clip.encode_text(ids), rtol=1e-5, atol=1e-5)


def test_descriptive_names(tiny):
    model, tok = tiny
    assert prompts.class_texts(["driveable_surface", "unknown_thing"], descriptive=True) == [("road",),
                                                                                              ("unknown thing",)]
    desc = mc.text_embeddings(model, tok, ["driveable_surface"], descriptive=True)
    road = mc.text_embeddings(model, tok, ["road"])
    plain = mc.text_embeddings(model, tok, ["driveable_surface"])
    torch.testing.assert_close(desc, road)
    assert not torch.allclose(desc, plain)


def test_prompt_names_follow_clip2scene():
    from pipeline.datasets.classes import PROMPT_NAMES, SCANNET20, nuscenes16
    assert list(PROMPT_NAMES["nuscenes"]) == list(nuscenes16())  # every class, in the dataset's order
    assert list(PROMPT_NAMES["scannet"]) == list(SCANNET20)
    scan = prompts.class_texts(SCANNET20, dataset="scannet")
    assert scan[-1] == ("other furniture",) and scan[15] == ("shower curtain",) and scan[0] == ("wall",)
    nus = prompts.class_texts(nuscenes16(), dataset="nuscenes")
    assert nus[4] == ("construction vehicle",) and nus[10] == ("driveable surface",)
    assert nus[7] == ("traffic_cone",) and nus[11] == ("other_flat",)  # CLIP2Scene's own spelling, verbatim
    # synthetic stores (benchmark class names) and open-vocabulary names: every table, else the plain name
    assert prompts.class_texts(["otherfurniture", "desk_lamp"], dataset="synthetic") == [("other furniture",),
                                                                                         ("desk lamp",)]
    assert prompts.class_texts(["otherfurniture"]) == [("other furniture",)]
    assert prompts.class_texts(["otherfurniture"], descriptive=True, dataset="scannet") == [("furniture",)]


def test_stage_prompts_use_clip2scene_names_and_record_them(tmp_path, tiny, monkeypatch):
    from data_cache.store import CacheError
    from pipeline.datasets.classes import PROMPT_NAMES, SCANNET20
    from pipeline.runner import check_fingerprint
    model, tok = tiny
    store = make_store(tmp_path / "s.zarr", class_names=SCANNET20, dataset="scannet")
    stage = build_stage("maskclip", tiny=True, feat_dim=4, pca_sample_images=1)
    stage.bind(store.attrs)
    check_fingerprint(store, stage, overwrite=False)  # what the runner records
    stage.prepare(store, None)
    assert store.attrs.class_names == list(SCANNET20)  # the store keeps the dataset's own names
    recorded = store.raw_attrs["stages"]["maskclip"]["config"]["prompt_names"]
    assert recorded[-1] == ["other furniture"] and recorded[0] == ["wall"] and len(recorded) == 20
    assert store.array("clip/text_embed").attrs["prompt_names"] == recorded
    text = store.array("clip/text_embed")[:]
    np.testing.assert_allclose(text[-1], mc.embed_class_words(model, tok, [("other furniture",)])[0], atol=1e-5)
    assert not np.allclose(text[-1], mc.embed_class_words(model, tok, [("otherfurniture",)])[0], atol=1e-3)
    # other prompt names are another fingerprint: a rerun of a stage with a done shard is refused, naming the field
    store.mark_done("maskclip", 0, {})
    monkeypatch.setitem(PROMPT_NAMES["scannet"], "otherfurniture", "furniture")
    with pytest.raises(CacheError, match=r"prompt_names.*other furniture.*furniture"):
        check_fingerprint(store, stage, overwrite=False)


def test_build_text_embeddings_public_entry_point(tiny):
    model, tok = tiny
    t = mc.build_text_embeddings(CLASSES, tiny=True)
    torch.testing.assert_close(t, mc.text_embeddings(model, tok, CLASSES), rtol=1e-5, atol=1e-6)


# -- predictor --------------------------------------------------------------------------------------------
def test_predictor_labels_patches_with_their_own_embedding(tiny):
    model, _ = tiny
    imgs = images(1, seed=3)
    with torch.no_grad():
        feat = model(torch.from_numpy(imgs))[0]  # [E, gh, gw]
    flat = feat.flatten(1).T
    cos = flat @ flat.T
    a, b = divmod(int(cos.argmin()), cos.shape[1])  # the two least similar patches
    pred = mc.MaskCLIPPredictor(model, torch.stack([flat[a], flat[b]]))
    labels, conf = pred.predict(imgs)
    gw = model.grid_size[1]
    for cls, patch in enumerate((a, b)):
        r, c = divmod(patch, gw)
        assert labels[0, r * 16 + 8, c * 16 + 8] == cls
    assert labels.dtype == np.uint8 and conf.dtype == np.uint8 and labels.shape == (1, H, W)
    assert conf.min() >= 128  # two classes: the winner has probability >= 0.5


@pytest.mark.parametrize("opts", [{"prompt_denoising": 0.5}, {"key_smoothing": 1.0},
                                  {"prompt_denoising": 0.5, "key_smoothing": 1.0}])
def test_maskclip_refinements_run(tiny, opts):
    model, tok = tiny
    pred = mc.MaskCLIPPredictor(model, mc.text_embeddings(model, tok, CLASSES), **opts)
    labels, conf = pred.predict(images(2))
    assert labels.shape == (2, H, W) and labels.max() < len(CLASSES)
    assert conf.max() <= 255


# -- weights ----------------------------------------------------------------------------------------------
def test_no_weights_is_a_clear_error():
    with pytest.raises(mc.WeightsError, match="make weights.*--clip-checkpoint PATH.*--clip-pretrained openai"):
        mc.create_clip("ViT-B-16")
    with pytest.raises(mc.WeightsError, match="does not exist"):
        mc.create_clip("ViT-B-16", checkpoint="/nonexistent/ViT-B-16.pt")


def test_checkpoint_of_a_square_model_loads_at_the_training_resolution(tmp_path):
    import open_clip
    mc._register_configs()
    torch.manual_seed(1)
    square = open_clip.create_model(mc.TINY_MODEL)  # 224x224: 14x14 position grid
    path = tmp_path / "tiny.pt"
    torch.save(square.state_dict(), path)
    clip, info = mc.create_clip(mc.TINY_MODEL, checkpoint=str(path), image_size=(H, W))
    assert info["source"] == "checkpoint" and info["quick_gelu"] is False
    assert clip.visual.positional_embedding.shape[0] == 1 + (H // 16) * (W // 16)
    torch.testing.assert_close(clip.visual.positional_embedding[0], square.visual.positional_embedding[0])
    torch.testing.assert_close(clip.token_embedding.weight, square.token_embedding.weight)
    torch.testing.assert_close(clip.visual.conv1.weight, square.visual.conv1.weight)


# -- stage ------------------------------------------------------------------------------------------------
def test_stage_writes_labels_and_text_embeddings(tmp_path, tiny):
    store = make_store(tmp_path / "s.zarr")
    stage = build_stage("maskclip", tiny=True, batch_size=2)
    fp = stage.fingerprint()
    assert fp["checkpoint_sha256"] is None and "batch_size" not in fp["config"]
    assert fp["config"]["feat_dim"] == tiny[0].embed_dim == 32  # min(64, E) for the tiny model
    stage.prepare(store, None)
    fitted = store.array("clip/proj").attrs.asdict()
    assert fitted["fitted_on_rows"] == [0, 1, 2]
    stage.get_model = lambda *a: pytest.fail("resume recomputed the text embeddings or the projection")
    stage.prepare(store, None)  # resume: arrays, text embeddings and projection exist already
    del stage.get_model
    assert store.array("clip/proj").attrs.asdict() == fitted
    assert store.dims()["E"] == tiny[0].embed_dim and store.dims()["L"] == len(CLASSES)
    ctx = ShardContext(store, Shard(0, 0, 2), adapter=None, model=stage.build_model("cpu"))
    stats = stage.process_shard(ctx)
    assert not ctx.failures, ctx.failures
    assert stats["images"] == 3 and stats["model_s"] > 0
    text = store.array("clip/text_embed")[:]
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, rtol=1e-5)
    labels, conf = store.array("clip/label")[:], store.array("clip/confidence")[:]
    assert labels.shape == (3, H, W) and labels.max() < len(CLASSES)
    # the same images through the predictor directly give the same labels
    pred = mc.MaskCLIPPredictor(tiny[0], torch.from_numpy(text))
    want_l, want_c = pred.predict(store.array("images/rgb")[:])
    np.testing.assert_array_equal(labels, want_l)
    assert np.abs(conf.astype(int) - want_c.astype(int)).max() <= 1


def test_stage_without_weights_says_how_to_get_them():
    stage = build_stage("maskclip")
    with pytest.raises(mc.WeightsError, match="make weights"):
        stage.fingerprint()
    with pytest.raises(TypeError, match="unknown maskclip option"):
        build_stage("maskclip", checkpont="x")


def test_stage_fingerprint_includes_checkpoint_sha(tmp_path):
    import hashlib
    p = tmp_path / "ckpt.pt"
    p.write_bytes(b"not a real checkpoint")
    fp = build_stage("maskclip", checkpoint=str(p)).fingerprint()
    assert fp["checkpoint_sha256"] == hashlib.sha256(b"not a real checkpoint").hexdigest()
    assert "checkpoint" not in fp["config"]


def test_weights_registry_verifies_checksums(tmp_path):
    import hashlib
    from pipeline.models import weights
    assert weights.default_for("clip", "ViT-B-16").sha256 == weights.get("clip-vit-b-16-openai").url.split("/")[-2]
    assert {weights.default_for("sam", m).model for m in ("vit_h", "vit_l", "vit_b")} == {"vit_h", "vit_l", "vit_b"}
    f = tmp_path / "x.pt"
    f.write_bytes(b"abc")
    good = weights.Checkpoint("t", "clip", "ViT-B-16", "http://x", "x.pt", sha256=hashlib.sha256(b"abc").hexdigest())
    weights.verify(f, good)
    with pytest.raises(ValueError, match="differs"):
        weights.verify(f, weights.Checkpoint("t", "sam", "vit_b", "http://x", "x.pt", md5="0" * 32))
    (tmp_path / "no-checkpoints").mkdir()
    (tmp_path / "no-checkpoints" / "ViT-B-16.pt").write_bytes(b"")
    assert weights.resolve_weights("clip", "ViT-B-16")["path"].endswith("ViT-B-16.pt")  # `make weights` is enough


def run_maskclip(store, **config):
    stage = build_stage("maskclip", tiny=True, batch_size=2, **config)
    stage.prepare(store, None)
    ctx = ShardContext(store, Shard(0, 0, store.attrs.num_frames), adapter=None, model=stage.build_model("cpu"))
    stage.process_shard(ctx)
    assert not ctx.failures, ctx.failures
    return stage


def test_stage_writes_the_dense_features_eq1_scored(tmp_path, tiny):
    """clip/feat un-projected (lossless at Dc = E) are the model's dense features, and scoring them against
    clip/text_embed as Eq. 1 does gives back clip/label."""
    model, _ = tiny
    store = make_store(tmp_path / "s.zarr")
    run_maskclip(store)
    feat, proj, mean = store.array("clip/feat")[:], store.array("clip/proj")[:], store.array("clip/proj_mean")[:]
    gh, gw = model.grid_size
    assert (store.dims()["hc"], store.dims()["wc"]) == (gh, gw) == (H // 16, W // 16)
    assert feat.dtype == np.float16 and feat.shape == (3, 32, gh, gw)
    assert proj.shape == (32, 32) and mean.shape == (32,)
    np.testing.assert_allclose(proj.T @ proj, np.eye(32), atol=1e-4)
    back = unproject(feat, proj, mean)
    with torch.no_grad():
        want = model(torch.from_numpy(store.array("images/rgb")[:])).numpy()
    np.testing.assert_allclose(back, want, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(back, axis=1), 1.0, atol=5e-3)  # the L2-normalised features
    pred = mc.MaskCLIPPredictor(model, torch.from_numpy(store.array("clip/text_embed")[:]))
    labels, _ = pred.labels_from_scores(*pred.scores_from_features(torch.from_numpy(back)), (H, W))
    stored = store.array("clip/label")[:]
    assert (labels == stored).mean() > 0.995  # float16 storage may flip a near-tie pixel, nothing more
    assert len(np.unique(stored)) > 1


def test_stage_projects_features_to_fewer_channels(tmp_path, tiny):
    model, _ = tiny
    store = make_store(tmp_path / "s.zarr")
    stage = run_maskclip(store, feat_dim=8, pca_sample_images=2)
    assert stage.fingerprint()["config"]["feat_dim"] == 8
    feat, proj, mean = store.array("clip/feat")[:], store.array("clip/proj")[:], store.array("clip/proj_mean")[:]
    assert feat.shape == (3, 8, H // 16, W // 16) and proj.shape == (32, 8)
    assert store.array("clip/proj").attrs["fitted_on_rows"] == [0, 2]
    with torch.no_grad():
        dense = model(torch.from_numpy(store.array("images/rgb")[:])).numpy()
    np.testing.assert_allclose(feat.astype(np.float32), project(dense, proj, mean), atol=2e-3)
    with pytest.raises(ValueError, match="feat_dim 33 must be in 1..32"):
        build_stage("maskclip", tiny=True, feat_dim=33).fingerprint()


def test_stage_reuses_another_stores_clip_projection(tmp_path):
    train = make_store(tmp_path / "train.zarr")
    build_stage("maskclip", tiny=True, feat_dim=4).prepare(train, None)
    val = make_store(tmp_path / "val.zarr", seed=5)
    run_maskclip(val, feat_dim=4, proj_store=str(train.path))
    np.testing.assert_array_equal(val.array("clip/proj")[:], train.array("clip/proj")[:])
    np.testing.assert_array_equal(val.array("clip/proj_mean")[:], train.array("clip/proj_mean")[:])
    assert val.array("clip/proj").attrs["copied_from"] == str(train.path)
    assert "fitted_on_rows" not in val.array("clip/proj").attrs
    # a projection fitted on val's own images differs: the copy is not a refit
    own = make_store(tmp_path / "own.zarr", seed=5)
    build_stage("maskclip", tiny=True, feat_dim=4).prepare(own, None)
    assert not np.allclose(own.array("clip/proj")[:], train.array("clip/proj")[:], atol=1e-3)


def _bf16_unavailable(device: str = "cpu") -> str | None:
    """Why bfloat16 autocast cannot run on ``device`` here, or None when it can."""
    try:
        with torch.autocast(device, dtype=torch.bfloat16):
            y = torch.ones(8, 8, device=device) @ torch.ones(8, 8, device=device)
    except RuntimeError as e:
        return f"bfloat16 autocast is not available on {device}: {e}"
    return None if y.dtype == torch.bfloat16 else f"autocast on {device} did not compute in bfloat16"


def test_bf16_autocast_agrees_with_float32(tiny):
    reason = _bf16_unavailable("cpu")
    if reason:
        pytest.skip(reason)
    model, tok = tiny
    text = mc.text_embeddings(model, tok, CLASSES)
    imgs = images(8, seed=2)
    l32, c32, f32 = mc.MaskCLIPPredictor(model, text).predict(imgs, return_features=True)
    l16, c16, f16 = mc.MaskCLIPPredictor(model, text, bf16=True).predict(imgs, return_features=True)
    assert not np.array_equal(f16, f32), "bf16 autocast did not change the computation"
    np.testing.assert_allclose(np.linalg.norm(f16, axis=1), 1.0, atol=1e-5)  # renormalised in float32
    assert (f16 * f32).sum(axis=1).min() > 0.999  # cosine of every patch's feature
    assert (l16 == l32).mean() > 0.98  # measured 0.995 on these images: flips only at near-ties
    assert np.abs(c16.astype(int) - c32.astype(int)).mean() < 2
    assert build_stage("maskclip", tiny=True, bf16=True).fingerprint() != build_stage("maskclip", tiny=True).fingerprint()
