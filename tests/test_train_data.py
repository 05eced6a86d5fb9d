"""The Dataset and its collation: augmentations keep the pairs consistent, offsets shift indices."""
import pickle

import numpy as np
import pytest
import torch

from data_cache.store import Store
from tests.toy_store import build_toy_store
from train.config import load_config
from train.data import CacheFrameDataset, collate_offsets, voxelize


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return build_toy_store(tmp_path_factory.mktemp("data") / "toy.zarr", num_frames=3, num_images=4)


def _cfg(**over):
    return load_config("synthetic_street_cpu", over)


def test_toy_store_passes_the_store_validator(toy):
    from data_cache.validate import validate_store
    report = validate_store(toy)
    assert not report.errors, report.errors


def test_dataset_opens_stores_lazily_and_pickles(toy):
    ds = CacheFrameDataset([toy], _cfg())
    assert ds._stores is None  # nothing but the offsets is read at construction
    ds[0]
    assert ds._stores is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._stores is None and len(clone) == 3


def test_eval_items_are_the_store_unchanged(toy):
    ds = CacheFrameDataset([toy], _cfg(), train=False)
    st = Store(toy)
    item = ds[1]
    i0, i1 = st.offsets("images")[1:3]
    assert np.array_equal(item["rgb"], st.array("images/rgb")[i0:i1].transpose(0, 3, 1, 2))
    assert np.array_equal(item["clip_label"], st.array("clip/label")[i0:i1])
    k0, k1 = st.offsets("pairs")[1:3]
    assert np.array_equal(item["pair_uv"], st.array("pairs/uv")[k0:k1].astype(np.int64))
    assert np.array_equal(item["pair_image"], st.array("pairs/image")[k0:k1] - i0)
    # voxel -> point inverse map: every point lands in the voxel of its own coordinates
    grid = np.floor(item["coord"] / 0.1).astype(np.int64)
    grid -= grid.min(0)
    assert np.array_equal(item["voxel_coord"][item["inverse"]], grid)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_augmented_pairs_still_hit_their_points_class(toy, seed):
    ds = CacheFrameDataset([toy], _cfg(seed=seed, **{"data.augment.crop_scale": [0.3, 0.6]}))
    agree, total, dropped = 0, 0, 0
    st = Store(toy)
    for idx in range(len(ds)):
        item = ds[idx]
        assert not np.allclose(item["affine"], [1, 0, 1, 0])  # a crop happened
        col, row = item["pair_uv"][:, 0], item["pair_uv"][:, 1]
        assert col.max() < 48 and row.max() < 32 and col.min() >= 0 and row.min() >= 0
        pixel_cls = item["image_gt"][item["pair_image"], row, col]
        agree += int((pixel_cls == item["point_gt"][item["pair_point"]]).sum())
        total += len(pixel_cls)
        k = st.offsets("pairs")
        dropped += (k[idx + 1] - k[idx]) - len(pixel_cls)
    assert dropped > 0  # pairs outside the crops are gone
    assert agree / total > 0.95  # the unaugmented toy agrees at ~0.99 (boundary pixels)


def test_epoch_sampler_encodes_the_epoch_in_the_index(toy):
    from train.data import EpochSampler
    ds = CacheFrameDataset([toy], _cfg())
    sampler = EpochSampler(range(3), len(ds))
    sampler.set_epoch(2)
    assert list(sampler) == [6, 7, 8]
    encoded = ds[7]
    ds.set_epoch(2)
    plain = ds[1]
    assert np.array_equal(encoded["coord"], plain["coord"]) and np.array_equal(encoded["affine"], plain["affine"])
    ds.set_epoch(0)
    assert not np.array_equal(ds[1]["coord"], plain["coord"])  # another epoch, another augmentation


def test_point_augmentation_preserves_geometry(toy):
    ds = CacheFrameDataset([toy], _cfg(**{"data.augment.scale": None}))
    item = ds[0]
    st = Store(toy)
    xyz = st.array("points/xyz")[: len(item["coord"])]
    d0 = np.linalg.norm(xyz[:50, None] - xyz[None, :50], axis=-1)
    d1 = np.linalg.norm(item["coord"][:50, None] - item["coord"][None, :50], axis=-1)
    assert np.allclose(d0, d1, atol=1e-4) and not np.allclose(xyz, item["coord"])


def test_images_per_frame_samples_n_and_filters_pairs(tmp_path):
    path = build_toy_store(tmp_path / "many.zarr", num_frames=2, images_per_frame=[6, 5], num_images=0)
    ds = CacheFrameDataset([path], _cfg(**{"data.images_per_frame": 3}))
    for idx in range(2):
        item = ds[idx]
        assert len(item["rgb"]) == 3 and len(np.unique(item["image_rows"])) == 3
        assert item["pair_image"].max() < 3
    ev = CacheFrameDataset([path], _cfg(**{"data.images_per_frame": 3}), train=False)
    assert len(ev[0]["rgb"]) == 6  # eval.images_per_frame = 0: every image


def test_collate_offsets_shift_indices(toy):
    ds = CacheFrameDataset([toy], _cfg(), train=False)
    items = [ds[0], ds[2]]
    b = collate_offsets(items)
    n0 = len(items[0]["coord"])
    assert b["point_offset"].tolist() == [0, n0, n0 + len(items[1]["coord"])]
    assert b["image_offset"].tolist() == [0, 4, 8]
    k0 = len(items[0]["pair_point"])
    assert torch.equal(b["pair_point"][k0:], torch.from_numpy(items[1]["pair_point"]) + n0)
    assert torch.equal(b["pair_image"][k0:], torch.from_numpy(items[1]["pair_image"]) + 4)
    v0 = len(items[0]["voxel_coord"])
    assert torch.equal(b["inverse"][n0:], torch.from_numpy(items[1]["inverse"]) + v0)
    assert b["voxel_index"][:, 0].tolist() == [0] * v0 + [1] * len(items[1]["voxel_coord"])


def test_voxelize_merges_points_of_one_voxel():
    coord = np.array([[0.01, 0.01, 0.01], [0.02, 0.05, 0.0], [0.5, 0.0, 0.0]], np.float32)
    vox, inv = voxelize(coord, 0.1)
    assert len(vox) == 2 and inv[0] == inv[1] != inv[2]


def test_colour_jitter_changes_pixels_only_and_is_seeded(toy):
    """data.augment.color_jitter: the images change, the label maps and pairs do not; same seed, same item."""
    over = ["data.augment.crop_scale=[1.0,1.0]", "data.augment.hflip=false"]
    plain = CacheFrameDataset([toy], load_config("synthetic_street_cpu", over))[1]
    cfg = load_config("synthetic_street_cpu", over + ["data.augment.color_jitter=[0.4,0.4,0.4,0.1]"])
    a, b = CacheFrameDataset([toy], cfg)[1], CacheFrameDataset([toy], cfg)[1]
    assert np.array_equal(a["rgb"], b["rgb"])
    assert a["rgb"].dtype == np.uint8 and np.abs(a["rgb"].astype(int) - plain["rgb"]).mean() > 2
    for key in ("clip_label", "clip_refined", "mask_id", "image_gt", "pair_uv", "pair_point", "voxel_feat"):
        assert np.array_equal(a[key], plain[key]), key
    with pytest.raises(ValueError, match="color_jitter"):
        load_config("synthetic_street_cpu", ["data.augment.color_jitter=[0.4,0.4,2,0.1]"])
