"""The on-device batched mask generator against segment-anything's own, and the sam stage on source images.

Equivalence is exact: on CPU in float32 the batched generator gives upstream ``SamAutomaticMaskGenerator``'s
masks (same order, same predicted IoUs) and so the same id map, at the same output size.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam

from pipeline.datasets.base import DatasetAdapter, DatasetError
from pipeline.models import sam as ms
from pipeline.stages.base import Shard, ShardContext, build_stage

from .test_maskclip import H, W, images, make_store


@pytest.fixture(autouse=True)
def _no_local_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("CNS_CHECKPOINTS", str(tmp_path / "no-checkpoints"))


@pytest.fixture(scope="module")
def tiny():
    return ms.build_sam(tiny=True)


def upstream_masks(sam, image, **opts) -> tuple[np.ndarray, np.ndarray]:
    anns = SamAutomaticMaskGenerator(sam, **opts).generate(image)
    masks = np.stack([a["segmentation"] for a in anns]) if anns else np.zeros((0, *image.shape[:2]), bool)
    return masks, np.array([a["predicted_iou"] for a in anns], np.float32)


def best_match_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over the masks of ``a`` of their best IoU with a mask of ``b``."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None] - inter
    return float((inter / union.clamp(min=1)).max(dim=1).values.mean())


# tiny random SAM: its masks are noisy and nearly all their boxes span the image, so a box NMS below 1.0 keeps
# a handful; the settings keep many masks (NMS 1.0 still sorts them by predicted IoU) or exercise one filter
# each: the predicted-IoU cut drops about half, the stability score with a small offset, the NMS of identical
# boxes, crop layers and the small-region clean-up. The last number is the fewest masks an image must keep.
TINY_SETTINGS = {
    "all masks": (dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0), 150),
    "iou and stability filters": (dict(pred_iou_thresh=0.01, stability_score_offset=0.02,
                                       stability_score_thresh=0.02, box_nms_thresh=1.0), 40),
    "box nms": (dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.999), 3),
}


@pytest.mark.parametrize("setting", list(TINY_SETTINGS))
def test_batched_generator_equals_upstream(tiny, setting):
    sam, _ = tiny
    opts, fewest = TINY_SETTINGS[setting]
    opts = dict(points_per_side=8, **opts)
    # three images, one of another size; 24 prompts per decoder call mix the images' prompts
    imgs = list(images(2, seed=1)) + [np.ascontiguousarray(images(1, seed=2)[0][:48, :80])]
    gen = ms.BatchedMaskGenerator(sam, encoder_batch=1, points_per_batch=24, **opts)
    outs = gen.generate(imgs)
    kept = []
    for im, out in zip(imgs, outs):
        want, want_iou = upstream_masks(sam, im, **opts)
        np.testing.assert_array_equal(out["masks"].numpy(), want)
        np.testing.assert_array_equal(out["predicted_iou"].numpy(), want_iou)
        np.testing.assert_array_equal(out["id_map"].numpy(), ms.masks_to_id_map(want))
        assert out["id_map"].dtype == torch.int32 and out["id_map"].shape == im.shape[:2]
        kept.append(len(want))
    assert min(kept) >= fewest, kept  # the comparison is not vacuous


class BlobDecoder:
    """A stand-in prompt encoder + mask decoder whose masks are discs around the prompt point (three radii,
    the smallest with an island beside it, the largest with a hole), so that masks of crops survive the
    crop-edge filter (the random model's masks span the image). Both generators use it; everything after
    the decoder is theirs.
    """

    def __init__(self, sam):
        self.size, self.low = int(sam.image_encoder.img_size), int(sam.prompt_encoder.mask_input_size[0])

    def prompts(self, points, boxes=None, masks=None):
        coords, _ = points
        return coords.float(), torch.zeros(len(coords), 1, 1, 1)

    def masks(self, sparse):
        xy = sparse[:, 0, :] + 0.5                                           # [N, 2] in the model's input frame
        c = (torch.arange(self.low, dtype=torch.float32) + 0.5) * (self.size / self.low)
        dx, dy = c[None, None, :] - xy[:, 0, None, None], c[None, :, None] - xy[:, 1, None, None]
        dist = (dx ** 2 + dy ** 2).sqrt()                                   # [N, low, low]
        u = self.size / 256
        logits = torch.tensor([6.0, 12.0, 24.0])[None, :, None, None] * u - dist[:, None]
        island = 5.0 * u - ((dx - 16 * u) ** 2 + dy ** 2).sqrt()
        logits[:, 0] = torch.maximum(logits[:, 0], island)                  # a disc and an island
        logits[:, 2] = torch.minimum(logits[:, 2], dist - 5.0 * u)          # a disc with a hole
        order = (xy[:, 1] * self.size + xy[:, 0]) / self.size ** 2           # distinct per prompt: no IoU ties
        iou = torch.tensor([0.9, 0.8, 0.7])[None] + 0.05 * order[:, None]
        return logits, iou

    def install(self, sam, gen=None):
        sam.prompt_encoder.forward = self.prompts
        sam.mask_decoder.forward = lambda sparse_prompt_embeddings, **_: self.masks(sparse_prompt_embeddings)
        if gen is not None:
            gen._decode = lambda src, sparse, dense: self.masks(sparse)


@pytest.mark.parametrize("min_area", [0, 30])
def test_batched_generator_equals_upstream_with_crop_layers(min_area):
    sam, _ = ms.build_sam(tiny=True)  # its own copy: the stand-in decoder is installed on it
    opts = dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.7,
                crop_n_layers=2, crop_n_points_downscale_factor=2, crop_nms_thresh=0.7,
                min_mask_region_area=min_area)
    imgs = [images(1, seed=5)[0], np.ascontiguousarray(images(1, seed=6)[0][:, :80])]
    gen = ms.BatchedMaskGenerator(sam, encoder_batch=3, points_per_batch=40, **opts)
    BlobDecoder(sam).install(sam, gen)
    outs = gen.generate(imgs)
    no_crops = ms.BatchedMaskGenerator(sam, **{**opts, "crop_n_layers": 0})
    no_crops._decode = gen._decode
    for im, out, plain in zip(imgs, outs, no_crops.generate(imgs)):
        want, want_iou = upstream_masks(sam, im, **opts)
        np.testing.assert_array_equal(out["masks"].numpy(), want)
        np.testing.assert_array_equal(out["predicted_iou"].numpy(), want_iou)
        np.testing.assert_array_equal(out["id_map"].numpy(), ms.masks_to_id_map(want))
        assert len(want) >= 10
        # masks of the crops are among them
        assert not {m.tobytes() for m in want} <= {m.tobytes() for m in plain["masks"].numpy()}
        parts = [ndimage.label(m, np.ones((3, 3)))[1] + ndimage.label(~m)[1] - 1 for m in want]  # islands + holes
        if min_area:  # the small regions are gone
            assert max(parts) == 1, parts
        else:
            assert max(parts) > 1


def test_crop_layers_at_another_output_size_follow_upstream():
    """Crops of a 128x192 image, masks made at 64x96: close to upstream's crop masks reduced to 64x96."""
    sam, _ = ms.build_sam(tiny=True)
    opts = dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.7,
                crop_n_layers=1, crop_nms_thresh=0.7, min_mask_region_area=30)
    big = np.asarray(Image.fromarray(images(1, seed=5)[0]).resize((192, 128), Image.BILINEAR))
    gen = ms.BatchedMaskGenerator(sam, **opts)
    BlobDecoder(sam).install(sam, gen)
    out = gen.generate([big], output_size=(64, 96))[0]
    want = ms.resize_masks(torch.as_tensor(upstream_masks(sam, big, **opts)[0]), (64, 96))
    assert out["masks"].shape[1:] == (64, 96) and len(want) >= 20
    assert abs(len(out["masks"]) - len(want)) <= 0.1 * len(want)
    assert best_match_iou(out["masks"], want) > 0.8 and best_match_iou(want, out["masks"]) > 0.8


@pytest.mark.slow
def test_batched_generator_equals_upstream_vit_b():
    """vit_b with random weights (the real architecture at 1024), a small image and 4x4 prompts."""
    sam, _ = ms.build_sam("vit_b", random_init=True)
    opts = dict(points_per_side=4, points_per_batch=16, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                box_nms_thresh=1.0)
    im = np.asarray(Image.fromarray(images(1, seed=4)[0]).resize((80, 48), Image.BILINEAR))
    out = ms.BatchedMaskGenerator(sam, encoder_batch=1, **opts).generate([im])[0]
    want, want_iou = upstream_masks(sam, im, **opts)
    assert len(want) >= 10
    np.testing.assert_array_equal(out["masks"].numpy(), want)
    np.testing.assert_array_equal(out["predicted_iou"].numpy(), want_iou)
    np.testing.assert_array_equal(out["id_map"].numpy(), ms.masks_to_id_map(want))


@pytest.mark.parametrize("image_size, input_size, out_hw", [
    (1024, (551, 1024), (224, 416)),   # nuScenes training image
    (1024, (576, 1024), (224, 416)),   # nuScenes source image, masks at the training resolution
    (1024, (768, 1024), (240, 320)),   # ScanNet
    (1024, (1024, 683), (300, 200)),   # portrait: every row is used
    (256, (171, 256), (64, 96)),       # the tiny model
])
def test_upscale_is_postprocess_masks_bit_for_bit(image_size, input_size, out_hw):
    low = torch.randn(5, 3, image_size // 4, image_size // 4, generator=torch.Generator().manual_seed(0)) * 4
    stub = SimpleNamespace(image_encoder=SimpleNamespace(img_size=image_size))
    want = Sam.postprocess_masks(stub, low, input_size, out_hw)
    assert torch.equal(ms.upscale_logits(low, image_size, input_size, out_hw), want)


def test_id_map_on_device_equals_numpy():
    rng = np.random.default_rng(0)
    masks = rng.random((40, 30, 50)) < rng.uniform(0.01, 0.6, size=(40, 1, 1))
    masks[5] = masks[3]  # equal areas: the earlier mask wins
    masks[7] = False     # an empty mask gets no id
    got = ms.BatchedMaskGenerator.id_map(torch.as_tensor(masks)).numpy()
    np.testing.assert_array_equal(got, ms.masks_to_id_map(masks))
    assert (ms.BatchedMaskGenerator.id_map(torch.zeros((0, 3, 4), dtype=torch.bool)) == -1).all()


def test_masks_at_another_output_size_follow_upstream(tiny):
    """Source image 128x192, masks made at 64x96: close to upstream's masks at 128x192 reduced to 64x96."""
    sam, _ = tiny
    opts = dict(points_per_side=8, **TINY_SETTINGS["all masks"][0])
    big = np.asarray(Image.fromarray(images(1, seed=3)[0]).resize((192, 128), Image.BILINEAR))
    out = ms.BatchedMaskGenerator(sam, encoder_batch=1, **opts).generate([big], output_size=(64, 96))[0]
    want, _ = upstream_masks(sam, big, **opts)
    reduced = ms.resize_masks(torch.as_tensor(want), (64, 96))
    assert out["masks"].shape[1:] == (64, 96) and out["id_map"].shape == (64, 96)
    assert len(out["masks"]) == len(want)
    assert best_match_iou(out["masks"], reduced) > 0.8
    assert best_match_iou(reduced, out["masks"]) > 0.8


def test_bf16_autocast_runs_and_stays_close(tiny):
    sam, _ = tiny
    opts = dict(points_per_side=8, **TINY_SETTINGS["all masks"][0])
    imgs = list(images(2, seed=1))
    f32 = ms.BatchedMaskGenerator(sam, **opts).generate(imgs)
    b16 = ms.BatchedMaskGenerator(sam, bf16=True, **opts).generate(imgs)
    for a, b in zip(f32, b16):
        assert b["embedding"].dtype == torch.float32
        assert float((a["embedding"] - b["embedding"]).norm() / a["embedding"].norm()) < 0.05
        assert best_match_iou(a["masks"], b["masks"]) > 0.7


def test_generator_refuses_bad_options(tiny):
    sam, _ = tiny
    with pytest.raises(TypeError, match="unknown SAM generator options"):
        ms.BatchedMaskGenerator(sam, point_grids=[np.zeros((1, 2))])
    with pytest.raises(ValueError, match="crop_n_layers"):
        ms.BatchedMaskGenerator(sam, crop_n_layers=-1)
    with pytest.raises(ValueError, match="uint8 RGB image"):
        ms.BatchedMaskGenerator(sam).generate([np.zeros((8, 8), np.uint8)])


# -- the stage ----------------------------------------------------------------------------------------------
def test_stage_generators_agree_on_training_images(tmp_path, tiny):
    stores = {}
    for generator in ("upstream", "batched"):
        store = make_store(tmp_path / f"{generator}.zarr", n_images=(2, 1))
        stage = build_stage("sam", tiny=True, feat_dim=8, batch_size=2, pca_sample_images=3, input="training",
                            generator=generator, points_per_side=8, box_nms_thresh=1.0)
        stage.prepare(store, None)
        ctx = ShardContext(store, Shard(0, 0, 2), adapter=None, model=stage.build_model("cpu"))
        stats = stage.process_shard(ctx)
        assert not ctx.failures, ctx.failures
        assert stats["masks"] > 20 and stats["encoder_s"] > 0 and stats["decoder_s"] > 0
        stores[generator] = store
    for name in ("sam/mask_id", "sam/feat", "sam/proj"):
        np.testing.assert_array_equal(stores["upstream"].array(name)[:], stores["batched"].array(name)[:])


def store_with_tokens(path):
    store = make_store(path, n_images=(2, 1))
    store.create_array("frames/token")[:] = np.array(["frame-a", "frame-b"])
    return store


class SourceImages(DatasetAdapter):
    """The test store's frames with source images of twice the training resolution."""

    name = "test-source"

    def __init__(self, tokens, counts, seed=7, wrong_count=False):
        super().__init__(None)
        self.tokens, self.counts, self.seed, self.wrong_count = tokens, counts, seed, wrong_count
        self.calls = []

    def source_images(self, index, token=None):
        self.calls.append((index, token))
        if token != self.tokens[index]:
            raise DatasetError(f"frame {index} is {self.tokens[index]}, the store planned {token}", token)
        n = self.counts[index] + (1 if self.wrong_count else 0)
        small = images(n, seed=self.seed + index)
        return [np.asarray(Image.fromarray(im).resize((2 * W, 2 * H), Image.BILINEAR)) for im in small]


def test_stage_reads_source_images_and_writes_the_training_resolution(tmp_path, tiny):
    sam, info = tiny
    store = store_with_tokens(tmp_path / "s.zarr")
    tokens = [str(t) for t in store.array("frames/token")[:]]
    adapter = SourceImages(tokens, [2, 1])
    stage = build_stage("sam", tiny=True, feat_dim=8, batch_size=3, pca_sample_images=3, points_per_side=8,
                        box_nms_thresh=1.0)
    assert stage.config["input"] == "source" and stage.reads_dataset
    with pytest.raises(ValueError, match="input=source reads the source images through the dataset adapter"):
        stage.prepare(store, None)
    stage.prepare(store, adapter)
    gh, gw = ms.feature_grid((H, W), info["image_size"])
    assert (store.dims()["h"], store.dims()["w"]) == (gh, gw)  # the training resolution's grid
    ctx = ShardContext(store, Shard(0, 0, 2), adapter=adapter, model=stage.build_model("cpu"))
    stage.process_shard(ctx)
    assert not ctx.failures, ctx.failures
    assert (1, tokens[1]) in adapter.calls
    # what the stage wrote = the generator on the 2x source images, masks made at 64x96
    src = adapter.source_images(0, tokens[0]) + adapter.source_images(1, tokens[1])
    gen = ms.BatchedMaskGenerator(sam, encoder_batch=3, **stage.generator_options())
    outs = gen.generate(src, output_size=(H, W), grid_size=(gh, gw))
    np.testing.assert_array_equal(store.array("sam/mask_id")[:], np.stack([o["id_map"].numpy() for o in outs]))
    proj, mean = store.array("sam/proj")[:], store.array("sam/proj_mean")[:]
    want = np.stack([ms.project(o["embedding"].numpy(), proj, mean) for o in outs])
    np.testing.assert_allclose(store.array("sam/feat")[:].astype(np.float32), want, rtol=1e-2, atol=1e-2)
    # ... and not what SAM makes of the stored training images
    assert not np.array_equal(store.array("sam/mask_id")[:], np.stack([
        o["id_map"].numpy() for o in gen.generate(list(store.array("images/rgb")[:]))]))


def test_stage_source_images_must_match_the_plan(tmp_path, tiny):
    store = store_with_tokens(tmp_path / "s.zarr")
    tokens = [str(t) for t in store.array("frames/token")[:]]
    stage = build_stage("sam", tiny=True, feat_dim=8, proj_store=None, pca_sample_images=1)
    stage.prepare(store, SourceImages(tokens, [2, 1]))
    for adapter, message in ((SourceImages(tokens, [2, 1], wrong_count=True), "3 source images but 2 were planned"),
                             (SourceImages(["other", "frames"], [2, 1]), "the store planned")):
        ctx = ShardContext(store, Shard(0, 0, 2), adapter=adapter, model=stage.get_model("cpu"))
        stage.process_shard(ctx)
        assert ctx.failures and message in ctx.failures[0]["error"], ctx.failures


def test_stage_options_are_checked_and_fingerprinted():
    with pytest.raises(ValueError, match="input='camera' is not one of source, training"):
        build_stage("sam", tiny=True, input="camera")
    with pytest.raises(ValueError, match="generator='fast' is not one of batched, upstream"):
        build_stage("sam", tiny=True, generator="fast")
    with pytest.raises(ValueError, match="bf16=true needs generator=batched"):
        build_stage("sam", tiny=True, generator="upstream", bf16=True)
    fp = build_stage("sam", tiny=True).fingerprint()
    assert fp["version"] == 2
    assert {k: fp["config"][k] for k in ("input", "generator", "bf16")} == \
        {"input": "source", "generator": "batched", "bf16": False}
    assert not build_stage("sam", tiny=True, input="training").reads_dataset


def test_labels_on_the_nuscenes_fixture_see_the_source_images(nuscenes_root, tmp_path, monkeypatch):
    """Every stage with the defaults (tiny models) on the real keyframe: SAM sees the 1600x900 camera images and
    writes 224x416 ids; the store validates."""
    from data_cache.store import Store
    from data_cache.validate import validate_store
    from pipeline.datasets.base import build_adapter
    from pipeline.runner import run_labels
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    summary = run_labels("nuscenes", tmp_path, "correspond,maskclip,sam,refine", data_root=nuscenes_root, split="all",
                         workers=0, progress=False, stage_options={"maskclip": {"tiny": True}, "sam": {"tiny": True}})
    assert not summary.failed_frames, summary.failed_frames
    report = validate_store(summary.store)
    assert report.ok, report.errors
    store = Store(summary.store)
    ids = store.array("sam/mask_id")[:]
    assert ids.shape == (6, 224, 416) and ids.max() >= 0
    source = build_adapter("nuscenes", nuscenes_root, split="all").source_images(0)
    assert {im.shape for im in source} == {(900, 1600, 3)}
    stage = build_stage("sam", tiny=True)
    sam, _ = ms.build_sam(tiny=True)
    gen = ms.BatchedMaskGenerator(sam, encoder_batch=stage.config["batch_size"], **stage.generator_options())
    want = [o["id_map"].numpy() for i in range(0, 6, 4) for o in gen.generate(source[i:i + 4], output_size=(224, 416))]
    np.testing.assert_array_equal(ids, np.stack(want))
