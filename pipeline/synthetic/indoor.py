"""Indoor rooms with the ScanNet-20 classes, an RGB-D trajectory through them and the fused point cloud.

World frame: the room's floor corner at the origin, x along its width, y along its depth, z up, metres.
A room is a box of walls, floor and ceiling (the ceiling is unlabelled, as in ScanNet-20) with a door,
windows, curtains and pictures on the walls, and furniture chosen by the room's type (bedroom, living room,
office, kitchen, bathroom), mostly against the walls, some free-standing. A handheld RGB-D camera walks an
ellipse around the room centre looking across the room; the point cloud is the union of the back-projected
depth frames, thinned to one point per 3 cm voxel, as ScanNet's reconstructions are fused from its frames.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..datasets.base import Frame, ImageRecord
from ..datasets.classes import SCANNET20
from .palettes import pick_colour
from .primitives import IGNORE_LABEL, Primitives, SceneBuilder
from .raycast import PinholeCamera, cast
from .shading import shade

#: ScanNet's colour camera (1296x968) and depth camera (640x480), typical calibration
COLOUR_NATIVE_HW, COLOUR_K = (968, 1296), (1169.6, 1167.1, 646.3, 489.9)
DEPTH_NATIVE_HW, DEPTH_K = (480, 640), (577.9, 577.9, 319.5, 239.5)
TRAINING_HW = (240, 320)
MAX_DEPTH_M = 8.0
DEPTH_HOLE_RATE = 0.015
FUSION_VOXEL_M = 0.03
ROOM_TYPES = ("bedroom", "living_room", "office", "kitchen", "bathroom")
LIGHT = np.array([0.35, 0.25, 0.9]) / np.linalg.norm([0.35, 0.25, 0.9])

WALL_COLOURS = ("white", "cream", "beige", "light_grey", "light_blue", "pale_green")
WOOD = ("wood", "brown", "beige", "white", "dark_grey")
FABRIC = ("blue", "grey", "beige", "red", "green", "navy", "dark_grey", "cream", "brown")


@lru_cache(maxsize=None)
def _class_index() -> dict[str, int]:
    return {name: i for i, name in enumerate(SCANNET20)}


def scaled_intrinsics(k, native_hw, image_hw) -> np.ndarray:
    """K of a ``native_hw`` camera resized to ``image_hw`` (pixel centres at integers)."""
    fx, fy, cx, cy = k
    sy, sx = image_hw[0] / native_hw[0], image_hw[1] / native_hw[1]
    return np.array([[fx * sx, 0.0, (cx + 0.5) * sx - 0.5], [0.0, fy * sy, (cy + 0.5) * sy - 0.5], [0, 0, 1.0]])


@dataclass
class Room:
    """A generated room: ``prims`` (walls, floor, ceiling are boxes too), ``size`` (width, depth, height),
    ``room_type``, and ``instance_labels`` uint8 [I] (class of every instance id; 0 = nothing)."""

    prims: Primitives
    size: np.ndarray
    room_type: str
    instance_labels: np.ndarray


class _Furnisher:
    """Places wall-mounted items and furniture in a room, avoiding overlaps on the floor plan."""

    def __init__(self, builder: SceneBuilder, rng: np.random.Generator, size):
        self.b, self.rng, self.c = builder, rng, _class_index()
        self.width, self.depth, self.height = size
        self.footprints: list[tuple] = []  # (xmin, xmax, ymin, ymax) kept free or occupied on the floor
        self.wall_spans: list[tuple] = []  # (wall, start, stop, zmin, zmax) taken on the walls

    def wall_length(self, wall: int) -> float:
        return self.width if wall % 2 == 0 else self.depth

    def wall_frame(self, wall: int, along: float, offset: float):
        """World (x, y, yaw) of a point ``along`` a wall, ``offset`` into the room, facing into the room.

        Walls: 0 is y = 0, 1 is x = width, 2 is y = depth, 3 is x = 0 (counter-clockwise). An item's local x
        runs along the wall and its local y points into the room."""
        w, d = self.width, self.depth
        x, y = ((along, offset), (w - offset, along), (w - along, d - offset), (offset, d - along))[wall]
        return x, y, (0.0, np.pi / 2, np.pi, -np.pi / 2)[wall]

    def _free(self, rect) -> bool:
        x0, x1, y0, y1 = rect
        if x0 < 0 or y0 < 0 or x1 > self.width or y1 > self.depth:
            return False
        return all(x1 <= a0 or x0 >= a1 or y1 <= b0 or y0 >= b1 for a0, a1, b0, b1 in self.footprints)

    def place_against_wall(self, width: float, depth: float, walls=(0, 1, 2, 3), attempts: int = 30):
        """A free floor spot of ``width`` along a wall and ``depth`` into the room: (x, y, yaw) of the
        footprint centre, or None. The spot is then taken."""
        for _ in range(attempts):
            wall = int(self.rng.choice(walls))
            length = self.wall_length(wall)
            if width > length - 0.1:
                continue
            along = self.rng.uniform(width / 2 + 0.05, length - width / 2 - 0.05)
            x, y, yaw = self.wall_frame(wall, along, depth / 2)
            half = (width / 2, depth / 2) if wall % 2 == 0 else (depth / 2, width / 2)
            rect = (x - half[0], x + half[0], y - half[1], y + half[1])
            if self._free(rect):
                self.footprints.append(rect)
                return x, y, yaw
        return None

    def place_free(self, width: float, depth: float, attempts: int = 30):
        """A free floor spot away from the walls (axis-aligned, yaw 0 or 90 degrees), or None."""
        for _ in range(attempts):
            yaw = float(self.rng.choice([0.0, np.pi / 2]))
            hx, hy = (width / 2, depth / 2) if yaw == 0.0 else (depth / 2, width / 2)
            x = self.rng.uniform(hx + 0.6, self.width - hx - 0.6) if self.width > 2 * hx + 1.2 else None
            y = self.rng.uniform(hy + 0.6, self.depth - hy - 0.6) if self.depth > 2 * hy + 1.2 else None
            if x is None or y is None:
                return None
            rect = (x - hx, x + hx, y - hy, y + hy)
            if self._free(rect):
                self.footprints.append(rect)
                return x, y, yaw
        return None

    def wall_span_free(self, wall, start, stop, zmin, zmax) -> bool:
        return all(w != wall or stop <= a or start >= b or zmax <= lo or zmin >= hi
                   for w, a, b, lo, hi in self.wall_spans)

    # -- building blocks ----------------------------------------------------------------------------------
    @staticmethod
    def placer(x, y, yaw):
        cos, sin = np.cos(yaw), np.sin(yaw)
        return lambda dx, dy, z: (x + dx * cos - dy * sin, y + dx * sin + dy * cos, z)

    def legs(self, inst, at, yaw, half_w, half_d, height, colour, thickness=0.025):
        for sx in (-1, 1):
            for sy in (-1, 1):
                self.b.box(inst, at(sx * (half_w - thickness), sy * (half_d - thickness), height / 2),
                           (thickness, thickness, height / 2), colour, 0.3, yaw)

    # -- the shell and wall items -------------------------------------------------------------------------
    def shell(self):
        b, c, w, d, h = self.b, self.c, self.width, self.depth, self.height
        wall_colour = pick_colour(self.rng, WALL_COLOURS, 0.05)
        t = 0.1
        slabs = (((w / 2, -t / 2, h / 2), (w / 2 + t, t / 2, h / 2)), ((w + t / 2, d / 2, h / 2), (t / 2, d / 2 + t, h / 2)),
                 ((w / 2, d + t / 2, h / 2), (w / 2 + t, t / 2, h / 2)), ((-t / 2, d / 2, h / 2), (t / 2, d / 2 + t, h / 2)))
        for center, half in slabs:
            b.box(b.new_instance(c["wall"]), center, half, wall_colour, 0.5)
        b.box(b.new_instance(c["floor"]), (w / 2, d / 2, -t / 2), (w / 2 + t, d / 2 + t, t / 2),
              pick_colour(self.rng, ("wood", "brown", "beige", "grey", "light_grey", "dark_grey")), 0.4)
        b.box(b.new_instance(IGNORE_LABEL), (w / 2, d / 2, h + t / 2), (w / 2 + t, d / 2 + t, t / 2),
              pick_colour(self.rng, ("white", "cream"), 0.04), 0.5)

    def flat_on_wall(self, label, wall, along, width, z0, z1, thickness, colour, clearance=0.0):
        """A thin panel on a wall; ``clearance`` keeps the floor in front of it free (doors)."""
        x, y, yaw = self.wall_frame(wall, along, thickness / 2)
        inst = self.b.new_instance(self.c[label])
        self.b.box(inst, (x, y, (z0 + z1) / 2), (width / 2, thickness / 2, (z1 - z0) / 2), colour, 0.5, yaw)
        self.wall_spans.append((wall, along - width / 2, along + width / 2, z0, z1))
        if clearance:
            cx, cy, _ = self.wall_frame(wall, along, clearance / 2)
            half = (width / 2, clearance / 2) if wall % 2 == 0 else (clearance / 2, width / 2)
            self.footprints.append((cx - half[0], cx + half[0], cy - half[1], cy + half[1]))
        return inst

    def door(self):
        wall = int(self.rng.integers(4))
        along = self.rng.uniform(0.6, self.wall_length(wall) - 0.6)
        self.flat_on_wall("door", wall, along, 0.9, 0.0, 2.05, 0.04, pick_colour(self.rng, WOOD), clearance=1.0)

    def window(self, with_curtains: bool):
        r = self.rng
        for _ in range(10):
            wall = int(r.integers(4))
            width = r.uniform(0.7, min(2.0, self.wall_length(wall) - 1.4))
            along = r.uniform(width / 2 + 0.6, self.wall_length(wall) - width / 2 - 0.6)
            z0, z1 = r.uniform(0.8, 1.1), min(self.height - 0.2, r.uniform(1.9, 2.3))
            if not self.wall_span_free(wall, along - width / 2 - 0.5, along + width / 2 + 0.5, z0, z1):
                continue
            glass = 0.5 * pick_colour(r, ("light_blue", "white", "grey")) + 0.3 * pick_colour(r, ("white",))
            self.flat_on_wall("window", wall, along, width, z0, z1, 0.03, glass)
            if with_curtains:
                fabric = pick_colour(r, FABRIC)
                for side in (-1, 1):
                    panel = r.uniform(0.35, 0.6)
                    self.flat_on_wall("curtain", wall, along + side * (width / 2 + panel / 2 - 0.1), panel, 0.15,
                                      z1 + 0.15, 0.12, fabric)
            return

    def picture(self):
        r = self.rng
        for _ in range(10):
            wall = int(r.integers(4))
            width, height = r.uniform(0.3, 1.1), r.uniform(0.3, 0.9)
            along = r.uniform(width / 2 + 0.2, self.wall_length(wall) - width / 2 - 0.2)
            z0 = r.uniform(1.2, 1.8)
            if self.wall_span_free(wall, along - width / 2 - 0.1, along + width / 2 + 0.1, z0 - 0.1, z0 + height + 0.1):
                self.flat_on_wall("picture", wall, along, width, z0, z0 + height, 0.03,
                                  pick_colour(r, ("red", "blue", "black", "beige", "green", "white", "brown", "yellow")))
                return

    # -- furniture: each takes its footprint centre (x, y) and yaw, front towards local +y ---------------
    def cabinet(self, x, y, yaw, w, d, h, z0=0.0):
        inst = self.b.new_instance(self.c["cabinet"])
        at, colour = self.placer(x, y, yaw), pick_colour(self.rng, WOOD)
        self.b.box(inst, at(0, 0, z0 + h / 2), (w / 2, d / 2, h / 2), colour, 0.4, yaw)
        self.b.box(inst, at(0, d / 2, z0 + h * 0.55), (w / 2 - 0.05, 0.01, h * 0.4), colour * 0.9, 0.4, yaw)

    def bookshelf(self, x, y, yaw, w, d, h):
        r, b = self.rng, self.b
        inst = b.new_instance(self.c["bookshelf"])
        at, colour = self.placer(x, y, yaw), pick_colour(r, WOOD)
        for sx in (-1, 1):
            b.box(inst, at(sx * (w / 2 - 0.01), 0, h / 2), (0.01, d / 2, h / 2), colour, 0.4, yaw)
        b.box(inst, at(0, -d / 2 + 0.01, h / 2), (w / 2, 0.01, h / 2), colour, 0.4, yaw)
        shelves = int(r.integers(3, 6))
        for k in range(shelves + 1):
            z = 0.02 + k * (h - 0.04) / shelves
            b.box(inst, at(0, 0, z), (w / 2, d / 2, 0.015), colour, 0.4, yaw)
            if k < shelves and r.random() < 0.8:  # a row of books, part of the bookshelf as in ScanNet
                fill = r.uniform(0.3, 0.9) * (w - 0.04)
                book_h = min(r.uniform(0.18, 0.3), (h - 0.04) / shelves - 0.05)
                b.box(inst, at(-w / 2 + 0.02 + fill / 2, 0, z + 0.015 + book_h / 2), (fill / 2, d / 2 - 0.04, book_h / 2),
                      pick_colour(r, ("red", "blue", "white", "green", "black", "beige", "yellow")), 0.3, yaw)

    def bed(self, x, y, yaw, w, length):
        r, b = self.rng, self.b
        inst = b.new_instance(self.c["bed"])
        at = self.placer(x, y, yaw)
        frame = pick_colour(r, WOOD)
        b.box(inst, at(0, 0, 0.18), (w / 2, length / 2, 0.18), frame, 0.4, yaw)
        b.box(inst, at(0, 0.02, 0.47), (w / 2 - 0.02, length / 2 - 0.04, 0.11), pick_colour(r, FABRIC + ("white",) * 3), 0.4, yaw)
        b.box(inst, at(0, -length / 2 + 0.04, 0.5), (w / 2, 0.04, 0.5), frame, 0.4, yaw)
        for px in ((-w / 4, w / 4) if w > 1.3 else (0.0,)):
            b.ellipsoid(inst, at(px, -length / 2 + 0.3, 0.62), (min(0.3, w / 4), 0.18, 0.08), pick_colour(r, ("white", "cream")), 0.4, yaw)

    def desk(self, x, y, yaw, w, d):
        inst = self.b.new_instance(self.c["desk"])
        at, colour = self.placer(x, y, yaw), pick_colour(self.rng, WOOD)
        self.b.box(inst, at(0, 0, 0.73), (w / 2, d / 2, 0.02), colour, 0.4, yaw)
        for sx in (-1, 1):
            self.b.box(inst, at(sx * (w / 2 - 0.02), 0, 0.36), (0.02, d / 2 - 0.02, 0.36), colour, 0.4, yaw)

    def chair(self, x, y, yaw):
        r, b = self.rng, self.b
        inst = b.new_instance(self.c["chair"])
        at = self.placer(x, y, yaw)
        frame, seat = pick_colour(r, WOOD + ("black",)), pick_colour(r, FABRIC + WOOD)
        b.box(inst, at(0, 0, 0.46), (0.23, 0.23, 0.03), seat, 0.3, yaw)
        self.legs(inst, at, yaw, 0.23, 0.23, 0.43, frame)
        b.box(inst, at(0, -0.21, 0.72), (0.22, 0.02, 0.25), seat, 0.3, yaw)

    def sofa(self, x, y, yaw, w, d):
        r, b = self.rng, self.b
        inst = b.new_instance(self.c["sofa"])
        at, fabric = self.placer(x, y, yaw), pick_colour(r, FABRIC)
        b.box(inst, at(0, 0.05, 0.22), (w / 2, d / 2 - 0.05, 0.22), fabric, 0.3, yaw)
        b.box(inst, at(0, -d / 2 + 0.1, 0.45), (w / 2, 0.1, 0.45), fabric, 0.3, yaw)
        for sx in (-1, 1):
            b.box(inst, at(sx * (w / 2 - 0.1), 0, 0.32), (0.1, d / 2, 0.32), fabric * 0.95, 0.3, yaw)

    def table(self, x, y, yaw, w, d, h):
        inst = self.b.new_instance(self.c["table"])
        at, colour = self.placer(x, y, yaw), pick_colour(self.rng, WOOD + ("white", "black"))
        self.b.box(inst, at(0, 0, h - 0.02), (w / 2, d / 2, 0.02), colour, 0.4, yaw)
        self.legs(inst, at, yaw, w / 2 - 0.03, d / 2 - 0.03, h - 0.04, colour, 0.03)

    def counter(self, x, y, yaw, w, with_sink: bool):
        r, b = self.rng, self.b
        inst = b.new_instance(self.c["counter"])
        at = self.placer(x, y, yaw)
        b.box(inst, at(0, 0, 0.44), (w / 2, 0.3, 0.44), pick_colour(r, WOOD), 0.4, yaw)
        b.box(inst, at(0, 0.01, 0.9), (w / 2 + 0.01, 0.31, 0.02), pick_colour(r, ("light_grey", "white", "black", "beige")), 0.5, yaw)
        if with_sink:
            self.sink(*at(r.uniform(-w / 2 + 0.35, w / 2 - 0.35), 0.0, 0.0)[:2], yaw, top=0.92)

    def sink(self, x, y, yaw, top):
        inst = self.b.new_instance(self.c["sink"])
        at, metal = self.placer(x, y, yaw), pick_colour(self.rng, ("light_grey", "white"))
        self.b.box(inst, at(0, 0.02, top + 0.04), (0.25, 0.2, 0.04), metal, 0.6, yaw)
        self.b.cylinder(inst, at(0, -0.22, top + 0.15), 0.015, 0.15, metal, 0.6, yaw)

    def refrigerator(self, x, y, yaw):
        inst = self.b.new_instance(self.c["refrigerator"])
        at = self.placer(x, y, yaw)
        h = self.rng.uniform(1.5, 1.9)
        colour = pick_colour(self.rng, ("white", "light_grey", "grey", "black"))
        self.b.box(inst, at(0, 0, h / 2), (0.35, 0.33, h / 2), colour, 0.6, yaw)
        self.b.box(inst, at(0.25, 0.34, h * 0.6), (0.02, 0.02, 0.2), colour * 0.7, 0.5, yaw)

    def toilet(self, x, y, yaw):
        inst = self.b.new_instance(self.c["toilet"])
        at, white = self.placer(x, y, yaw), pick_colour(self.rng, ("white", "cream"), 0.04)
        self.b.box(inst, at(0, -0.25, 0.6), (0.2, 0.09, 0.2), white, 0.6, yaw)
        self.b.cylinder(inst, at(0, 0.05, 0.2), 0.15, 0.2, white, 0.6, yaw)
        self.b.ellipsoid(inst, at(0, 0.05, 0.4), (0.19, 0.25, 0.06), white, 0.6, yaw)

    def bathtub(self, x, y, yaw, w):
        inst = self.b.new_instance(self.c["bathtub"])
        at, white = self.placer(x, y, yaw), pick_colour(self.rng, ("white", "cream", "light_grey"), 0.04)
        self.b.box(inst, at(0, 0, 0.28), (w / 2, 0.37, 0.28), white, 0.6, yaw)
        if self.rng.random() < 0.8:
            curtain = self.b.new_instance(self.c["shower curtain"])
            self.b.box(curtain, at(0, 0.4, 1.3), (w / 2, 0.01, 0.7), pick_colour(self.rng, FABRIC + ("white",)), 0.3, yaw)

    def other(self, x, y, yaw):
        """A stool, bin, side table, floor lamp or plant pot: ScanNet-20's 'otherfurniture'."""
        r, b = self.rng, self.b
        inst = b.new_instance(self.c["otherfurniture"])
        colour = pick_colour(r, WOOD + FABRIC)
        kind = r.integers(4)
        if kind == 0:  # stool / bin / pot
            h = r.uniform(0.3, 0.6)
            b.cylinder(inst, (x, y, h / 2), r.uniform(0.15, 0.25), h / 2, colour, 0.4)
        elif kind == 1:  # floor lamp
            b.cylinder(inst, (x, y, 0.75), 0.02, 0.75, pick_colour(r, ("black", "grey")), 0.4)
            b.cylinder(inst, (x, y, 1.55), 0.2, 0.15, pick_colour(r, ("white", "cream", "beige")), 0.4)
        elif kind == 2:  # nightstand / side table
            b.box(inst, (x, y, 0.28), (0.22, 0.2, 0.28), colour, 0.4, yaw)
        else:  # ottoman / crate
            b.box(inst, (x, y, 0.2), (0.3, 0.3, 0.2), colour, 0.4, yaw)


def build_room(rng: np.random.Generator, room_mix: int = 1) -> Room:
    """Lay out one furnished room from ``rng``.

    ``room_mix`` k >= 1 furnishes one room with the furniture groups of k distinct room kinds (in a room of
    5-8 x 4.5-7 m; a group that finds no free wall or floor is left out): k = 1 is the default rooms, unchanged
    draw for draw; k > 1 puts most of ScanNet-20's classes into every room, for benchmarks that must learn
    every class from a few rooms (the room kinds hold 1-6 classes of their own each)."""
    if not 1 <= room_mix <= len(ROOM_TYPES):
        raise ValueError(f"room_mix must be in 1..{len(ROOM_TYPES)}, got {room_mix}")
    if room_mix > 1:
        kinds = [ROOM_TYPES[i] for i in rng.choice(len(ROOM_TYPES), room_mix, replace=False)]
        size = np.array([rng.uniform(5.0, 8.0), rng.uniform(4.5, 7.0), rng.uniform(2.5, 3.1)])
    else:
        kinds = [ROOM_TYPES[rng.integers(len(ROOM_TYPES))]]
        if kinds[0] == "bathroom":
            size = np.array([rng.uniform(2.6, 4.0), rng.uniform(2.4, 3.5), rng.uniform(2.4, 2.8)])
        else:
            size = np.array([rng.uniform(3.5, 7.5), rng.uniform(3.2, 6.5), rng.uniform(2.5, 3.1)])
    b = SceneBuilder()
    f = _Furnisher(b, rng, size)
    f.shell()
    f.door()
    only_bathroom = kinds == ["bathroom"]
    curtained = any(k in ("bedroom", "living_room", "office") for k in kinds)
    for _ in range(rng.integers(0 if only_bathroom else 1, 3)):
        f.window(with_curtains=curtained and rng.random() < 0.7)
    for _ in range(rng.integers(1, 4)):
        f.picture()

    def against_wall(builder, width, depth, *args):
        spot = f.place_against_wall(width, depth)
        if spot is not None:
            builder(*spot, *args)
        return spot

    def free(builder, width, depth, *args):
        spot = f.place_free(width, depth)
        if spot is not None:
            builder(*spot, *args)
        return spot

    def table_with_chairs(w, d, h, seats):
        spot = f.place_free(w + 1.0, d + 1.0)  # room for the chairs
        if spot is None:
            return
        x, y, yaw = spot
        f.table(x, y, yaw, w, d, h)
        at = f.placer(x, y, yaw)
        for k in range(seats):
            side = (1, -1)[k % 2]
            cx, cy, _ = at((k // 2 - (seats - 1) / 4) * 0.6, side * (d / 2 + 0.25), 0.0)
            f.chair(cx, cy, yaw + (np.pi if side > 0 else 0.0))

    for room_type in kinds:
        _furnish(room_type, f, rng, against_wall, free, table_with_chairs)
    for _ in range(rng.integers(1, 4)):
        against_wall(f.other, 0.5, 0.5)
    return Room(b.build(), size, "+".join(kinds), np.array(b.instance_labels, np.uint8))


def _furnish(room_type: str, f: "_Furnisher", rng: np.random.Generator, against_wall, free, table_with_chairs):
    """The furniture group of one room kind (placed with the helpers of :func:`build_room`)."""
    u = rng.uniform
    if room_type == "bedroom":
        bed_w = u(0.9, 1.8)
        against_wall(f.bed, bed_w, 2.05, bed_w, 2.05)
        against_wall(f.cabinet, u(0.8, 1.6), 0.6, u(0.8, 1.6), 0.6, u(1.6, 2.1))
        if rng.random() < 0.6:
            w = u(1.0, 1.4)
            spot = against_wall(f.desk, w, 0.65, w, 0.65)
            if spot is not None:
                f.chair(*f.placer(*spot)(0.0, 0.55, 0.0)[:2], spot[2] + np.pi)
        if rng.random() < 0.5:
            against_wall(f.bookshelf, u(0.6, 1.2), 0.35, u(0.6, 1.2), 0.35, u(1.2, 2.0))
    elif room_type == "living_room":
        w = u(1.6, 2.4)
        against_wall(f.sofa, w, 0.9, w, 0.9)
        free(f.table, 1.0, 0.6, 1.0, 0.6, 0.45)
        against_wall(f.bookshelf, u(0.8, 1.6), 0.38, u(0.8, 1.6), 0.38, u(1.4, 2.2))
        against_wall(f.cabinet, u(1.0, 1.8), 0.45, u(1.0, 1.8), 0.45, u(0.5, 0.8))
        if rng.random() < 0.6:
            against_wall(f.chair, 0.5, 0.5)
    elif room_type == "office":
        for _ in range(rng.integers(1, 4)):
            w = u(1.0, 1.6)
            spot = against_wall(f.desk, w, 0.7, w, 0.7)
            if spot is not None:
                f.chair(*f.placer(*spot)(0.0, 0.6, 0.0)[:2], spot[2] + np.pi)
        against_wall(f.bookshelf, u(0.8, 1.4), 0.36, u(0.8, 1.4), 0.36, u(1.6, 2.2))
        against_wall(f.cabinet, u(0.5, 1.0), 0.5, u(0.5, 1.0), 0.5, u(0.7, 1.4))
        if rng.random() < 0.4:
            table_with_chairs(1.6, 0.9, 0.74, 4)
    elif room_type == "kitchen":
        w = u(1.6, 3.0)
        against_wall(f.counter, w, 0.62, w, True)
        if rng.random() < 0.5:
            w = u(1.0, 2.0)
            against_wall(f.counter, w, 0.62, w, False)
        against_wall(f.refrigerator, 0.72, 0.7)
        against_wall(f.cabinet, u(0.6, 1.2), 0.6, u(0.6, 1.2), 0.6, u(1.8, 2.1))
        table_with_chairs(u(0.9, 1.4), u(0.7, 0.9), 0.75, int(rng.integers(2, 5)))
    else:  # bathroom
        against_wall(f.toilet, 0.45, 0.7)
        w = u(0.6, 1.0)
        spot = against_wall(f.cabinet, w, 0.5, w, 0.5, 0.8)
        if spot is not None:
            f.sink(*f.placer(*spot)(0.0, 0.0, 0.0)[:2], spot[2], top=0.8)
        if rng.random() < 0.7:
            w = u(1.4, 1.7)
            against_wall(f.bathtub, w, 0.75, w)


def camera_trajectory(room: Room, num_frames: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``num_frames`` camera -> world poses (4x4, OpenCV axes) on an ellipse about the room centre,
    1.3-1.7 m high, each looking across the room and down by 10-35 degrees, never inside furniture."""
    width, depth, _ = room.size
    corners = room.prims.corners(room.prims.center)
    lo, hi = corners.min(axis=1) - 0.15, corners.max(axis=1) + 0.15
    furniture = room.prims.label != _class_index()["wall"]
    furniture &= room.prims.label != _class_index()["floor"]
    furniture &= room.prims.label != IGNORE_LABEL
    poses = []
    start = rng.uniform(0, 2 * np.pi)
    for k in range(num_frames):
        for _ in range(50):
            angle = start + 2 * np.pi * k / num_frames + rng.normal(0, 0.15)
            position = np.array([width / 2 + 0.28 * width * np.cos(angle), depth / 2 + 0.28 * depth * np.sin(angle),
                                 rng.uniform(1.3, 1.7)])
            inside = ((position >= lo) & (position <= hi)).all(axis=1) & furniture
            if not inside.any():
                break
        yaw = angle + np.pi + rng.uniform(-0.7, 0.7)
        pitch = np.radians(rng.uniform(10, 35))
        forward = np.array([np.cos(yaw) * np.cos(pitch), np.sin(yaw) * np.cos(pitch), -np.sin(pitch)])
        right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
        down = np.cross(forward, right)
        pose = np.eye(4)
        pose[:3, :3] = np.stack([right, down, forward], axis=1)
        pose[:3, 3] = position
        poses.append(pose)
    return poses


def _depth_image(hits, camera: PinholeCamera, rng: np.random.Generator) -> np.ndarray:
    """Camera z in metres with structured-light noise and holes (0 = no reading), float32 HxW."""
    z = hits.distance * (hits.directions @ camera.forward())
    sigma = 0.0012 + 0.0019 * np.square(np.maximum(z - 0.4, 0.0))
    z = z + rng.normal(0.0, 1.0, len(z)) * sigma
    z[(rng.random(len(z)) < DEPTH_HOLE_RATE) | ~hits.hit | (z > MAX_DEPTH_M)] = 0.0
    return z.reshape(camera.height, camera.width).astype(np.float32)


def render_room(room: Room, num_frames: int, rng: np.random.Generator, native_resolution: bool = False,
                token: str = "", points_file: str = "", point_spacing: float = FUSION_VOXEL_M) -> Frame:
    """An RGB-D trajectory of ``num_frames`` frames through ``room`` and the point cloud fused from it.

    ``native_resolution`` renders colour at 1296x968 and depth at 640x480 (ScanNet's cameras) instead of
    both at the training resolution 320x240; the fused cloud keeps the first point of every ``point_spacing``
    cube (metres). Returns a :class:`~pipeline.datasets.base.Frame` with points in
    the room frame, ``feat`` = rgb/255, and ``extra``: ``point_instance`` (int32 [N]), ``point_frame`` (int16
    [N], the depth frame each point was fused from), ``instance_labels`` (uint8, per instance id),
    ``image_instance`` (int32 HxW per image), ``camera_to_world`` (4x4 per image), ``room_type``."""
    colour_hw = COLOUR_NATIVE_HW if native_resolution else TRAINING_HW
    depth_hw = DEPTH_NATIVE_HW if native_resolution else TRAINING_HW
    colour_k = scaled_intrinsics(COLOUR_K, COLOUR_NATIVE_HW, colour_hw)
    depth_k = scaled_intrinsics(DEPTH_K, DEPTH_NATIVE_HW, depth_hw) if native_resolution else colour_k
    poses = camera_trajectory(room, num_frames, rng)

    images, image_instances, fused = [], [], []
    for k, pose in enumerate(poses):
        camera = PinholeCamera(colour_k, *colour_hw, pose)
        hits = cast(room.prims, None, camera, 0.0, MAX_DEPTH_M + 2.0)
        rgb = shade(hits, LIGHT, 0.55, False, rng)
        if native_resolution:
            depth_camera = PinholeCamera(depth_k, *depth_hw, pose)
            depth_hits = cast(room.prims, None, depth_camera, 0.0, MAX_DEPTH_M + 2.0)
            depth_rgb = shade(depth_hits, LIGHT, 0.55, False, rng)
        else:
            depth_camera, depth_hits, depth_rgb = camera, hits, rgb
        depth = _depth_image(depth_hits, depth_camera, rng)
        h, w = colour_hw
        images.append(ImageRecord(name=f"frame_{k:04d}", file=f"{points_file}/frame_{k:04d}", rgb=rgb.reshape(h, w, 3),
                                  intrinsics=colour_k, points_to_camera=np.linalg.inv(pose),
                                  gt=hits.label.reshape(h, w), depth=depth, depth_intrinsics=depth_k))
        image_instances.append(hits.instance.reshape(h, w))
        valid = np.flatnonzero(depth.ravel() > 0)
        v, u = np.divmod(valid, depth_hw[1])
        z = depth.ravel()[valid].astype(np.float64)
        cam = np.stack([(u - depth_k[0, 2]) / depth_k[0, 0] * z, (v - depth_k[1, 2]) / depth_k[1, 1] * z, z], axis=1)
        fused.append((cam @ pose[:3, :3].T + pose[:3, 3], depth_rgb[valid], depth_hits.label[valid],
                      depth_hits.instance[valid], np.full(len(valid), k, np.int16)))

    xyz, rgb, label, instance, source = (np.concatenate(parts) for parts in zip(*fused))
    voxel = np.floor(xyz / point_spacing).astype(np.int64) + (1 << 20)  # 21 bits per axis: +-20 km
    _, first = np.unique((voxel[:, 0] << 42) | (voxel[:, 1] << 21) | voxel[:, 2], return_index=True)
    first.sort()  # keep the points in frame order
    extra = {"point_instance": instance[first], "point_frame": source[first], "instance_labels": room.instance_labels,
             "image_instance": image_instances, "camera_to_world": poses, "room_type": room.room_type}
    return Frame(token=token, points_file=points_file, xyz=xyz[first].astype(np.float32),
                 feat=(rgb[first] / 255.0).astype(np.float32), images=images, gt=label[first], extra=extra)
