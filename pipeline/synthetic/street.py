"""Street scenes with the nuScenes-16 classes: layout, objects, the moving ego and its sensor rig.

World frame ("global"): x along the street, y to its left, z up, metres; the ground is z = 0. A scene is a
straight street (road with optional median, parking lanes, sidewalks, verges, optional cross street) lined
with buildings, street lamps and trees, with parked and moving vehicles, pedestrians, cyclists, and
sometimes a road-works zone with cones, barriers and a construction vehicle.

The ego drives along its lane at constant speed. A sweep ``k`` of a scene is taken at t = 0.5 k seconds:
the LiDAR casts all its rays from the ego pose at that time (a motion-compensated sweep) and each camera
fires at its own offset from the LiDAR time, from the ego pose at that moment, seeing moving objects where
they are then, as on nuScenes.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..datasets.base import Frame, ImageRecord
from ..datasets.classes import nuscenes16
from .palettes import pick_colour
from .primitives import IGNORE_LABEL, WINDOWS, Primitives, SceneBuilder, yaw_rotation
from .raycast import GroundPlane, GroundRegion, PinholeCamera, SpinningLidar, cast
from .shading import shade

SWEEP_PERIOD_S = 0.5  # nuScenes key frames are 2 Hz
BASE_TIMESTAMP_US = 1_533_000_000_000_000
NATIVE_HW = (900, 1600)
TRAINING_HW = (224, 416)
CAMERA_RANGE_M = 150.0
LIDAR_RANGE_M = 70.0
#: HDL-32E: 32 beams from -30.67 to +10.67 degrees; ~1084 firings per revolution at 20 Hz
LIDAR_ELEVATIONS = np.radians(np.linspace(-30.67, 10.67, 32))
LIDAR_AZIMUTH_STEPS = 1084
LIDAR_RANGE_NOISE_M = 0.015
LIDAR_DROPOUT = 0.03

#: (name, yaw in degrees from ego x towards y, position in the ego frame [m], fx=fy, cx, cy at 1600x900,
#: time offset from the LiDAR in ms), rounded from a nuScenes calibration (pitch and roll taken as zero)
CAMERA_RIG = (
    ("CAM_FRONT", 0.3, (1.70, 0.02, 1.51), 1266.4, 816.3, 491.5, -35.5),
    ("CAM_FRONT_RIGHT", -56.4, (1.55, -0.49, 1.50), 1260.8, 808.0, 495.3, -27.6),
    ("CAM_FRONT_LEFT", 55.2, (1.52, 0.50, 1.51), 1272.6, 826.6, 479.8, -43.1),
    ("CAM_BACK", 179.9, (0.03, 0.00, 1.58), 809.2, 829.2, 481.8, -10.4),
    ("CAM_BACK_LEFT", 108.6, (1.04, 0.49, 1.59), 1256.7, 792.1, 492.8, -0.5),
    ("CAM_BACK_RIGHT", -110.8, (1.02, -0.48, 1.56), 1259.5, 807.3, 501.2, -20.1),
)
CAMERA_NAMES = tuple(c[0] for c in CAMERA_RIG)
#: LiDAR 0.94 m ahead of the rear axle at 1.84 m, its x axis pointing right and y forward (nuScenes)
LIDAR_TO_EGO = np.array([[0.0, 1.0, 0.0, 0.94], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.84], [0, 0, 0, 1.0]])
#: the ego body as the LiDAR sees it (its returns are removed): (centre, half size) boxes in the ego frame,
#: a hatchback's lower body and its narrower cabin below the roof-mounted LiDAR
EGO_BOXES = (((1.40, 0.0, 0.55), (2.05, 0.9, 0.4)), ((0.80, 0.0, 1.15), (0.9, 0.65, 0.3)))


@lru_cache(maxsize=None)
def _class_index() -> dict[str, int]:
    return {name: i for i, name in enumerate(nuscenes16())}


def camera_to_ego(yaw_deg: float, position) -> np.ndarray:
    """4x4 camera -> ego transform of a level camera (OpenCV axes) looking along ``yaw_deg``."""
    yaw = np.radians(yaw_deg)
    forward = np.array([np.cos(yaw), np.sin(yaw), 0.0])
    right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
    m = np.eye(4)
    m[:3, :3] = np.stack([right, [0.0, 0.0, -1.0], forward], axis=1)
    m[:3, 3] = position
    return m


def camera_intrinsics(fx: float, cx: float, cy: float, image_hw) -> np.ndarray:
    """K for an image of ``image_hw`` made by resizing the 1600x900 image (pixel centres at integers)."""
    sy, sx = image_hw[0] / NATIVE_HW[0], image_hw[1] / NATIVE_HW[1]
    return np.array([[fx * sx, 0.0, (cx + 0.5) * sx - 0.5], [0.0, fx * sy, (cy + 0.5) * sy - 0.5], [0, 0, 1.0]])


@dataclass
class StreetScene:
    """A generated street (shared by all sweeps of the scene).

    prims: the solids (the ego body is the last primitive); ground: the road surface regions;
    instance_labels uint8 [I] / instance_velocity float32 [I,3]: class and world velocity of every instance
    id (0 = nothing); ego_start (x, y) and ego_velocity (vx, vy) in m/s, ego_yaw in radians;
    sun: unit vector towards the light."""

    prims: Primitives
    ground: GroundPlane
    instance_labels: np.ndarray
    instance_velocity: np.ndarray
    ego_instance: int
    ego_start: np.ndarray
    ego_velocity: np.ndarray
    ego_yaw: float
    sun: np.ndarray

    def ego_to_global(self, time: float) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = yaw_rotation(self.ego_yaw)
        m[:2, 3] = self.ego_start + self.ego_velocity * time
        return m


# -- object builders: each adds one instance at ground position (x, y) heading ``yaw`` --------------------

class _Objects:
    """Object builders writing into one :class:`SceneBuilder` with one random stream."""

    def __init__(self, builder: SceneBuilder, rng: np.random.Generator):
        self.b, self.rng, self.c = builder, rng, _class_index()

    def _placer(self, x, y, yaw):
        cos, sin = np.cos(yaw), np.sin(yaw)
        return lambda dx, dy, z: (x + dx * cos - dy * sin, y + dx * sin + dy * cos, z)

    def _wheels(self, inst, at, yaw, xs, half_width, radius):
        for dx in xs:
            for dy in (-half_width, half_width):
                self.b.cylinder(inst, at(dx, dy, radius), radius, 0.11, pick_colour(self.rng, ("black",)), 0.1,
                                yaw=yaw, axle=True)

    def car(self, x, y, yaw, velocity=(0, 0, 0)):
        r, b = self.rng, self.b
        length, width, height = r.uniform(3.9, 5.0), r.uniform(1.7, 2.0), r.uniform(1.4, 1.75)
        inst = b.new_instance(self.c["car"], velocity)
        paint = pick_colour(r, ("white", "black", "light_grey", "grey", "dark_grey", "red", "blue", "dark_red",
                                "green", "beige", "navy"))
        at, wheel = self._placer(x, y, yaw), r.uniform(0.30, 0.36)
        body_z, body_h = 0.6 * wheel, 0.5 * height
        b.box(inst, at(0, 0, body_z + body_h / 2), (length / 2, width / 2, body_h / 2), paint, 0.35, yaw)
        cabin_h = height - body_z - body_h
        glass = 0.45 * paint + 0.55 * np.array([0.12, 0.14, 0.17])
        b.box(inst, at(-0.05 * length, 0, height - cabin_h / 2), (0.28 * length, 0.45 * width, cabin_h / 2),
              glass, 0.2, yaw)
        self._wheels(inst, at, yaw, (length / 2 - 0.8, -length / 2 + 0.8), width / 2 - 0.12, wheel)

    def truck(self, x, y, yaw, velocity=(0, 0, 0), with_trailer=False):
        r, b = self.rng, self.b
        inst = b.new_instance(self.c["truck"], velocity)
        at = self._placer(x, y, yaw)
        cab_colour = pick_colour(r, ("white", "red", "blue", "grey", "orange", "dark_grey"))
        width, cab_len, cab_h = 2.45, r.uniform(2.0, 2.6), r.uniform(2.8, 3.3)
        b.box(inst, at(0, 0, 0.5 + cab_h / 2), (cab_len / 2, width / 2, cab_h / 2), cab_colour, 0.35, yaw)
        if with_trailer:
            b.box(inst, at(-cab_len / 2 - 1.5, 0, 0.8), (1.5, 0.9, 0.3), pick_colour(r, ("dark_grey",)), 0.2, yaw)
            self._wheels(inst, at, yaw, (0.0, -cab_len / 2 - 2.2), width / 2 - 0.15, 0.5)
            self.trailer(*at(-cab_len / 2 - 0.8 - 4.5, 0, 0)[:2], yaw, velocity, length=9.0)
            return
        cargo_len, cargo_h = r.uniform(4.5, 7.5), r.uniform(3.0, 3.8)
        b.box(inst, at(-cab_len / 2 - cargo_len / 2 - 0.2, 0, 0.7 + cargo_h / 2),
              (cargo_len / 2, width / 2 + 0.03, cargo_h / 2),
              pick_colour(r, ("white", "light_grey", "grey", "blue", "red", "beige")), 0.4, yaw)
        self._wheels(inst, at, yaw, (0.0, -cab_len / 2 - cargo_len + 1.0, -cab_len / 2 - cargo_len + 2.3),
                     width / 2 - 0.15, 0.5)

    def trailer(self, x, y, yaw, velocity=(0, 0, 0), length=None):
        r, b = self.rng, self.b
        inst = b.new_instance(self.c["trailer"], velocity)
        at = self._placer(x, y, yaw)
        length = length or r.uniform(6.0, 11.0)
        height = r.uniform(2.6, 3.0)
        b.box(inst, at(0, 0, 1.15 + height / 2), (length / 2, 1.27, height / 2),
              pick_colour(r, ("white", "light_grey", "grey", "blue", "dark_red")), 0.4, yaw)
        b.box(inst, at(length / 2 - 1.5, 0, 0.55), (0.1, 0.9, 0.55), pick_colour(r, ("dark_grey",)), 0.2, yaw)
        self._wheels(inst, at, yaw, (-length / 2 + 1.2, -length / 2 + 2.4), 1.1, 0.5)

    def bus(self, x, y, yaw, velocity=(0, 0, 0)):
        r, b = self.rng, self.b
        inst = b.new_instance(self.c["bus"], velocity)
        at = self._placer(x, y, yaw)
        length, width, height = r.uniform(10.0, 12.5), 2.55, r.uniform(3.0, 3.4)
        paint = pick_colour(r, ("white", "yellow", "red", "blue", "green", "orange"))
        b.box(inst, at(0, 0, 0.35 + height / 2), (length / 2, width / 2, height / 2), paint, 0.35, yaw)
        b.box(inst, at(0.1, 0, 0.35 + 0.62 * height), (length / 2 - 0.3, width / 2 + 0.02, 0.2 * height),
              pick_colour(r, ("dark_grey", "black")), 0.2, yaw)
        self._wheels(inst, at, yaw, (length / 2 - 2.5, -length / 2 + 3.0), width / 2 - 0.15, 0.5)

    def construction_vehicle(self, x, y, yaw):
        r, b = self.rng, self.b
        inst = b.new_instance(self.c["construction_vehicle"])
        at = self._placer(x, y, yaw)
        paint = pick_colour(r, ("yellow", "orange", "yellow", "white"))
        dark = pick_colour(r, ("dark_grey", "black"))
        for side in (-1.1, 1.1):
            b.box(inst, at(0, side, 0.4), (1.8, 0.35, 0.4), dark, 0.2, yaw)
        b.box(inst, at(-0.3, 0, 1.35), (1.6, 1.3, 0.55), paint, 0.45, yaw)
        b.box(inst, at(0.5, 0.5, 2.6), (0.6, 0.55, 0.75), 0.5 * paint + 0.1, 0.3, yaw)
        reach = r.uniform(2.0, 3.5)
        b.box(inst, at(1.3 + reach / 2, -0.3, 2.4), (reach / 2, 0.2, 0.2), paint, 0.45, yaw)
        b.box(inst, at(1.3 + reach, -0.3, 1.4), (0.2, 0.2, 1.0), paint, 0.45, yaw)
        b.box(inst, at(1.5 + reach, -0.3, 0.35), (0.45, 0.6, 0.35), dark, 0.3, yaw)

    def motorcycle(self, x, y, yaw, velocity=(0, 0, 0), rider=False):
        r, b = self.rng, self.b
        inst = b.new_instance(self.c["motorcycle"], velocity)
        at = self._placer(x, y, yaw)
        paint = pick_colour(r, ("black", "red", "blue", "light_grey", "orange", "dark_grey"))
        for dx in (-0.7, 0.7):
            b.cylinder(inst, at(dx, 0, 0.31), 0.31, 0.06, pick_colour(r, ("black",)), 0.1, yaw=yaw, axle=True)
        b.box(inst, at(0, 0, 0.7), (0.6, 0.18, 0.22), paint, 0.35, yaw)
        b.box(inst, at(0.55, 0, 1.0), (0.06, 0.35, 0.05), pick_colour(r, ("dark_grey",)), 0.2, yaw)
        if rider:  # riders belong to their vehicle, as in nuScenes
            self._person_parts(inst, at, yaw, seated=True)

    def bicycle(self, x, y, yaw, velocity=(0, 0, 0), rider=False):
        r, b = self.rng, self.b
        inst = b.new_instance(self.c["bicycle"], velocity)
        at = self._placer(x, y, yaw)
        paint = pick_colour(r, ("black", "red", "blue", "light_grey", "green", "white"))
        for dx in (-0.52, 0.52):
            b.cylinder(inst, at(dx, 0, 0.34), 0.34, 0.025, pick_colour(r, ("black",)), 0.1, yaw=yaw, axle=True)
        b.box(inst, at(0, 0, 0.6), (0.45, 0.03, 0.2), paint, 0.3, yaw)
        b.box(inst, at(0.45, 0, 1.0), (0.04, 0.3, 0.03), paint, 0.3, yaw)
        b.box(inst, at(-0.2, 0, 0.92), (0.12, 0.07, 0.03), pick_colour(r, ("black",)), 0.2, yaw)
        if rider:
            self._person_parts(inst, at, yaw, seated=True)

    def _person_parts(self, inst, at, yaw, seated=False):
        r, b = self.rng, self.b
        height = r.uniform(1.5, 1.9)
        clothes = ("black", "dark_grey", "navy", "blue", "red", "beige", "white", "green", "brown", "grey")
        base = 0.55 if seated else 0.0
        legs = 0.0 if seated else 0.47 * height
        if legs:
            b.box(inst, at(0, 0, legs / 2), (0.12, 0.17, legs / 2), pick_colour(r, clothes), 0.1, yaw)
        torso = 0.35 * height
        b.box(inst, at(0, 0, base + legs + torso / 2), (0.13, 0.22, torso / 2), pick_colour(r, clothes), 0.12, yaw)
        b.ellipsoid(inst, at(0, 0, base + legs + torso + 0.11), (0.1, 0.09, 0.12),
                    pick_colour(r, ("beige", "brown", "wood", "black")), 0.1, yaw)

    def pedestrian(self, x, y, yaw, velocity=(0, 0, 0)):
        inst = self.b.new_instance(self.c["pedestrian"], velocity)
        self._person_parts(inst, self._placer(x, y, yaw), yaw)

    def cone(self, x, y):
        inst = self.b.new_instance(self.c["traffic_cone"])
        colour = pick_colour(self.rng, ("orange", "orange", "red", "yellow"))
        self.b.box(inst, (x, y, 0.02), (0.2, 0.2, 0.02), colour, 0.6)
        # half an ellipsoid above the ground reads as a cone
        self.b.ellipsoid(inst, (x, y, 0.0), (0.15, 0.15, self.rng.uniform(0.5, 0.75)), colour, 0.8)

    def barrier(self, x, y, yaw):
        r, b = self.rng, self.b
        inst = b.new_instance(self.c["barrier"])
        at = self._placer(x, y, yaw)
        if r.random() < 0.6:  # concrete or plastic jersey barrier
            colour = pick_colour(r, ("light_grey", "white", "orange", "red", "grey"))
            b.box(inst, at(0, 0, 0.2), (0.98, 0.3, 0.2), colour, 0.5, yaw)
            b.box(inst, at(0, 0, 0.62), (0.98, 0.14, 0.22), colour, 0.5, yaw)
        else:  # panel on legs
            colour = pick_colour(r, ("orange", "white", "red", "yellow"))
            for dx in (-0.55, 0.55):
                b.box(inst, at(dx, 0, 0.03), (0.05, 0.3, 0.03), pick_colour(r, ("dark_grey",)), 0.2, yaw)
                b.box(inst, at(dx, 0, 0.5), (0.03, 0.03, 0.5), colour, 0.4, yaw)
            b.box(inst, at(0, 0, 0.8), (0.6, 0.04, 0.2), colour, 0.8, yaw)

    def tree(self, x, y, size=1.0):
        r, b = self.rng, self.b
        inst = b.new_instance(self.c["vegetation"])
        trunk_h, trunk_r = r.uniform(1.8, 3.5) * size, r.uniform(0.12, 0.25) * size
        b.cylinder(inst, (x, y, trunk_h / 2), trunk_r, trunk_h / 2, pick_colour(r, ("brown", "dark_grey", "grey")),
                   0.25)
        crown = r.uniform(1.4, 3.0) * size
        leaves = ("green", "dark_green", "olive")
        b.ellipsoid(inst, (x, y, trunk_h + 0.7 * crown), (crown, crown * r.uniform(0.85, 1.15), crown * r.uniform(0.8, 1.3)),
                    pick_colour(r, leaves), 0.3)
        if r.random() < 0.3:
            d = r.uniform(-1, 1, 2) * crown * 0.6
            b.ellipsoid(inst, (x + d[0], y + d[1], trunk_h + 1.1 * crown), (0.7 * crown,) * 3, pick_colour(r, leaves), 0.3)

    def bush(self, x, y, length=None, yaw=0.0):
        r, b = self.rng, self.b
        inst = b.new_instance(self.c["vegetation"])
        colour = pick_colour(r, ("green", "dark_green", "olive"))
        if length:  # a hedge
            height = r.uniform(0.8, 1.8)
            b.box(inst, (x, y, height / 2), (length / 2, r.uniform(0.4, 0.8), height / 2), colour, 0.3, yaw)
        else:
            size = r.uniform(0.5, 1.2)
            b.ellipsoid(inst, (x, y, 0.3 * size), (size, size * r.uniform(0.7, 1.3), 0.8 * size), colour, 0.3)

    def building(self, x, y_front, side, length, depth):
        r, b = self.rng, self.b
        inst = b.new_instance(self.c["manmade"])
        tier = r.random()
        height = r.uniform(4, 9) if tier < 0.45 else r.uniform(9, 18) if tier < 0.85 else r.uniform(18, 35)
        wall = pick_colour(r, ("white", "light_grey", "grey", "beige", "brick", "brown", "cream", "dark_grey", "red"))
        y = y_front + side * depth / 2
        b.box(inst, (x, y, height / 2), (length / 2, depth / 2, height / 2), wall, 0.3, pattern=WINDOWS)
        if r.random() < 0.3:  # shop awning over the sidewalk
            b.box(inst, (x, y_front + side * 0.6, 3.0), (length / 2 * 0.8, 0.6, 0.12),
                  pick_colour(r, ("red", "green", "blue", "dark_grey", "beige")), 0.3)
        if r.random() < 0.3 and height > 6:  # roof structure
            b.box(inst, (x + r.uniform(-1, 1) * length / 4, y, height + 1.2), (length / 5, depth / 5, 1.2),
                  pick_colour(r, ("grey", "light_grey")), 0.3)

    def fence(self, x, y, length, side_yaw=0.0):
        r = self.rng
        inst = self.b.new_instance(self.c["manmade"])
        height = r.uniform(1.0, 2.2)
        self.b.box(inst, (x, y, height / 2), (length / 2, 0.1, height / 2),
                   pick_colour(r, ("grey", "brick", "light_grey", "wood", "dark_grey")), 0.3, side_yaw)

    def street_lamp(self, x, y, side, sign=False):
        r, b = self.rng, self.b
        inst = b.new_instance(self.c["manmade"])
        metal = pick_colour(r, ("grey", "dark_grey", "light_grey"))
        height = r.uniform(6.0, 8.0)
        b.cylinder(inst, (x, y, height / 2), 0.1, height / 2, metal, 0.4)
        b.box(inst, (x, y - side * 0.8, height - 0.1), (0.08, 0.8, 0.06), metal, 0.4)
        b.box(inst, (x, y - side * 1.5, height - 0.25), (0.25, 0.2, 0.1), pick_colour(r, ("white",)), 0.5)
        if sign:
            b.box(inst, (x, y - side * 0.08, 2.6), (0.35, 0.03, 0.35), pick_colour(r, ("blue", "red", "white", "yellow")),
                  0.9)

    def traffic_light(self, x, y):
        inst = self.b.new_instance(self.c["manmade"])
        metal = pick_colour(self.rng, ("dark_grey", "grey"))
        self.b.cylinder(inst, (x, y, 1.8), 0.09, 1.8, metal, 0.4)
        self.b.box(inst, (x, y, 4.0), (0.18, 0.18, 0.45), pick_colour(self.rng, ("black", "yellow")), 0.4)


def build_street_scene(rng: np.random.Generator, rare_boost: int = 1) -> StreetScene:
    """Lay out one street scene from ``rng``.

    ``rare_boost`` k >= 1 (1: the default streets, unchanged draw for draw) makes the rare classes k times as
    frequent: the odds of every vehicle kind but the car times k, k times the pedestrians and stray cones, and
    road works, barrier rows and bicycle racks with probability 1 - (1 - p)^k. For benchmarks whose networks
    must learn every class in a small budget (bench/bench_cns.py); nuScenes' own long tail is the default's.
    """
    c = _class_index()

    def chance(p: float) -> float:
        return p if rare_boost == 1 else 1.0 - (1.0 - p) ** rare_boost

    def kinds(p: list[float]) -> np.ndarray:  # the first kind is the car
        if rare_boost == 1:
            return np.array(p)
        w = np.array(p) * np.array([1.0] + [float(rare_boost)] * (len(p) - 1))
        return w / w.sum()

    b = SceneBuilder()
    obj = _Objects(b, rng)
    half_len = 160.0
    road_half = rng.uniform(6.0, 9.5)
    median = rng.uniform(0.8, 1.5) if road_half > 7.5 and rng.random() < 0.5 else 0.0
    parking, lane = 2.3, 3.3
    sidewalk = {s: rng.uniform(2.0, 4.5) for s in (1, -1)}
    verge = {s: rng.uniform(0.0, 8.0) for s in (1, -1)}
    cross = (rng.uniform(-40, 70), rng.uniform(4.5, 7.0)) if rng.random() < 0.5 else None

    def in_cross(x0, x1, margin=0.0):
        return cross is not None and x1 > cross[0] - cross[1] - margin and x0 < cross[0] + cross[1] + margin

    # -- ground, painted bottom-up --------------------------------------------------------------------------
    ground = GroundPlane()

    def region(x, y, label, colours, reflectivity, marking_y=()):
        ground.regions.append(GroundRegion(x, y, c[label], b.new_instance(c[label]), tuple(pick_colour(rng, colours)),
                                           reflectivity, marking_y))

    everywhere = (-np.inf, np.inf)
    region(everywhere, everywhere, "terrain", ("green", "olive", "brown"), 0.12)
    for s in (1, -1):
        outer = road_half + sidewalk[s] + verge[s]
        for _ in range(rng.integers(0, 4)):  # parking lots, driveways, paved yards
            x0 = rng.uniform(-half_len, half_len)
            region((x0, x0 + rng.uniform(5, 25)), tuple(sorted((s * (outer - verge[s]), s * (outer + 12)))),
                   "other_flat", ("grey", "dark_grey", "light_grey", "brick"), 0.15)
        region(everywhere, tuple(sorted((s * road_half, s * (road_half + sidewalk[s])))), "sidewalk",
               ("light_grey", "grey", "beige", "brick"), 0.18)
    if cross is not None:
        xc, hc = cross
        for x in ((xc - hc - 3.0, xc - hc), (xc + hc, xc + hc + 3.0)):
            region(x, everywhere, "sidewalk", ("light_grey", "grey", "beige"), 0.18)
    markings = (0.0,) if median == 0 else ()
    region(everywhere, (-road_half, road_half), "driveable_surface", ("dark_grey", "grey", "dark_grey"), 0.08,
           markings + (road_half - parking, -road_half + parking))
    if median:
        region(everywhere, (-median, median), "other_flat", ("grey", "light_grey", "olive"), 0.15)
    if cross is not None:
        region((cross[0] - cross[1], cross[0] + cross[1]), everywhere, "driveable_surface", ("dark_grey", "grey"),
               0.08)

    # -- ego ----------------------------------------------------------------------------------------------
    lanes = max(1, int((road_half - parking - median) // lane))
    lane_y = lambda k: median + lane * (k + 0.5)  # noqa: E731  (distance of lane k's centre from the axis)
    ego_lane = int(rng.integers(lanes))
    ego_speed = 0.0 if rng.random() < 0.2 else rng.uniform(3.0, 13.0)
    ego_yaw = rng.uniform(-0.015, 0.015)
    ego_start = np.array([rng.uniform(-20.0, 0.0), -lane_y(ego_lane)])
    ego_velocity = ego_speed * np.array([np.cos(ego_yaw), np.sin(ego_yaw)])
    ego_x = ego_start[0]

    # -- roadside: buildings, fences, lamps, trees ------------------------------------------------------------
    for s in (1, -1):
        front = road_half + sidewalk[s] + verge[s]
        x = -half_len
        while x < half_len:
            length = rng.uniform(8, 30)
            if in_cross(x, x + length, 3.0):
                x = cross[0] + cross[1] + 3.0
                continue
            if rng.random() < 0.18:  # an open lot with a fence, bushes and trees
                gap = rng.uniform(8, 20)
                if rng.random() < 0.5:
                    obj.fence(x + gap / 2, s * (front + 0.3), gap)
                for _ in range(rng.integers(1, 4)):
                    obj.tree(x + rng.uniform(0, gap), s * (front + rng.uniform(2, 8)))
                x += gap
                continue
            obj.building(x + length / 2, s * (front + rng.uniform(0, 1.5)), s, length, rng.uniform(8, 16))
            x += length + rng.uniform(0, 3)
        x = -half_len + rng.uniform(0, 25)
        while x < half_len:
            if not in_cross(x, x, 2.0):
                obj.street_lamp(x, s * (road_half + 0.5), s, sign=rng.random() < 0.25)
            x += rng.uniform(20, 35)
        if rng.random() < 0.75:
            tree_y = road_half + (sidewalk[s] * 0.65 if sidewalk[s] > 2.6 or verge[s] < 1.5 else sidewalk[s] + verge[s] / 2)
            x = -half_len + rng.uniform(0, 10)
            while x < half_len:
                if not in_cross(x, x, 3.0):
                    obj.tree(x, s * tree_y)
                x += rng.uniform(7, 14)
        if verge[s] > 1.2:
            x = -half_len
            while x < half_len:
                vy = s * (road_half + sidewalk[s] + rng.uniform(0.5, verge[s]))
                if not in_cross(x, x + 6, 1.0):
                    if rng.random() < 0.4:
                        length = rng.uniform(3, 10)
                        obj.bush(x + length / 2, vy, length=length)
                    else:
                        obj.bush(x, vy)
                x += rng.uniform(4, 15)
    if median and rng.random() < 0.5:
        x = -half_len + rng.uniform(0, 10)
        while x < half_len:
            if not in_cross(x, x, 2.0):
                obj.tree(x, 0.0, size=0.7)
            x += rng.uniform(8, 15)
    if cross is not None:
        for dx in (-1, 1):
            for s in (1, -1):
                obj.traffic_light(cross[0] + dx * (cross[1] + 0.6), s * (road_half + 0.6))

    # -- road works ---------------------------------------------------------------------------------------
    works = None
    if rng.random() < chance(0.45):
        s = 1 if rng.random() < 0.5 else -1
        x0 = ego_x + rng.choice([-1, 1]) * rng.uniform(8, 45)
        works = (s, x0, x0 + rng.uniform(8, 20))
        edge = s * (road_half - parking - 0.2)
        x = works[1]
        while x < works[2]:
            obj.cone(x, edge + rng.normal(0, 0.05))
            x += rng.uniform(1.2, 3.0)
        for _ in range(rng.integers(2, 6)):
            obj.barrier(rng.uniform(works[1], works[2]), s * (road_half - rng.uniform(0.3, 1.5)),
                        rng.uniform(-0.3, 0.3) + rng.choice([0.0, np.pi / 2]))
        if rng.random() < 0.7:
            obj.construction_vehicle((works[1] + works[2]) / 2, s * (road_half + sidewalk[s] * 0.2), rng.uniform(-0.4, 0.4))
    for _ in range(rng.poisson(1.0 * rare_boost)):  # stray cones
        s = rng.choice([-1, 1])
        obj.cone(ego_x + rng.uniform(-40, 60), s * (road_half + rng.uniform(0.2, 0.8)))
    if rng.random() < chance(0.35):  # a row of jersey barriers along the median or a sidewalk
        y = 0.0 if median else rng.choice([-1, 1]) * (road_half + 0.4)
        x = ego_x + rng.uniform(-40, 30)
        for _ in range(rng.integers(4, 14)):
            if not in_cross(x - 1, x + 1, 1.0):
                obj.barrier(x, y, 0.0)
            x += 2.05

    # -- parked vehicles ----------------------------------------------------------------------------------
    for s in (1, -1):
        y = s * (road_half - parking / 2)
        x = -half_len + rng.uniform(0, 5)
        while x < half_len:
            if rng.random() < 0.4:
                x += rng.uniform(5, 25)
                continue
            kind = rng.choice(["car", "truck", "trailer", "bus", "motorcycle", "construction", "bicycle"],
                              p=kinds([0.8, 0.06, 0.04, 0.02, 0.04, 0.015, 0.025]))
            size = {"car": 5.0, "truck": 8.5, "trailer": 11.0, "bus": 12.5, "motorcycle": 2.0, "construction": 6.5,
                    "bicycle": 1.8}[kind]
            blocked = in_cross(x, x + size, 2.0) or (works is not None and works[0] == s and
                                                     x + size > works[1] - 2 and x < works[2] + 2)
            if not blocked:
                yaw = 0.0 if rng.random() < 0.7 else np.pi
                cx, cy = x + size / 2, y + rng.normal(0, 0.1)
                {"car": lambda: obj.car(cx, cy, yaw), "truck": lambda: obj.truck(cx + 2.0, cy, yaw),
                 "trailer": lambda: obj.trailer(cx, cy, yaw), "bus": lambda: obj.bus(cx, cy, yaw),
                 "motorcycle": lambda: obj.motorcycle(cx, cy, yaw + rng.uniform(-0.3, 0.3)),
                 "construction": lambda: obj.construction_vehicle(cx, cy, yaw),
                 "bicycle": lambda: obj.bicycle(cx, cy, yaw)}[kind]()
            x += size + rng.uniform(0.6, 3.0)

    # -- moving traffic: every lane flows at one speed, so vehicles never run into each other --------------
    for s in (1, -1):  # s = -1: the ego's side, driving towards +x
        for k in range(lanes):
            speed = ego_speed if (s == -1 and k == ego_lane) else rng.choice([0.0, rng.uniform(4, 14)], p=[0.2, 0.8])
            direction = -s
            y = s * lane_y(k)
            velocity = (direction * speed, 0.0, 0.0)
            yaw = 0.0 if direction > 0 else np.pi
            x = -half_len + rng.uniform(0, 30)
            while x < half_len:
                kind = rng.choice(["car", "truck", "bus", "motorcycle", "trailer", "bicycle"],
                                  p=kinds([0.74, 0.09, 0.08, 0.04, 0.03, 0.02]))
                size = {"car": 5.0, "truck": 8.5, "bus": 12.5, "motorcycle": 2.0, "trailer": 14.5, "bicycle": 1.8}[kind]
                near_ego = s == -1 and k == ego_lane and x + size > ego_x - 10 and x < ego_x + 16
                if not near_ego:
                    cx = x + size / 2
                    {"car": lambda: obj.car(cx, y, yaw, velocity), "truck": lambda: obj.truck(cx, y, yaw, velocity),
                     "bus": lambda: obj.bus(cx, y, yaw, velocity),
                     "motorcycle": lambda: obj.motorcycle(cx, y, yaw, velocity, rider=True),
                     "trailer": lambda: obj.truck(cx + 5.0, y, yaw, velocity, with_trailer=True),
                     "bicycle": lambda: obj.bicycle(cx, y, yaw, (direction * min(speed, 5.0), 0.0, 0.0),
                                                    rider=True)}[kind]()
                x += size + rng.uniform(6, 40)

    # -- people and bicycles ------------------------------------------------------------------------------
    for _ in range(rng.poisson(14 * rare_boost)):
        s = rng.choice([-1, 1])
        x = ego_x + rng.uniform(-50, 70)
        y = s * (road_half + rng.uniform(0.4, sidewalk[s] - 0.3))
        walking = rng.random() < 0.6
        heading = rng.choice([0.0, np.pi]) if walking else rng.uniform(-np.pi, np.pi)
        velocity = (np.cos(heading) * rng.uniform(0.8, 1.6), 0.0, 0.0) if walking else (0, 0, 0)
        for _ in range(1 if rng.random() < 0.8 else rng.integers(2, 4)):  # sometimes a group
            obj.pedestrian(x, y, heading, velocity)
            x += rng.uniform(0.6, 1.0)
    if cross is not None:
        for _ in range(rng.integers(0, 5)):
            x = cross[0] + rng.uniform(-cross[1], cross[1])
            if abs(x - ego_x) < 8 or abs(x - (ego_x + 1.5 * ego_speed)) < 8:
                continue  # never walk through the ego
            direction = rng.choice([-1, 1])
            obj.pedestrian(x, rng.uniform(-road_half, road_half), direction * np.pi / 2,
                           (0.0, direction * rng.uniform(0.8, 1.5), 0.0))
    if rng.random() < chance(0.5):  # a bicycle rack on a sidewalk
        s = rng.choice([-1, 1])
        x = ego_x + rng.uniform(-30, 50)
        for i in range(rng.integers(1, 6)):
            obj.bicycle(x + 0.7 * i, s * (road_half + sidewalk[s] - 0.9), np.pi / 2 + rng.normal(0, 0.1))

    # -- the ego body (seen only by the LiDAR; its returns are removed) ------------------------------------
    ego_instance = b.new_instance(IGNORE_LABEL, (ego_velocity[0], ego_velocity[1], 0.0))
    for center, half_size in EGO_BOXES:
        b.box(ego_instance, yaw_rotation(ego_yaw) @ center + (*ego_start, 0.0), half_size, (0.5, 0.5, 0.5), 0.3,
              ego_yaw)

    elevation, azimuth = rng.uniform(0.35, 1.1), rng.uniform(-np.pi, np.pi)
    sun = np.array([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation)])
    return StreetScene(b.build(), ground, np.array(b.instance_labels, np.uint8),
                       np.array(b.instance_velocity, np.float32), ego_instance, ego_start, ego_velocity, ego_yaw, sun)


@dataclass
class LidarSweep:
    """One motion-compensated LiDAR sweep: xyz float32 [N,3] in the LiDAR frame, intensity float32 [N]
    (0..255), label uint8 [N], instance int32 [N]; lidar_to_global 4x4 at the sweep time."""

    xyz: np.ndarray
    intensity: np.ndarray
    label: np.ndarray
    instance: np.ndarray
    lidar_to_global: np.ndarray


def lidar_sweep(scene: StreetScene, time: float, rng: np.random.Generator) -> LidarSweep:
    """Cast the 32-beam LiDAR from the ego pose at ``time`` seconds.

    Returns on the ego body, grazing returns and a random 3% are dropped; ranges get Gaussian noise and
    intensity falls off with the incidence angle, both drawn from ``rng``."""
    lidar_to_global = scene.ego_to_global(time) @ LIDAR_TO_EGO
    lidar = SpinningLidar(LIDAR_ELEVATIONS, LIDAR_AZIMUTH_STEPS, lidar_to_global)
    hits = cast(scene.prims, scene.ground, lidar, time, LIDAR_RANGE_M)
    incidence = np.abs((hits.normal * hits.directions).sum(axis=1))
    dropped = rng.random(len(incidence)) < LIDAR_DROPOUT
    keep = hits.hit & (hits.instance != scene.ego_instance) & ~dropped & (incidence > 0.05)
    distance = hits.distance[keep] + rng.normal(0.0, LIDAR_RANGE_NOISE_M, int(keep.sum()))
    xyz = (lidar.sensor_directions()[keep] * distance[:, None]).astype(np.float32)
    intensity = 255.0 * hits.reflectivity[keep] * (0.3 + 0.7 * incidence[keep]) * rng.lognormal(0, 0.15, len(xyz))
    return LidarSweep(xyz, np.clip(intensity, 0, 255).astype(np.float32), hits.label[keep], hits.instance[keep],
                      lidar_to_global)


def render_street_sweep(scene: StreetScene, sweep: int, rng: np.random.Generator, image_hw=TRAINING_HW,
                        token: str = "", points_file: str = "") -> Frame:
    """One LiDAR sweep with its six camera images.

    ``sweep`` picks the time (0.5 s apart), ``rng`` draws the sensor noise, ``image_hw`` is the rendered
    image size (training 224x416 or native 900x1600). Returns a :class:`~pipeline.datasets.base.Frame` whose
    points are in the LiDAR frame; ``extra`` holds ``point_instance`` (int32 [N]), ``instance_labels`` and
    ``instance_velocity`` (per instance id), per image ``image_instance`` (int32 HxW) and ``image_depth``
    (float32 HxW camera z in metres, 0 = sky), ``lidar_timestamp_us``, ``camera_timestamp_us``,
    ``ego_to_global_lidar`` and ``ego_to_global_camera`` (4x4 each)."""
    t_lidar = sweep * SWEEP_PERIOD_S
    ego_lidar = scene.ego_to_global(t_lidar)
    points = lidar_sweep(scene, t_lidar, rng)

    scene_prims = scene.prims.subset(scene.prims.instance != scene.ego_instance)
    images, instances, depths, stamps, ego_cams = [], [], [], [], []
    for name, yaw, position, f, cx, cy, offset_ms in CAMERA_RIG:
        t_cam = t_lidar + offset_ms * 1e-3
        ego_cam = scene.ego_to_global(t_cam)
        cam_to_ego = camera_to_ego(yaw, position)
        intrinsics = camera_intrinsics(f, cx, cy, image_hw)
        camera = PinholeCamera(intrinsics, image_hw[0], image_hw[1], ego_cam @ cam_to_ego)
        cam_hits = cast(scene_prims, scene.ground, camera, t_cam, CAMERA_RANGE_M)
        h, w = image_hw
        rgb = shade(cam_hits, scene.sun, 0.45, True, rng).reshape(h, w, 3)
        depth = np.where(cam_hits.hit, cam_hits.distance * (cam_hits.directions @ camera.forward()), 0.0)
        # lidar -> ego(t_lidar) -> global -> ego(t_cam) -> camera
        points_to_camera = np.linalg.inv(cam_to_ego) @ np.linalg.inv(ego_cam) @ ego_lidar @ LIDAR_TO_EGO
        images.append(ImageRecord(name=name, file=f"{points_file}/{name}", rgb=rgb, intrinsics=intrinsics,
                                  points_to_camera=points_to_camera, gt=cam_hits.label.reshape(h, w)))
        instances.append(cam_hits.instance.reshape(h, w))
        depths.append(depth.reshape(h, w).astype(np.float32))
        stamps.append(BASE_TIMESTAMP_US + int(round(t_cam * 1e6)))
        ego_cams.append(ego_cam)
    extra = {
        "point_instance": points.instance,
        "instance_labels": scene.instance_labels,
        "instance_velocity": scene.instance_velocity,
        "image_instance": instances,
        "image_depth": depths,
        "lidar_timestamp_us": BASE_TIMESTAMP_US + int(round(t_lidar * 1e6)),
        "camera_timestamp_us": stamps,
        "ego_to_global_lidar": ego_lidar,
        "ego_to_global_camera": ego_cams,
    }
    return Frame(token=token, points_file=points_file, xyz=points.xyz, feat=points.intensity[:, None], images=images,
                 gt=points.label, extra=extra)
