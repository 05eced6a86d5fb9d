"""Dense CLIP teachers (maskclip.dense) against independent plain-torch formulas, and the label import.

The formula tests build open_clip's ``ViT-B-16`` with random weights (the stage's ``random_init``) at 224x416 and
recompute every step from the model's weight tensors with plain torch functions (patch embedding, the 11
unchanged blocks, the variant's last block as the issue writes it, ln_post, proj, scoring, upsampling): not
through :mod:`pipeline.models.dense` or :class:`pipeline.models.maskclip.MaskCLIP`.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data_cache import schema
from data_cache.store import Store
from data_cache.validate import validate_store
from pipeline.datasets.base import DatasetError
from pipeline.models.dense import TeacherError
from pipeline.stages.base import Shard, ShardContext, build_stage
from tests.toy_store import TOY_CLASSES, build_toy_store

H, W = 224, 416
VARIANTS = ("maskclip", "sclip", "clearclip", "naclip")


@pytest.fixture(autouse=True)
def _no_local_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("CNS_CHECKPOINTS", str(tmp_path / "no-checkpoints"))


# -- the independent reference ------------------------------------------------------------------------------
def _ln(x, sd, prefix):
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps=1e-5)


def _qkv(x, sd, p, heads):
    """q, k, v [B, heads, N, d] of block ``p`` on ln_1(x), and the scale d^-0.5."""
    h = _ln(x, sd, f"{p}.ln_1")
    q, k, v = (h @ sd[f"{p}.attn.in_proj_weight"].T + sd[f"{p}.attn.in_proj_bias"]).chunk(3, -1)
    b, n, c = x.shape
    split = [t.reshape(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v)]
    return (*split, (c // heads) ** -0.5)


def _out(weights, v, sd, p):
    o = (weights @ v).transpose(1, 2).flatten(2)
    return o @ sd[f"{p}.attn.out_proj.weight"].T + sd[f"{p}.attn.out_proj.bias"]


def _mlp(x, sd, p):
    h = _ln(x, sd, f"{p}.ln_2")
    h = F.gelu(h @ sd[f"{p}.mlp.c_fc.weight"].T + sd[f"{p}.mlp.c_fc.bias"])  # random_init: nn.GELU
    return h @ sd[f"{p}.mlp.c_proj.weight"].T + sd[f"{p}.mlp.c_proj.bias"]


def _omega(gh, gw, sigma):
    """NACLIP's window, written out pair by pair (not vectorised like the project's)."""
    n = gh * gw
    om = torch.zeros(n + 1, n + 1)
    for i in range(n):
        for j in range(n):
            d2 = (i // gw - j // gw) ** 2 + (i % gw - j % gw) ** 2
            om[1 + i, 1 + j] = math.exp(-d2 / (2 * sigma ** 2))
    return om


def reference_trunk(sd: dict, pixels: torch.Tensor, heads: int = 12) -> torch.Tensor:
    """Tokens [B, 1 + h*w, C] entering the last block: patch embedding and the unchanged blocks, from ``sd``."""
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=16)
    b, c = x.shape[:2]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(b, 1, c), x], 1) + sd["visual.positional_embedding"]
    x = _ln(x, sd, "visual.ln_pre")
    for i in range(_layers(sd) - 1):
        p = f"visual.transformer.resblocks.{i}"
        q, k, v, s = _qkv(x, sd, p, heads)
        x = x + _out((s * q @ k.transpose(-2, -1)).softmax(-1), v, sd, p)
        x = x + _mlp(x, sd, p)
    return x


def _layers(sd: dict) -> int:
    return len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})


def reference_last_block(sd: dict, x: torch.Tensor, variant: str, grid_hw, heads: int = 12, sigma: float = 5.0):
    """Dense features [B, E, h, w] (L2-normalised): the issue's last block of ``variant``, ln_post, proj."""
    p = f"visual.transformer.resblocks.{_layers(sd) - 1}"
    q, k, v, s = _qkv(x, sd, p, heads)
    if variant == "maskclip":
        x = x + _out(torch.eye(x.shape[1]), v, sd, p)
        x = x + _mlp(x, sd, p)
    elif variant == "sclip":
        x = x + _out((s * q @ q.transpose(-2, -1)).softmax(-1) + (s * k @ k.transpose(-2, -1)).softmax(-1), v, sd, p)
        x = x + _mlp(x, sd, p)
    elif variant == "clearclip":
        x = _out((s * q @ q.transpose(-2, -1)).softmax(-1), v, sd, p)
    elif variant == "naclip":
        x = _out((s * k @ k.transpose(-2, -1) + _omega(*grid_hw, sigma)).softmax(-1), v, sd, p)
    y = _ln(x[:, 1:], sd, "visual.ln_post") @ sd["visual.proj"]
    return F.normalize(y, dim=-1).transpose(1, 2).reshape(x.shape[0], -1, *grid_hw)


def reference_labels(feat, text, logit_scale=100.0):
    """Labels [B, H, W] and the top-2 logit margin (where a float rounding could flip the argmax)."""
    logits = logit_scale * torch.einsum("behw,le->blhw", feat, text)
    logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
    top2 = logits.topk(2, dim=1).values
    return logits.argmax(1).numpy(), (top2[:, 0] - top2[:, 1]).numpy()


@pytest.fixture(scope="module")
def vit_b16():
    """The stage's random-weight ViT-B/16 predictor at 224x416, its state dict, an image, text embeddings and
    the reference tokens entering the last block (computed once: the variants share them)."""
    stage = build_stage("maskclip", random_init=True)
    pred = stage._build((H, W), "cpu")
    sd = {k: v.detach().float() for k, v in pred.model.clip.state_dict().items()}
    blocks = np.random.default_rng(0).integers(0, 256, size=(1, H // 32, W // 32, 3), dtype=np.uint8)
    images = blocks.repeat(32, axis=1).repeat(32, axis=2)
    text = F.normalize(torch.randn(5, pred.model.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    with torch.no_grad():
        pixels = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - pred.model.mean) / pred.model.std
        trunk = reference_trunk(sd, pixels)
        torch.testing.assert_close(pred.model.preprocess(torch.from_numpy(images)), pixels)
        tokens = pred.model.tokens(pixels)
    torch.testing.assert_close(tokens, trunk, atol=2e-4, rtol=1e-3)
    # the 11 unchanged blocks (checked just above) are the same for every variant: computed once, to keep the
    # test fast; each variant still runs the model's forward from there (last block, ln_post, proj, scoring)
    pred.model.tokens = lambda px: tokens
    return pred, sd, images, text, trunk


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_matches_its_formula_on_a_random_vit_b16(vit_b16, variant):
    from pipeline.models.dense import get_teacher
    pred, sd, images, text, trunk = vit_b16
    pred.model.last_block = get_teacher(variant, **({"naclip_sigma": 5.0} if variant == "naclip" else {}))
    pred.set_text(text)
    labels, _, feat = pred.predict(images, return_features=True)
    grid = (H // 16, W // 16)
    with torch.no_grad():
        want = reference_last_block(sd, trunk, variant, grid)
        maskclip = reference_last_block(sd, trunk, "maskclip", grid)
    torch.testing.assert_close(torch.from_numpy(feat), want, atol=2e-4, rtol=1e-3)
    if variant != "maskclip":  # the variant really changes the features
        assert (want - maskclip).abs().max() > 0.01
    want_labels, margin = reference_labels(want, text)
    decided = margin > 1e-2  # where float rounding cannot flip the argmax
    assert decided.mean() > 0.99
    np.testing.assert_array_equal(labels[decided], want_labels[decided])
    assert (labels != want_labels).mean() < 1e-3


def test_teacher_enters_the_fingerprint_and_bad_choices_are_one_line():
    base = build_stage("maskclip", tiny=True).fingerprint()["config"]
    assert base["teacher"] == {"name": "maskclip", "options": {"pamr": False}, "label_free": True}
    na = build_stage("maskclip", tiny=True, dense="naclip", naclip_sigma=3, pamr=True).fingerprint()["config"]
    assert na["teacher"] == {"name": "naclip", "options": {"naclip_sigma": 3, "pamr": True}, "label_free": True}
    assert "dense" not in na and "naclip_sigma" not in na
    assert schema.teacher_line(na["teacher"]) == "teacher: naclip (sigma 3, PAMR; label-free)"
    with pytest.raises(TeacherError, match="maskclip.dense 'nope' is no dense teacher .*naclip"):
        build_stage("maskclip", tiny=True, dense="nope")
    with pytest.raises(TeacherError, match="naclip_sigma must be a positive number, got 0"):
        build_stage("maskclip", tiny=True, dense="naclip", naclip_sigma=0)
    with pytest.raises(TypeError, match="import_dir"):
        build_stage("maskclip", tiny=True, import_dir="/x")


def test_pamr_runs_and_keeps_distributions():
    from pipeline.models.pamr import pamr
    torch.manual_seed(0)
    image = torch.zeros(1, 3, 40, 60)
    image[..., 30:] = 1.0  # two regions
    scores = torch.rand(1, 4, 40, 60).softmax(1)
    out = pamr(image, scores)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 40, 60))
    # propagation stays within a region: the left half's mean is unchanged by the right half
    assert out[..., :30].std() < scores[..., :30].std()


def _pamr_by_loops(image, scores, iterations, dilations):
    """PAMR pixel by pixel: for each pixel, its 8 neighbours per dilation (clamped at the border); weights
    softmax_n(mean_c(-|I_p - I_n| / (0.1 std_p))), std_p over the pixel and all its neighbours (unbiased)."""
    _, c, h, w = image.shape
    unit = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    offs = [(dy * d, dx * d) for d in dilations for dy, dx in unit]

    def at(t, y, x):
        return t[0, :, min(max(y, 0), h - 1), min(max(x, 0), w - 1)]

    weights = torch.zeros(h, w, len(offs))
    for y in range(h):
        for x in range(w):
            near = torch.stack([at(image, y + oy, x + ox) for oy, ox in offs], 1)  # [C, P]
            ring = torch.stack([at(image, y + dy * d, x + dx * d) for d in dilations for dy, dx in unit + [(0, 0)]], 1)
            std = ring.std(1, keepdim=True)
            weights[y, x] = (-(image[0, :, y, x, None] - near).abs() / (1e-8 + 0.1 * std)).mean(0).softmax(0)
    for _ in range(iterations):
        new = torch.zeros_like(scores)
        for y in range(h):
            for x in range(w):
                near = torch.stack([at(scores, y + oy, x + ox) for oy, ox in offs], 1)  # [L, P]
                new[0, :, y, x] = (near * weights[y, x]).sum(1)
        scores = new
    return scores


def test_pamr_matches_a_pixel_by_pixel_computation():
    from pipeline.models.pamr import pamr
    g = torch.Generator().manual_seed(0)
    image, scores = torch.rand(1, 3, 6, 7, generator=g), torch.rand(1, 2, 6, 7, generator=g)
    torch.testing.assert_close(pamr(image, scores, iterations=2, dilations=(1, 2)),
                               _pamr_by_loops(image, scores, 2, (1, 2)), atol=1e-5, rtol=1e-4)


def test_stage_with_pamr_writes_labels(tmp_path):
    store = Store(build_toy_store(tmp_path / "s.zarr", num_frames=2, num_images=1, image_size=(32, 48),
                                  text_dim=32, stages=("correspond",)), mode="a")
    stage = build_stage("maskclip", tiny=True, dense="naclip", pamr=True, pca_sample_images=2)
    stage.prepare(store, None)
    ctx = ShardContext(store, Shard(0, 0, 2), adapter=None, model=stage.build_model("cpu"))
    stage.process_shard(ctx)
    assert not ctx.failures, ctx.failures
    assert store.array("clip/label")[:].max() < len(TOY_CLASSES)


# -- import --------------------------------------------------------------------------------------------------
def _toy(tmp_path, **kw):
    return Store(build_toy_store(tmp_path / "toy.zarr", num_frames=3, num_images=2, image_size=(32, 48),
                                 text_dim=32, stages=("correspond",), **kw), mode="a")


def _export_gt(store, folder, scale=1, teacher=None, features=False):
    tokens = [str(t) for t in store.array("frames/token")[:]]
    names = [str(n) for n in store.array("images/name")[:]]
    frame = store.array("images/frame")[:]
    gt = store.array("images/gt")[:]
    for row, name in enumerate(names):
        d = folder / tokens[frame[row]]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gt[row].repeat(scale, 0).repeat(scale, 1), mode="L").save(d / f"{name}.png")
        if features:
            np.save(d / f"{name}.feat.npy", np.random.default_rng(row).normal(size=(32, 4, 6)).astype(np.float32))
    if teacher is not None:
        (folder / "teacher.json").write_text(json.dumps(teacher))
    return gt


def _run_import(store, folder, **kw):
    stage = build_stage("maskclip", dense="import", import_dir=str(folder), tiny=True, pca_sample_images=2, **kw)
    stage.prepare(store, None)
    n = store.attrs.num_frames
    ctx = ShardContext(store, Shard(0, 0, n), adapter=None, model=stage.build_model("cpu"))
    stage.process_shard(ctx)
    return stage, ctx


@pytest.mark.parametrize("scale", [1, 2])
def test_import_of_the_stores_own_gt_gives_it_back(tmp_path, scale):
    store = _toy(tmp_path)
    gt = _export_gt(store, tmp_path / "imp", scale=scale,
                    teacher={"model": "ground truth", "trained_with_human_labels": True})
    assert not np.array_equal(store.array("clip/label")[:], gt)  # the toy store's labels are noisy
    stage, ctx = _run_import(store, tmp_path / "imp")
    assert not ctx.failures, ctx.failures
    np.testing.assert_array_equal(store.array("clip/label")[:], gt)
    np.testing.assert_array_equal(store.array("clip/confidence")[:], np.where(gt == 255, 0, 255))
    teacher = stage.fingerprint()["config"]["teacher"]
    assert teacher["name"] == "import" and teacher["label_free"] is False
    assert teacher["options"]["model"] == "ground truth" and teacher["options"]["features"] is False
    assert store.array("clip/text_embed").shape == (len(TOY_CLASSES), 32)


def test_import_fingerprint_follows_the_folders_content(tmp_path):
    store = _toy(tmp_path)
    _export_gt(store, tmp_path / "imp")
    first = build_stage("maskclip", dense="import", import_dir=str(tmp_path / "imp"), tiny=True).fingerprint()
    png = next((tmp_path / "imp").rglob("*.png"))
    Image.fromarray(np.zeros((32, 48), np.uint8), mode="L").save(png)
    second = build_stage("maskclip", dense="import", import_dir=str(tmp_path / "imp"), tiny=True).fingerprint()
    assert first["config"]["teacher"]["options"]["sha256"] != second["config"]["teacher"]["options"]["sha256"]
    assert "import_dir" not in first["config"]


def test_import_with_features_projects_them(tmp_path):
    store = _toy(tmp_path)
    _export_gt(store, tmp_path / "imp", features=True, teacher={"model": "x", "trained_with_human_labels": False})
    stage, ctx = _run_import(store, tmp_path / "imp", feat_dim=8)
    assert not ctx.failures, ctx.failures
    assert stage.fingerprint()["config"]["teacher"]["label_free"] is True
    feat = store.array("clip/feat")[:]
    assert feat.shape == (6, 8, 2, 3) and np.abs(feat).sum() > 0


@pytest.mark.parametrize("damage, message", [
    ("missing", "no imported label for image 'CAM_1'"),
    ("ratio", "aspect ratio"),
    ("class", "class id 9 is outside the store's 4 classes"),
])
def test_import_problems_name_the_file(tmp_path, damage, message):
    store = _toy(tmp_path)
    _export_gt(store, tmp_path / "imp")
    png = sorted((tmp_path / "imp").rglob("CAM_1.png"))[0]
    if damage == "missing":
        png.unlink()
    elif damage == "ratio":
        Image.fromarray(np.zeros((48, 32), np.uint8), mode="L").save(png)
    else:
        Image.fromarray(np.full((32, 48), 9, np.uint8), mode="L").save(png)
    if damage == "class":  # read in the shard: the frame fails, naming the file
        _, ctx = _run_import(store, tmp_path / "imp")
        assert len(ctx.failures) == 1 and message in ctx.failures[0]["error"] and str(png) in ctx.failures[0]["error"]
        return
    with pytest.raises(DatasetError, match=message) as e:
        _run_import(store, tmp_path / "imp")
    assert str(png) in str(e.value) and "\n" not in str(e.value)


def test_import_without_features_validates_and_is_left_out_of_the_latent_term(tmp_path, capsys):
    from train.config import load_config
    from train.engine import check_stores
    store = Store(build_toy_store(tmp_path / "toy.zarr", num_frames=2, num_images=1, image_size=(32, 48), text_dim=32),
                  mode="a")
    _export_gt(store, tmp_path / "imp")
    stage = build_stage("maskclip", dense="import", import_dir=str(tmp_path / "imp"), tiny=True)
    stage.bind(store.attrs)
    stages = dict(store.raw_attrs.get("stages", {}), maskclip=json.loads(json.dumps(stage.fingerprint())))
    store.update_attrs(stages=stages)
    for name in ("clip/feat", "clip/proj", "clip/proj_mean"):  # as the import stage leaves a fresh store
        del store.group[name]
    report = validate_store(store.path, check_checkpoints=False)
    assert report.ok, report.errors
    cfg = load_config(None, ["loss.latent_target=sam+clip"])
    check_stores([str(store.path)], cfg)
    assert cfg["loss"]["latent_target"] == "sam"
    assert "no clip/feat" in capsys.readouterr().err
    cfg = load_config(None, ["loss.latent_target=sam+clip"])
    store.update_attrs(stages=dict(stages, maskclip={**stages["maskclip"], "config": {}}))  # a MaskCLIP store
    with pytest.raises(Exception, match="missing array"):
        check_stores([str(store.path)], cfg)


def test_teacher_is_printed_by_inspect_and_eval(tmp_path):
    from inspection.frames import StoreView
    from inspection.summary import format_summary, summarize
    from train.evaluate import format_tables
    store = Store(build_toy_store(tmp_path / "toy.zarr", num_frames=2, num_images=1, image_size=(32, 48),
                                  text_dim=32), mode="a")
    stage = build_stage("maskclip", tiny=True, dense="naclip", pamr=True)
    stage.bind(store.attrs)
    record = json.loads(json.dumps(stage.fingerprint()))
    store.update_attrs(stages=dict(store.raw_attrs.get("stages", {}), maskclip=record))
    text = format_summary(summarize(StoreView(store.path)))
    assert "teacher   naclip (sigma 5, PAMR; label-free)" in text
    assert "IoU %; teacher: naclip (sigma 5, PAMR; label-free)" in text  # beside the pseudo-label mIoU table
    names = list(TOY_CLASSES)
    row = {"miou": 12.5, "iou": {n: 12.5 for n in names}}
    tables = format_tables({"rows": {"clip_2d": row, "cns_2d": row}, "class_names": names,
                            "teachers": [schema.teacher_line(stage.teacher_record())]})
    assert tables.splitlines()[0] == "teacher: naclip (sigma 5, PAMR; label-free)"
    assert "CLIP labels (naclip), 2D" in tables
