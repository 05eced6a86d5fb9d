"""`cns-cli inspect frame`: the pictures are right, pixel by pixel.

Synthetic frames with known labels, masks and points give the colours expected at known places; on the real
nuScenes fixture the projected points land where the devkit's ``map_pointcloud_to_image`` puts them.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import main
from data_cache.store import Store
from inspection import render
from inspection.palettes import SCANNET_NYU40_PALETTE, palette_for
from pipeline.datasets.classes import SCANNET20, nuscenes16
from tests.toy_store import build_toy_store


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_palettes_are_the_devkit_and_scannet_colours():
    from nuscenes.eval.lidarseg.utils import LidarsegClassMapper
    from nuscenes.utils.color_map import get_colormap
    nus = palette_for(nuscenes16())
    mapper = LidarsegClassMapper.__new__(LidarsegClassMapper)  # the colour table needs no dataset
    mapper.ignore_class = mapper.get_ignore_class()
    coarse = mapper.get_coarse2color()
    assert nus.colour(nuscenes16().index("car")) == (255, 158, 0) == tuple(coarse["car"])
    assert [nus.colour(i) for i in range(16)] == [tuple(coarse[n]) for n in nuscenes16()]
    assert palette_for(["vehicle.car", "flat.driveable_surface"]).colour(1) == get_colormap()["flat.driveable_surface"]
    scan = palette_for(SCANNET20)
    assert scan.colour(0) == (174, 199, 232) and scan.colour(SCANNET20.index("toilet")) == (44, 160, 44)
    assert scan.colour(SCANNET20.index("otherfurniture")) == SCANNET_NYU40_PALETTE[39]
    other = palette_for(["ground", "car", "tree"])
    assert len({other.colour(i) for i in range(3)}) == 3 and other.colour(255) == (0, 0, 0)


def test_label_picture_colours_at_known_places():
    """A 6x8 map: left half 'car', right half 'driveable_surface', one unlabelled pixel; drawn at scale 3."""
    names = nuscenes16()
    car, road = names.index("car"), names.index("driveable_surface")
    labels = np.full((6, 8), road, np.uint8)
    labels[:, :4] = car
    labels[2, 6] = 255
    pic = render.label_picture(labels, palette_for(names), scale=3)
    assert pic.shape == (18, 24, 3)
    assert tuple(pic[0, 0]) == tuple(pic[17, 11]) == (255, 158, 0)    # car (devkit orange)
    assert tuple(pic[0, 12]) == tuple(pic[17, 23]) == (0, 207, 191)   # driveable surface (nuTonomy green)
    assert (pic[6:9, 18:21] == 0).all()                               # the unlabelled pixel's 3x3 block: black
    assert tuple(pic[5, 18]) == (0, 207, 191) and tuple(pic[9, 21]) == (0, 207, 191)  # its neighbours are not


def test_sam_picture_boundaries_tint_and_outside():
    rgb = np.full((4, 6, 3), 100, np.uint8)
    ids = np.full((4, 6), 0, np.int32)
    ids[:, 3:] = 1
    ids[3, :] = -1                   # the bottom row lies outside every mask
    pic = render.sam_picture(rgb, ids, scale=2, alpha=0.5)
    white = np.array(render.BOUNDARY)
    # the last picture column of mask 0 (x = 3*2-1) is a boundary in the rows inside masks
    assert (pic[0:5, 5] == white).all()
    # the boundary to the outside row: the last picture row of the masks (y = 3*2-1)
    assert (pic[5, :] == white).all()
    # outside every mask: the image unchanged
    assert (pic[6:, :] == 100).all()
    # inside: blended 50/50 with the tab20 colour of the mask id
    import matplotlib
    tint0 = np.round(np.array(matplotlib.colormaps["tab20"](0)[:3]) * 255)
    np.testing.assert_array_equal(pic[1, 1], np.round(0.5 * 100 + 0.5 * tint0).astype(np.uint8))


def test_points_land_on_their_pixels_and_near_ones_win():
    uv = np.array([[1, 1], [5, 2], [5, 2], [0, 3]])
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]], np.uint8)
    depth = np.array([1.0, 5.0, 2.0, 3.0])   # the two points on pixel (5, 2): the blue one is nearer
    pic = render.points_picture(None, (4, 8), uv, colours, depth, scale=2, grow=0)
    assert (pic[2:4, 2:4] == [255, 0, 0]).all()
    assert (pic[4:6, 10:12] == [0, 0, 255]).all()
    assert (pic[6:8, 0:2] == [9, 9, 9]).all()
    assert int((pic.sum(-1) > 0).sum()) == 12  # three 2x2 blocks, nothing else
    grown = render.points_picture(None, (4, 8), uv[:1], colours[:1], depth[:1], scale=2, grow=1)
    assert (grown[1:5, 1:5] == [255, 0, 0]).all() and int((grown.sum(-1) > 0).sum()) == 16


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return build_toy_store(tmp_path_factory.mktemp("pictures") / "toy.zarr", num_frames=2, num_images=3)


def test_frame_pictures_of_a_known_store(toy, tmp_path):
    """The written PNGs of frame 1, image 2 equal the store's label maps in the palette's colours, and every
    point drawn alone (no other pair within a pixel) shows its ground-truth colour on its pixel."""
    out = tmp_path / "frame"
    res = CliRunner().invoke(main, ["inspect", "frame", str(toy), "toy0-001", "--image", "2", "--out", str(out),
                                    "--scale", "2"])
    assert res.exit_code == 0, res.output
    st = Store(toy)
    pal = palette_for(st.attrs.class_names)
    row = int(st.offsets("images")[1]) + 2
    for key, arr in (("gt", "images/gt"), ("clip_label", "clip/label"), ("clip_label_refined", "clip/label_refined")):
        expected = np.repeat(np.repeat(pal.colourize(st.array(arr)[row]), 2, 0), 2, 1)
        np.testing.assert_array_equal(_png(out / f"02_CAM_2_{key}.png"), expected, err_msg=key)
    np.testing.assert_array_equal(_png(out / "02_CAM_2_rgb.png")[::2, ::2], st.array("images/rgb")[row])
    k0, k1 = st.offsets("pairs")[1:3]
    sel = st.array("pairs/image")[k0:k1] == row
    uv = st.array("pairs/uv")[k0:k1][sel].astype(int)
    pts = st.array("pairs/point")[k0:k1][sel]
    gt = st.array("points/gt")[st.offsets("points")[1]:][pts]
    pic = _png(out / "02_CAM_2_points_gt.png")
    dist = np.abs(uv[:, None, :] - uv[None, :, :]).max(-1) + np.eye(len(uv), dtype=int) * 99
    alone = dist.min(1) >= 2
    assert alone.sum() > 10
    for (u, v), c in zip(uv[alone], gt[alone]):
        assert (pic[2 * v:2 * v + 2, 2 * u:2 * u + 2] == pal.colour(c)).all()
    meta = json.loads((out / "frame.json").read_text())
    assert meta["token"] == "toy0-001" and set(meta["images"]) == {"CAM_2"}
    for name in ("legend.png", "bev_refined.png", "bev_gt.png", "confusion.png", "02_CAM_2_sheet.png",
                 "02_CAM_2_sam_masks.png", "02_CAM_2_points_depth.png", "02_CAM_2_points_label.png"):
        assert (out / name).exists(), name


def test_nuscenes_points_land_where_the_devkit_puts_them(nuscenes_root, tmp_path):
    """The depth picture of every camera, compared with a picture drawn from the devkit's own projection
    (``map_pointcloud_to_image``: the same points at the same pixels, scaled to the training resolution)."""
    from pipeline.datasets import build_adapter
    from pipeline.runner import run_labels
    summary = run_labels("nuscenes", tmp_path, "correspond", data_root=nuscenes_root, split="all", workers=0,
                         progress=False)
    out = tmp_path / "frame"
    res = CliRunner().invoke(main, ["inspect", "frame", str(summary.store), "0", "--out", str(out), "--scale", "2"])
    assert res.exit_code == 0, res.output
    nusc = build_adapter("nuscenes", nuscenes_root, split="all").nusc
    st = Store(summary.store)
    token = str(st.array("frames/token")[0])
    sample = nusc.get("sample", nusc.get("sample_data", token)["sample_token"])
    rgb_all = st.array("images/rgb")[:]
    for k, cam in enumerate(st.array("images/name")[:]):
        pts, depth, _ = nusc.explorer.map_pointcloud_to_image(token, sample["data"][str(cam)])
        col = np.floor((pts[0] + 0.5) * 416 / 1600).astype(int)   # training pixel of a native coordinate
        row = np.floor((pts[1] + 0.5) * 224 / 900).astype(int)
        pic = _png(out / f"{k:02d}_{cam}_points_depth.png")
        background = np.round(np.repeat(np.repeat(rgb_all[k], 2, 0), 2, 1) * render.POINT_BACKGROUND_DIM)
        drawn = (pic != background.astype(np.uint8)).any(-1)
        # each devkit point covers its 2x2 block; the devkit computes in float32, so a few points on a pixel
        # border fall into the neighbouring training pixel in the store (which computes in float64)
        on_block = drawn[2 * row, 2 * col] & drawn[2 * row + 1, 2 * col + 1]
        assert on_block.mean() >= 0.998, (cam, int((~on_block).sum()))
        # nothing is drawn away from the devkit's points: a marker covers its pixel's block grown by one picture
        # pixel; allowing for the border cases one training pixel further, and for the store's few extra points
        # on the image's 1-pixel margin (the devkit leaves those out)
        expected = np.zeros_like(drawn)
        for dy in range(-3, 5):
            for dx in range(-3, 5):
                expected[np.clip(2 * row + dy, 0, 447), np.clip(2 * col + dx, 0, 831)] = True
        ys, xs = np.nonzero(drawn & ~expected)
        assert ((ys <= 2) | (ys >= 445) | (xs <= 2) | (xs >= 829)).all(), cam
        assert drawn.sum() > 4 * len(col), cam  # and the markers are there at all
