"""The synthetic dataset: geometry consistency, class balance, determinism, pictures and option checking."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.datasets import DatasetError, build_adapter, check_rigid
from pipeline.datasets.classes import SCANNET20, nuscenes16
from pipeline.datasets.synthetic import SyntheticDataset
from pipeline.projection import project_points
from pipeline.synthetic import street
from pipeline.synthetic.figures import colorize_labels, labels_from_colours
from pipeline.synthetic.indoor import build_room, render_room
from pipeline.synthetic.palettes import CLASS_COLOUR_VERSION

#: per-class share of labelled points over 20 generated scenes, [low, high] (documented in docs/synthetic.md)
STREET_POINT_BANDS = {
    "barrier": (0.0002, 0.03), "bicycle": (0.00005, 0.005), "bus": (0.001, 0.12), "car": (0.05, 0.20),
    "construction_vehicle": (0.0001, 0.04), "motorcycle": (0.00002, 0.006), "pedestrian": (0.002, 0.01),
    "traffic_cone": (0.00005, 0.003), "trailer": (0.0005, 0.06), "truck": (0.008, 0.10),
    "driveable_surface": (0.28, 0.45), "other_flat": (0.002, 0.08), "sidewalk": (0.03, 0.08),
    "terrain": (0.01, 0.05), "manmade": (0.14, 0.28), "vegetation": (0.07, 0.20),
}
INDOOR_POINT_BANDS = {
    "wall": (0.30, 0.60), "floor": (0.15, 0.40), "cabinet": (0.01, 0.10), "bed": (0.002, 0.08),
    "chair": (0.002, 0.05), "sofa": (0.001, 0.06), "table": (0.002, 0.06), "door": (0.005, 0.06),
    "window": (0.005, 0.08), "bookshelf": (0.002, 0.08), "picture": (0.002, 0.04), "counter": (0.0005, 0.05),
    "desk": (0.0005, 0.05), "curtain": (0.0005, 0.06), "refrigerator": (0.0005, 0.05),
    "shower curtain": (0.0002, 0.04), "toilet": (0.0002, 0.03), "sink": (0.0002, 0.02), "bathtub": (0.0005, 0.05),
    "otherfurniture": (0.005, 0.06),
}


@pytest.fixture(scope="module")
def street_data():
    return SyntheticDataset(kind="street", num_scenes=2, seed=3)


@pytest.fixture(scope="module")
def indoor_data():
    return SyntheticDataset(kind="indoor", num_scenes=1, seed=3, frames_per_room=4)


def _label_near(gt: np.ndarray, rows: np.ndarray, cols: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """True where ``labels`` occurs in the 3x3 pixel neighbourhood of (row, col): edges may go either way."""
    h, w = gt.shape
    found = np.zeros(len(rows), bool)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            found |= gt[np.clip(rows + dr, 0, h - 1), np.clip(cols + dc, 0, w - 1)] == labels
    return found


def _pixels(uv: np.ndarray):
    return np.rint(uv[:, 1]).astype(np.int64), np.rint(uv[:, 0]).astype(np.int64)


# -- geometry --------------------------------------------------------------------------------------------

def test_street_points_match_pixel_labels_where_visible(street_data):
    frame = street_data.load(0)
    static = np.linalg.norm(frame.extra["instance_velocity"][frame.extra["point_instance"]], axis=1) == 0
    for im, depth in zip(frame.images, frame.extra["image_depth"]):
        idx, uv, z = project_points(frame.xyz, im.points_to_camera, im.intrinsics, im.rgb.shape[:2],
                                    street_data.min_depth)
        rows, cols = _pixels(uv)
        # visible: the camera's own surface at that pixel is where the LiDAR point is (moving objects have
        # moved between the LiDAR and camera times, as on nuScenes, and are left out)
        visible = (np.abs(depth[rows, cols] - z) < 0.05 + 0.01 * z) & static[idx]
        assert visible.sum() > 300, f"{im.name}: too few visible points to test ({visible.sum()})"
        near = _label_near(im.gt, rows[visible], cols[visible], frame.gt[idx[visible]])
        # a depth match can be a coincidence where two surfaces meet (a pole foot on the road): allow 0.1%
        assert (~near).sum() <= 0.001 * len(near), f"{im.name}: {np.count_nonzero(~near)} visible points disagree"
        exact = (im.gt[rows[visible], cols[visible]] == frame.gt[idx[visible]]).mean()
        assert exact > 0.97, f"{im.name}: only {exact:.3f} of visible points hit a pixel of their own class"


def test_street_depth_maps_agree_with_lidar_ranges(street_data):
    """Where a LiDAR point lands on a pixel of its own object, camera depth and LiDAR range agree."""
    frame = street_data.load(0)
    static = np.linalg.norm(frame.extra["instance_velocity"][frame.extra["point_instance"]], axis=1) == 0
    for im, depth, inst in zip(frame.images, frame.extra["image_depth"], frame.extra["image_instance"]):
        idx, uv, z = project_points(frame.xyz, im.points_to_camera, im.intrinsics, im.rgb.shape[:2], 1.0)
        rows, cols = _pixels(uv)
        same = (inst[rows, cols] == frame.extra["point_instance"][idx]) & static[idx]
        assert same.mean() > 0.5, f"{im.name}: only {same.mean():.2f} of projected points land on their object"
        error = np.abs(depth[rows, cols][same] - z[same])
        # a pixel spans a slanted surface: allow a slope term on top of the 1.5 cm range noise
        assert np.quantile(error, 0.95) < 0.1 + 0.01 * np.quantile(z[same], 0.95), im.name


def test_street_transforms_include_ego_motion(street_data):
    frame = street_data.load(0)
    ego_lidar = frame.extra["ego_to_global_lidar"]
    for im, ego_cam, (name, yaw, position, *_rest) in zip(frame.images, frame.extra["ego_to_global_camera"],
                                                          street.CAMERA_RIG):
        assert im.name == name
        check_rigid(im.points_to_camera, "points_to_camera", frame.token, frame.points_file)
        chain = (np.linalg.inv(street.camera_to_ego(yaw, position)) @ np.linalg.inv(ego_cam) @ ego_lidar
                 @ street.LIDAR_TO_EGO)
        np.testing.assert_allclose(im.points_to_camera, chain, atol=1e-9)
    times = np.array(frame.extra["camera_timestamp_us"]) - frame.extra["lidar_timestamp_us"]
    assert len(set(times.tolist())) == 6 and (np.abs(times) < 50_000).all()


def test_street_ego_moves_between_sensor_times():
    data = SyntheticDataset(kind="street", num_scenes=20, seed=0)
    speeds = [np.linalg.norm(street.build_street_scene(data.scene_rng(i, 0)).ego_velocity) for i in range(20)]
    assert max(speeds) > 5 and min(speeds) == 0  # moving and standing egos both occur


def test_indoor_points_match_pixel_labels_with_depth_test(indoor_data):
    frame = indoor_data.load(0)
    for im in frame.images:
        idx, uv, z = project_points(frame.xyz, im.points_to_camera, im.intrinsics, im.rgb.shape[:2],
                                    indoor_data.min_depth, depth=im.depth, depth_intrinsics=im.depth_intrinsics,
                                    tolerance=indoor_data.occlusion_tolerance)
        assert len(idx) > 5000, f"{im.name}: only {len(idx)} points pass the depth test"
        rows, cols = _pixels(uv)
        near = _label_near(im.gt, rows, cols, frame.gt[idx])
        assert near.mean() > 0.995, f"{im.name}: {np.count_nonzero(~near)} visible points disagree"


def test_indoor_depth_maps_agree_with_fused_points(indoor_data):
    """Each fused point lies on the pixel ray it came from, at that pixel's depth."""
    frame = indoor_data.load(0)
    source = frame.extra["point_frame"]
    assert set(np.unique(source)) == set(range(len(frame.images)))
    for k, im in enumerate(frame.images):
        own = np.flatnonzero(source == k)
        idx, uv, z = project_points(frame.xyz[own], im.points_to_camera, im.depth_intrinsics, im.depth.shape,
                                    0.0)
        assert len(idx) == len(own), "a point falls outside the depth frame it was fused from"
        np.testing.assert_allclose(uv, np.rint(uv), atol=2e-3)
        rows, cols = _pixels(uv)
        np.testing.assert_allclose(z, im.depth[rows, cols], atol=2e-3)


def test_indoor_depth_has_holes_and_metres(indoor_data):
    im = indoor_data.load(0).images[0]
    assert im.depth.dtype == np.float32 and im.depth.shape == im.rgb.shape[:2]
    valid = im.depth > 0
    assert 0.9 < valid.mean() < 1.0  # some pixels have no reading
    assert 0.3 < np.median(im.depth[valid]) < 8.0  # metres, not millimetres


# -- class balance ---------------------------------------------------------------------------------------

def _check_bands(counts: np.ndarray, class_names, bands):
    share = counts[:len(class_names)] / counts[:len(class_names)].sum()
    outside = {name: round(float(share[i]), 5) for i, name in enumerate(class_names)
               if not bands[name][0] <= share[i] <= bands[name][1]}
    assert not outside, f"class shares outside their bands: {outside}"


def test_street_class_histogram_within_bands():
    data = SyntheticDataset(kind="street", num_scenes=20, seed=11, split="val")
    counts = np.zeros(256)
    for i in range(20):  # the LiDAR alone, to stay fast
        sweep = street.lidar_sweep(street.build_street_scene(data.scene_rng(i, 0)), 0.0, data.scene_rng(i, 1))
        counts += np.bincount(sweep.label, minlength=256)
    assert counts[255] == 0  # every street surface is labelled; the ego's returns are removed
    _check_bands(counts, nuscenes16(), STREET_POINT_BANDS)


def test_indoor_class_histogram_within_bands():
    data = SyntheticDataset(kind="indoor", num_scenes=20, seed=11, split="val")
    counts = np.zeros(256)
    for i in range(20):  # 4 frames per room instead of 16, to stay fast
        counts += np.bincount(render_room(build_room(data.scene_rng(i, 0)), 4, data.scene_rng(i, 1)).gt, minlength=256)
    _check_bands(counts, SCANNET20, INDOOR_POINT_BANDS)


def test_rare_boost_makes_rare_classes_frequent_and_one_is_the_default():
    """rare_boost=1 is the default street draw for draw; 4 multiplies the LiDAR share of the rare classes
    (every vehicle but the car, pedestrians, barriers, cones, bicycles) about twice (the car-sized ones dominate)."""
    data = SyntheticDataset(kind="street", num_scenes=12, seed=3, split="val")
    names = list(nuscenes16())
    rare = [names.index(n) for n in ("barrier", "bicycle", "bus", "construction_vehicle", "motorcycle", "pedestrian",
                                     "traffic_cone", "trailer", "truck")]
    share = {}
    for boost in (1, 4):
        counts = np.zeros(256)
        for i in range(12):
            scene = street.build_street_scene(data.scene_rng(i, 0), boost)
            counts += np.bincount(street.lidar_sweep(scene, 0.0, data.scene_rng(i, 1)).label, minlength=256)
        share[boost] = counts[rare].sum() / counts[:16].sum()
        if boost == 1:
            default = street.lidar_sweep(street.build_street_scene(data.scene_rng(0, 0)), 0.0, data.scene_rng(0, 1))
            boosted_one = street.lidar_sweep(street.build_street_scene(data.scene_rng(0, 0), 1), 0.0,
                                             data.scene_rng(0, 1))
            assert np.array_equal(default.label, boosted_one.label) and np.array_equal(default.xyz, boosted_one.xyz)
    assert share[4] > 1.8 * share[1], share  # measured 6.3 % -> 13.5 % of the points (seed 3)
    assert SyntheticDataset(kind="street", rare_boost="4").config()["rare_boost"] == 4


def test_point_spacing_thins_the_fused_room_cloud_and_the_default_is_unchanged():
    """point_spacing keeps one fused point per cube of that side: coarser means fewer points, all of them
    from the same RGB-D frames; the default (3 cm) is the room as before, point for point."""
    default = SyntheticDataset(kind="indoor", num_scenes=1, frames_per_room=3, seed=5)
    explicit = SyntheticDataset(kind="indoor", num_scenes=1, frames_per_room=3, seed=5, point_spacing="0.03")
    coarse = SyntheticDataset(kind="indoor", num_scenes=1, frames_per_room=3, seed=5, point_spacing=0.06)
    a, b, c = default.load(0), explicit.load(0), coarse.load(0)
    assert np.array_equal(a.xyz, b.xyz) and np.array_equal(a.gt, b.gt)
    assert len(c.xyz) < 0.5 * len(a.xyz)  # surfaces: about (6/3)^2 = 4 times fewer
    cubes = np.floor(c.xyz.astype(np.float64) / 0.06).astype(np.int64)
    assert len(np.unique(cubes, axis=0)) == len(cubes)  # one point per cube
    assert coarse.config()["point_spacing"] == 0.06 and default.config()["point_spacing"] == 0.03
    assert SyntheticDataset(kind="street").config()["point_spacing"] is None


def test_room_mix_furnishes_rooms_with_several_kinds_and_one_is_the_default():
    """room_mix=k furnishes each room with the furniture of k room kinds: over 16 rooms (seed 0) the rarest
    furniture class is in 1 room with the default rooms and in 5 or more with k=5 (measured: bed 1 -> 12,
    desk 2 -> 14); k=1 is the default room draw for draw (checked against the generator before the option)."""
    data = SyntheticDataset(kind="indoor", num_scenes=16, room_mix=5)
    furniture = [SCANNET20.index(n) for n in ("bed", "sofa", "desk", "counter", "refrigerator", "toilet", "sink")]
    rooms_with = {}
    for mix in (1, 5):
        present = np.zeros(len(SCANNET20), int)
        for i in range(16):
            room = build_room(data.scene_rng(i, 0), mix)
            present[np.unique(room.instance_labels[room.instance_labels < len(SCANNET20)])] += 1
            if mix == 5:
                assert len(room.room_type.split("+")) == 5
        rooms_with[mix] = present[furniture]
    assert rooms_with[1].min() <= 2 and rooms_with[5].min() >= 5, rooms_with
    default, mixed_one = build_room(data.scene_rng(3, 0)), build_room(data.scene_rng(3, 0), 1)
    assert np.array_equal(default.instance_labels, mixed_one.instance_labels)
    assert np.array_equal(default.size, mixed_one.size) and default.room_type == mixed_one.room_type
    assert data.config()["room_mix"] == 5
    assert "room_mix" not in SyntheticDataset(kind="indoor").config()  # stores written before the option keep theirs


@pytest.mark.parametrize("kind", ["street", "indoor"])
def test_class_colours_recolour_a_share_of_objects_and_nothing_else(kind):
    """class_colours=s: a share s of the instances wears its class's colour; the geometry, labels and points are
    the default scene's draw for draw; 0 is the default (and not in the fingerprint)."""
    from pipeline.synthetic.palettes import class_colour_table
    kw = {"kind": kind, "num_scenes": 1, **({"frames_per_room": 2} if kind == "indoor" else {})}
    default, one = SyntheticDataset(**kw), SyntheticDataset(class_colours=1, **kw)
    build = ((lambda d: street.build_street_scene(d.scene_rng(0, 0))) if kind == "street"
             else (lambda d: build_room(d.scene_rng(0, 0))))
    base = build(default)
    coloured = one._wear_class_colours(base, 0)
    n = len(default.class_names)
    labelled = base.prims.label < n
    got, table = coloured.prims.albedo[labelled], class_colour_table(n)[base.prims.label[labelled]]
    unclipped = got.max(1) < 0.999  # the brightness is the drawn one: divide it out where nothing saturated
    assert unclipped.mean() > 0.5
    assert np.allclose(got[unclipped] / got[unclipped].max(1, keepdims=True),
                       table[unclipped] / table[unclipped].max(1, keepdims=True), atol=1e-4)
    assert np.array_equal(coloured.prims.albedo[~labelled], base.prims.albedo[~labelled])  # ceilings kept
    half = SyntheticDataset(class_colours=0.5, **kw)._wear_class_colours(base, 0)
    changed = np.unique(base.prims.instance[(half.prims.albedo != base.prims.albedo).any(1)])
    assert 0.2 < len(changed) / len(np.unique(base.prims.instance[labelled])) < 0.8
    a, b = default.load(0), SyntheticDataset(class_colours=0.5, **kw).load(0)
    assert np.array_equal(a.xyz, b.xyz) and np.array_equal(a.gt, b.gt)
    config = SyntheticDataset(class_colours=0.5, **kw).config()
    assert config["class_colours"] == 0.5 and config["class_colour_version"] == CLASS_COLOUR_VERSION
    assert not {"class_colours", "class_colour_version"} & set(SyntheticDataset(class_colours=0, **kw).config())


@pytest.mark.parametrize("num_classes", [16, 20])
def test_class_colours_are_apart_in_chromaticity(num_classes):
    """Brightness is drawn per instance and scaled by the shading, so the class colours must differ in hue or
    saturation: any two at least 360 / ceil(L / 2) degrees of hue or 0.45 of saturation apart (version 1 had
    same-brightness pairs 20 degrees apart)."""
    import colorsys
    from pipeline.synthetic.palettes import class_colour_table
    hsv = np.array([colorsys.rgb_to_hsv(*rgb) for rgb in class_colour_table(num_classes)])
    step = 1.0 / -(-num_classes // 2)
    for i in range(num_classes):
        for j in range(i + 1, num_classes):
            hue_apart = abs(hsv[i, 0] - hsv[j, 0])
            hue_apart = min(hue_apart, 1 - hue_apart)
            assert hue_apart > step - 1e-6 or abs(hsv[i, 1] - hsv[j, 1]) > 0.45 - 1e-6, (i, j, hsv[i], hsv[j])
    assert len({tuple(np.round(c, 6)) for c in class_colour_table(num_classes)}) == num_classes


# -- determinism, splits, adapter contract ---------------------------------------------------------------

def _frame_bytes(frame) -> list[bytes]:
    arrays = [frame.xyz, frame.feat, frame.gt, frame.extra["point_instance"]]
    for im in frame.images:
        arrays += [im.rgb, im.gt, im.intrinsics, im.points_to_camera]
        if im.depth is not None:
            arrays.append(im.depth)
    return [a.tobytes() for a in arrays]


@pytest.mark.parametrize("kind", ["street", "indoor"])
def test_same_seed_same_bytes_other_seed_or_split_differs(kind):
    options = dict(kind=kind, num_scenes=1, frames_per_room=2)
    first = _frame_bytes(SyntheticDataset(seed=5, **options).load(0))
    assert first == _frame_bytes(SyntheticDataset(seed=5, **options).load(0))
    for other in (SyntheticDataset(seed=6, **options), SyntheticDataset(seed=5, split="val", **options)):
        frame = other.load(0)
        assert _frame_bytes(frame)[0] != first[0] and frame.images[0].rgb.tobytes() != first[4]


def test_frames_plan_matches_loaded_frames(street_data):
    infos = street_data.frames()
    assert len(infos) == 2 and len({i.token for i in infos}) == 2
    for i, info in enumerate(infos):
        frame = street_data.load(i)
        assert info.num_points == len(frame.xyz) == len(frame.gt) == len(frame.feat)
        assert info.image_names == list(street.CAMERA_NAMES)
        assert info.points_file == frame.points_file and info.points_file.startswith("synthetic://")
        assert frame.xyz.dtype == np.float32 and frame.feat.shape == (len(frame.xyz), 1)
        assert 20_000 < len(frame.xyz) < 34_688  # ~35k rays, minus sky, ego, dropout


def test_adapter_attributes_follow_kind(street_data, indoor_data):
    assert street_data.class_names == nuscenes16() and indoor_data.class_names == SCANNET20
    assert street_data.image_size == (224, 416) and indoor_data.image_size == (240, 320)
    assert street_data.point_features == ("intensity",) and indoor_data.point_features == ("r", "g", "b")
    assert (street_data.min_depth, street_data.occlusion_tolerance, street_data.voxel_size) == (1.0, None, 0.1)
    assert (indoor_data.min_depth, indoor_data.occlusion_tolerance, indoor_data.voxel_size) == (0.1, 0.1, 0.05)
    assert street_data.capabilities == ["point_gt", "image_gt"]
    frame = indoor_data.load(0)
    assert frame.feat.shape[1] == 3 and 0 <= frame.feat.min() and frame.feat.max() <= 1
    assert [im.rgb.shape for im in frame.images] == [(240, 320, 3)] * 4
    assert street_data.load(0).images[0].rgb.shape == (224, 416, 3)


def test_string_options_from_the_command_line():
    data = build_adapter("synthetic", root=None, split="val", kind="indoor", num_scenes="3", seed="7",
                         frames_per_room="5", native_resolution="false")
    config = data.config()
    assert config["kind"] == "indoor" and config["num_scenes"] == 3 and config["seed"] == 7
    assert config["frames_per_room"] == 5 and config["native_resolution"] is False and config["split"] == "val"
    assert len(data) == 3


@pytest.mark.parametrize("options, message", [
    (dict(kind="cave"), "kind"),
    (dict(num_scenes=0), "num_scenes=0 must be >= 1"),
    (dict(num_scenes="many"), "not an integer"),
    (dict(frames_per_room=0), "frames_per_room"),
    (dict(native_resolution="maybe"), "not a boolean"),
    (dict(colour="red"), "unknown synthetic dataset option(s) colour (known: cache_size, class_colours"),
    (dict(rare_boost=0), "rare_boost=0 must be >= 1"),
    (dict(kind="indoor", rare_boost=2), "rare_boost=2 applies to kind=street only"),
    (dict(kind="indoor", point_spacing="0"), "point_spacing=0.0 must be a positive number"),
    (dict(kind="indoor", point_spacing="fine"), "point_spacing='fine' is not a number"),
    (dict(point_spacing=0.05), "point_spacing=0.05 applies to kind=indoor only"),
    (dict(room_mix=2), "room_mix=2 applies to kind=indoor only"),
    (dict(kind="indoor", room_mix=0), "room_mix=0 must be >= 1"),
    (dict(kind="indoor", room_mix=6), "room_mix=6 exceeds the 5 room kinds"),
    (dict(class_colours=1.5), "class_colours=1.5 must lie in"),
    (dict(kind="indoor", class_colours="all"), "class_colours='all' is not a number"),
])
def test_bad_options_raise_dataset_error(options, message):
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SyntheticDataset(**options)


def test_load_out_of_range_raises(street_data):
    with pytest.raises(DatasetError, match="out of range"):
        street_data.load(2)


# -- pictures --------------------------------------------------------------------------------------------

def test_rendered_frame_and_label_map_survive_png(tmp_path, street_data):
    im = street_data.load(0).images[0]
    Image.fromarray(im.rgb).save(tmp_path / "rgb.png")
    Image.fromarray(colorize_labels(im.gt)).save(tmp_path / "labels.png")
    rgb = np.asarray(Image.open(tmp_path / "rgb.png"))
    labels = np.asarray(Image.open(tmp_path / "labels.png").convert("RGB"))
    assert rgb.shape == (224, 416, 3) and labels.shape == (224, 416, 3)
    assert rgb.std() > 20 and len(np.unique(rgb.reshape(-1, 3), axis=0)) > 1000  # textured, not flat
    np.testing.assert_array_equal(labels_from_colours(labels), im.gt)
    assert len(np.unique(im.gt)) >= 6


def test_colour_does_not_give_the_class_away(street_data):
    """Classes share colours: a nearest-class-mean colour classifier is far from perfect."""
    frame = street_data.load(0)
    rgb = np.concatenate([im.rgb.reshape(-1, 3) for im in frame.images]).astype(np.float64)
    gt = np.concatenate([im.gt.ravel() for im in frame.images])
    labelled = gt != 255
    rgb, gt = rgb[labelled], gt[labelled]
    classes = np.unique(gt)
    means = np.stack([rgb[gt == c].mean(axis=0) for c in classes])
    predicted = classes[np.argmin(((rgb[:, None, :] - means[None]) ** 2).sum(axis=2), axis=1)]
    assert (predicted == gt).mean() < 0.8
