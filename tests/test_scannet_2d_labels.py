"""ScanNet's own 2D labels (raw ``label-filt/`` and the 25k-frame layout) read back pixel-exact into ``images/gt``.

The real fixture has no 2D labels, so the tests make them from its projected, occlusion-checked points: each
training-resolution pixel gets the NYU40 id of the nearest point that projects to it, then that map is
upsampled to the colour resolution (each native pixel takes the training pixel whose footprint holds its
centre), so a correct nearest-neighbour downsampling returns it exactly.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import main
from data_cache.store import Store
from data_cache.validate import validate_store
from pipeline.datasets import DatasetError, build_adapter
from pipeline.datasets.classes import nyu40_to_scannet20_lut
from pipeline.projection import project_points, uv_to_training_pixels
from pipeline.runner import run_labels

SCENE = "scene0000_00"
TRAIN_HW = (240, 320)
# visible points per posed frame (the fixture's README verification table; 0.10 m tolerance)
SCANNET_VISIBLE = {"00000": 2076, "00040": 4203, "00075": 2668, "00100": 4208, "00150": 4378, "00200": 2082,
                   "00225": 3678, "00275": 3630}


def scannet_id(nyu40: np.ndarray) -> np.ndarray:
    """The made-up ScanNet label id of each NYU40 id in the test's label map (0 stays unannotated)."""
    return np.where(nyu40 > 0, nyu40 * 7 + 3, 0)


def training_label_maps(src_root) -> dict[str, np.ndarray]:
    """Per posed frame, the NYU40 map at 240x320 from the points that the depth map confirms (nearest wins)."""
    adapter = build_adapter("scannet", src_root, split="all")
    frame = adapter.load(0)
    nyu = np.load(src_root / "labels" / f"{SCENE}_sem_label_all.npy").astype(np.int64)
    maps = {}
    for im in frame.images:
        idx, uv, z = project_points(frame.xyz, im.points_to_camera, im.intrinsics, im.rgb.shape[:2],
                                    adapter.min_depth, depth=im.depth, depth_intrinsics=im.depth_intrinsics,
                                    tolerance=adapter.occlusion_tolerance)
        px = uv_to_training_pixels(uv, im.rgb.shape[:2], TRAIN_HW).astype(np.int64)
        order = np.argsort(-z)  # far to near: the nearest point is written last
        label = np.zeros(TRAIN_HW, dtype=np.int64)
        label[px[order, 1], px[order, 0]] = nyu[idx[order]]
        maps[im.name] = label
    return maps


def upsample(label: np.ndarray, native_hw) -> np.ndarray:
    """Native pixel (r, c) takes training pixel (floor((r + .5) H / h), floor((c + .5) W / w))."""
    rows = np.floor((np.arange(native_hw[0]) + 0.5) * label.shape[0] / native_hw[0]).astype(np.int64)
    cols = np.floor((np.arange(native_hw[1]) + 0.5) * label.shape[1] / native_hw[1]).astype(np.int64)
    return label[rows][:, cols]


def build_labelled_copy(src_root, root, maps, scenes=(SCENE,)):
    """A copy of the fixture with 2D labels in both layouts: posed_images + scans/<scene>/label-filt (ScanNet
    ids, 16-bit, with a label map) and scannet_frames_25k/<scene>/{color,depth,pose,label} (NYU40, 8-bit)."""
    (root / "points").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "meta_data").mkdir()
    with open(root / "meta_data" / "scannetv2-labels.combined.tsv", "w") as f:
        f.write("id\traw_category\tcategory\tcount\tnyu40id\n")
        for nyu in range(1, 41):
            f.write(f"{int(scannet_id(np.array(nyu)))}\tthing{nyu}\tthing{nyu}\t1\t{nyu}\n")
    src_images = src_root / "posed_images" / SCENE
    for scene in scenes:
        shutil.copy(src_root / "points" / f"{SCENE}.bin", root / "points" / f"{scene}.bin")
        shutil.copy(src_root / "labels" / f"{SCENE}_sem_label_all.npy", root / "labels" / f"{scene}_sem_label_all.npy")
        shutil.copytree(src_images, root / "posed_images" / scene)
        filt = root / "scans" / scene / "label-filt"
        k25 = root / "scannet_frames_25k" / scene
        for sub in ("color", "depth", "pose", "label"):
            (k25 / sub).mkdir(parents=True)
        filt.mkdir(parents=True)
        shutil.copy(src_images / "intrinsic.txt", k25 / "intrinsics_color.txt")
        for name, label in maps.items():
            native_hw = Image.open(src_images / f"{name}.jpg").size[::-1]
            native = upsample(label, native_hw)
            Image.fromarray(scannet_id(native).astype(np.uint16)).save(filt / f"{int(name)}.png")
            k_name = f"{int(name):06d}"
            Image.fromarray(native.astype(np.uint8)).save(k25 / "label" / f"{k_name}.png")
            shutil.copy(src_images / f"{name}.jpg", k25 / "color" / f"{k_name}.jpg")
            shutil.copy(src_images / f"{name}.png", k25 / "depth" / f"{k_name}.png")
            shutil.copy(src_images / f"{name}.txt", k25 / "pose" / f"{k_name}.txt")
    for p in root.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return root


@pytest.fixture(scope="module")
def label_maps(scannet_root):
    return training_label_maps(scannet_root)


@pytest.fixture(scope="module")
def labelled_root(scannet_root, label_maps, tmp_path_factory):
    return build_labelled_copy(scannet_root, tmp_path_factory.mktemp("scannet2d") / "scannet", label_maps)


def test_made_labels_are_substantial(label_maps):
    for name, label in label_maps.items():
        assert (label > 0).sum() > 1000, name  # thousands of labelled pixels per frame, not a token few
        assert len(np.unique(label)) > 3, name


@pytest.mark.parametrize("source,names", [("posed_images", list(SCANNET_VISIBLE)),
                                          ("frames_25k", [f"{int(n):06d}" for n in SCANNET_VISIBLE])])
def test_2d_labels_read_back_pixel_exact(labelled_root, label_maps, tmp_path, source, names):
    summary = run_labels("scannet", tmp_path, "correspond", data_root=labelled_root, split="all", workers=0,
                         dataset_options={"image_source": source}, progress=False)
    assert not summary.failed_frames
    assert validate_store(summary.store).ok
    store = Store(summary.store)
    attrs = store.attrs
    assert attrs.image_gt_source == "scannet_2d_labels"
    assert set(attrs.capabilities) == {"point_gt", "image_gt"}
    assert attrs.dataset_config["image_source"] == source
    assert list(store.array("images/name")[:]) == names
    gt = store.array("images/gt")[:]
    assert gt.shape == (8, *TRAIN_HW)
    lut = nyu40_to_scannet20_lut()
    for i, name in enumerate(SCANNET_VISIBLE):
        np.testing.assert_array_equal(gt[i], lut[label_maps[name]], err_msg=f"{source} {name}")
    # the same geometry from either source: the pairs per image are the fixture's verified counts
    per_image = np.bincount(store.array("pairs/image")[:], minlength=8)
    assert per_image.tolist() == list(SCANNET_VISIBLE.values())


def test_without_2d_labels_the_store_says_projected_3d(scannet_root, tmp_path):
    summary = run_labels("scannet", tmp_path, "correspond", data_root=scannet_root, split="all", workers=0,
                         progress=False)
    store = Store(summary.store)
    assert store.attrs.image_gt_source == "projected_3d" and "images/gt" not in store


def test_label_ids_outside_the_map_and_missing_map(labelled_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(labelled_root, root)
    (root / "meta_data" / "scannetv2-labels.combined.tsv").unlink()
    with pytest.raises(DatasetError, match="scannetv2-labels.combined.tsv.*label_filt_ids=nyu40"):
        build_adapter("scannet", root, split="all", image_source="posed_images").capabilities
    # the same images read as NYU40 hold ids > 40 (ScanNet ids): refused, naming file and frame
    adapter = build_adapter("scannet", root, split="all", label_filt_ids="nyu40", image_source="posed_images")
    with pytest.raises(DatasetError, match=r"frame 00000 holds id \d+, outside NYU40.*label-filt/0.png"):
        adapter.load(0)


def test_some_scenes_without_labels_is_refused(labelled_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(labelled_root, root)
    shutil.copy(root / "points" / f"{SCENE}.bin", root / "points" / "scene0001_00.bin")
    shutil.copytree(root / "posed_images" / SCENE, root / "posed_images" / "scene0001_00")
    with pytest.raises(DatasetError, match="1 of 2 scenes have 2D labels.*scene0001_00"):
        build_adapter("scannet", root, split="all", image_source="posed_images").capabilities


@pytest.mark.parametrize("source", ["posed_images", "frames_25k"])
def test_label_png_of_the_wrong_size(scannet_root, label_maps, tmp_path, source):
    good, bad = SCENE, "scene0001_00"
    root = build_labelled_copy(scannet_root, tmp_path / "scannet", label_maps, scenes=(good, bad))
    path = (root / "scans" / bad / "label-filt" / "75.png" if source == "posed_images"
            else root / "scannet_frames_25k" / bad / "label" / "000075.png")
    Image.open(path).resize((320, 320), Image.NEAREST).save(path)
    result = CliRunner().invoke(main, ["labels", "--dataset", "scannet", "--data-root", str(root), "--split", "all",
                                       "--cache", str(tmp_path / "c"), "--stages", "correspond", "--workers", "0",
                                       "--shard-size", "1", "--no-progress",
                                       "--dataset-option", f"image_source={source}"])
    assert result.exit_code == 1
    assert f"frame 1 ({bad})" in result.output and str(path) in result.output
    assert "is 320x320 but its colour image is 1296x968" in result.output
    store = Store(tmp_path / "c" / "scannet-all.zarr")
    assert store.is_done("correspond", 0) and not store.is_done("correspond", 1)  # the good scene finished
    failures = store.failures("correspond")
    assert [f["token"] for v in failures.values() for f in v] == [bad]


def test_default_image_source_is_the_25k_frames_where_present(labelled_root, capsys):
    """The paper trains the 2D network on ScanNet's 25k key frames: the default where scannet_frames_25k/ exists."""
    ds = build_adapter("scannet", root=labelled_root, split="all")
    assert ds.image_source == "frames_25k" and ds.config()["image_source"] == "frames_25k"
    assert ds._image_ids(SCENE) == [f"{int(n):06d}" for n in SCANNET_VISIBLE]  # the 25k layout's frames
    assert "note" not in capsys.readouterr().err
    explicit = build_adapter("scannet", root=labelled_root, split="all", image_source="posed_images")
    assert explicit.image_source == "posed_images"  # an explicit choice still wins


def test_default_image_source_falls_back_to_posed_images_with_a_note(scannet_root, capsys):
    assert not (scannet_root / "scannet_frames_25k").exists()  # the real fixture has no 25k frames
    ds = build_adapter("scannet", root=scannet_root, split="all")
    assert ds.image_source == "posed_images" and ds.config()["image_source"] == "posed_images"
    assert ds._image_ids(SCENE) == list(SCANNET_VISIBLE)
    err = capsys.readouterr().err
    assert "no scannet_frames_25k/" in err and "posed images" in err
    with pytest.raises(DatasetError, match="image_source=frames_25k needs"):
        build_adapter("scannet", root=scannet_root, split="all", image_source="frames_25k")
