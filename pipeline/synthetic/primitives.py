"""Scene geometry as a flat table of solid primitives (boxes, cylinders, ellipsoids) plus a flat ground.

Every primitive is a solid in its own local frame, placed in the world by a rotation (local -> world) and a
centre, optionally moving at a constant velocity. Several primitives that form one object (a car's body,
cabin and wheels) share one instance id, and the instance decides the class. Intersections are computed in
the local frame for many rays sharing one origin (a camera or LiDAR centre), which is what the ray caster
(:mod:`pipeline.synthetic.raycast`) needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_cache.schema import IGNORE_INDEX as IGNORE_LABEL

BOX, CYLINDER, ELLIPSOID = 0, 1, 2
#: surface patterns the shader knows (see :mod:`pipeline.synthetic.shading`)
PLAIN, WINDOWS = 0, 1

# corner i of a local bounding box has signs (bit2, bit1, bit0) -> (x, y, z); edges join corners one bit apart
_CORNER_SIGNS = np.array([[(i >> 2) & 1, (i >> 1) & 1, i & 1] for i in range(8)], dtype=np.float64) * 2 - 1
BOX_EDGES = np.array([(i, i | b) for i in range(8) for b in (1, 2, 4) if not i & b], dtype=np.int64)


def yaw_rotation(yaw: float) -> np.ndarray:
    """Rotation about the world z axis by ``yaw`` radians (3x3)."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


#: turns a cylinder's local z axis onto the local y axis (wheels: the axle runs across the vehicle)
AXLE_ALONG_Y = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


@dataclass
class Primitives:
    """All primitives of a scene, one row each.

    Fields (P = number of primitives):
      kind        int8 [P]      BOX, CYLINDER or ELLIPSOID
      center      float64 [P,3] world position of the local origin at time 0 (seconds)
      rotation    float64 [P,3,3] local -> world rotation
      half_size   float64 [P,3] box half extents; cylinder (radius, radius, half height along local z);
                                ellipsoid semi-axes
      velocity    float64 [P,3] world velocity in m/s (0 for static primitives)
      label       uint8 [P]     class index (255 = unlabelled)
      instance    int32 [P]     object id, > 0, shared by the parts of one object
      albedo      float32 [P,3] base colour in 0..1 before texture and shading
      reflectivity float32 [P]  LiDAR reflectivity in 0..1 (intensity before incidence falloff and noise)
      pattern     int8 [P]      PLAIN or WINDOWS (facade texture, colour only)
    """

    kind: np.ndarray
    center: np.ndarray
    rotation: np.ndarray
    half_size: np.ndarray
    velocity: np.ndarray
    label: np.ndarray
    instance: np.ndarray
    albedo: np.ndarray
    reflectivity: np.ndarray
    pattern: np.ndarray

    def __len__(self) -> int:
        return len(self.kind)

    def centers_at(self, time: float) -> np.ndarray:
        """World centres at ``time`` seconds (constant-velocity motion)."""
        return self.center + self.velocity * time

    def bounding_radius(self) -> np.ndarray:
        """Radius of a sphere about the centre that contains each primitive."""
        return np.linalg.norm(self.half_size, axis=1)

    def corners(self, centers: np.ndarray) -> np.ndarray:
        """World corners [P,8,3] of each primitive's local bounding box, placed at ``centers``."""
        local = _CORNER_SIGNS[None] * self.half_size[:, None, :]
        return np.einsum("pij,pkj->pki", self.rotation, local) + centers[:, None, :]

    def subset(self, keep: np.ndarray) -> "Primitives":
        """The primitives selected by a boolean mask or index array."""
        return Primitives(**{name: getattr(self, name)[keep] for name in self.__dataclass_fields__})


class SceneBuilder:
    """Collects primitives object by object; :meth:`build` returns the :class:`Primitives` table.

    ``new_instance(label)`` opens an object and returns its id; the part methods (``box``, ``cylinder``,
    ``ellipsoid``) add solids to it. ``instance_labels`` and ``instance_velocity`` map every id (including
    ids of ground regions, which are not primitives) to its class and velocity; id 0 means "nothing".
    """

    def __init__(self):
        self._rows: list[tuple] = []
        self.instance_labels: list[int] = [IGNORE_LABEL]
        self.instance_velocity: list[tuple] = [(0.0, 0.0, 0.0)]

    def new_instance(self, label: int, velocity=(0.0, 0.0, 0.0)) -> int:
        self.instance_labels.append(int(label))
        self.instance_velocity.append(tuple(float(v) for v in velocity))
        return len(self.instance_labels) - 1

    def _add(self, kind, instance, center, rotation, half_size, albedo, reflectivity, pattern):
        self._rows.append((kind, np.asarray(center, float), np.asarray(rotation, float),
                           np.asarray(half_size, float), instance, np.asarray(albedo, float),
                           float(reflectivity), pattern))

    def box(self, instance: int, center, half_size, albedo, reflectivity: float, yaw: float = 0.0,
            pattern: int = PLAIN) -> None:
        """An upright box rotated by ``yaw`` about z."""
        self._add(BOX, instance, center, yaw_rotation(yaw), half_size, albedo, reflectivity, pattern)

    def cylinder(self, instance: int, center, radius: float, half_height: float, albedo, reflectivity: float,
                 yaw: float = 0.0, axle: bool = False) -> None:
        """A cylinder standing upright, or with ``axle=True`` lying along the object's y axis (a wheel)."""
        rotation = yaw_rotation(yaw) @ AXLE_ALONG_Y if axle else yaw_rotation(yaw)
        self._add(CYLINDER, instance, center, rotation, (radius, radius, half_height), albedo, reflectivity,
                  PLAIN)

    def ellipsoid(self, instance: int, center, semi_axes, albedo, reflectivity: float, yaw: float = 0.0) -> None:
        self._add(ELLIPSOID, instance, center, yaw_rotation(yaw), semi_axes, albedo, reflectivity, PLAIN)

    def build(self) -> Primitives:
        rows = self._rows
        instance = np.array([r[4] for r in rows], dtype=np.int32)
        velocity = np.array(self.instance_velocity, dtype=np.float64)[instance]
        return Primitives(
            kind=np.array([r[0] for r in rows], dtype=np.int8).reshape(-1),
            center=np.array([r[1] for r in rows], dtype=np.float64).reshape(-1, 3),
            rotation=np.array([r[2] for r in rows], dtype=np.float64).reshape(-1, 3, 3),
            half_size=np.array([r[3] for r in rows], dtype=np.float64).reshape(-1, 3),
            velocity=velocity.reshape(-1, 3),
            label=np.array(self.instance_labels, dtype=np.uint8)[instance],
            instance=instance,
            albedo=np.array([r[5] for r in rows], dtype=np.float32).reshape(-1, 3),
            reflectivity=np.array([r[6] for r in rows], dtype=np.float32),
            pattern=np.array([r[7] for r in rows], dtype=np.int8).reshape(-1),
        )


# -- ray intersection in a primitive's local frame ---------------------------------------------------------
# Each function takes one ray origin o [3] and directions d [M,3] (local frame, unit length in world units)
# and returns the distance to the first surface hit from outside, +inf where the ray misses. Rays that start
# inside a solid never hit it (no sensor is placed inside an object).

def _safe(d: np.ndarray) -> np.ndarray:
    # a zero direction component would give 0/0 in the slab test; a tiny one gives the right +-inf limit
    return np.where(np.abs(d) < 1e-12, 1e-12, d)


def intersect_box(o: np.ndarray, d: np.ndarray, half: np.ndarray, t_min: float) -> np.ndarray:
    inv = 1.0 / _safe(d)
    t1 = (-half - o) * inv
    t2 = (half - o) * inv
    t_near = np.minimum(t1, t2).max(axis=1)
    t_far = np.maximum(t1, t2).min(axis=1)
    return np.where((t_near <= t_far) & (t_near > t_min), t_near, np.inf)


def intersect_cylinder(o: np.ndarray, d: np.ndarray, half: np.ndarray, t_min: float) -> np.ndarray:
    radius, half_height = half[0], half[2]
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = o[0] * d[:, 0] + o[1] * d[:, 1]
    c = o[0] ** 2 + o[1] ** 2 - radius ** 2
    disc = b * b - a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        t_side = (-b - np.sqrt(disc)) / a
    z_side = o[2] + t_side * d[:, 2]
    side_ok = (disc >= 0) & (a > 0) & (np.abs(z_side) <= half_height) & (t_side > t_min)
    t = np.where(side_ok, t_side, np.inf)
    if abs(o[2]) > half_height:  # only the cap facing the origin can be the first hit
        cap_z = np.sign(o[2]) * half_height
        t_cap = (cap_z - o[2]) / _safe(d[:, 2])
        x = o[0] + t_cap * d[:, 0]
        y = o[1] + t_cap * d[:, 1]
        cap_ok = (x * x + y * y <= radius ** 2) & (t_cap > t_min)
        t = np.where(cap_ok & (t_cap < t), t_cap, t)
    return t


def intersect_ellipsoid(o: np.ndarray, d: np.ndarray, half: np.ndarray, t_min: float) -> np.ndarray:
    # scaling space by 1/semi-axes makes a unit sphere and keeps the ray parameter t unchanged
    os_, ds = o / half, d / half
    a = (ds * ds).sum(axis=1)
    b = ds @ os_
    c = os_ @ os_ - 1.0
    disc = b * b - a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / a
    return np.where((disc >= 0) & (t > t_min), t, np.inf)


INTERSECT = {BOX: intersect_box, CYLINDER: intersect_cylinder, ELLIPSOID: intersect_ellipsoid}


def local_normals(kind: int, p: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Outward surface normals (unnormalised) at local surface points p [M,3] of primitives of one kind.

    ``half`` is [M,3] (each point's own primitive size)."""
    if kind == BOX:
        q = np.abs(p / half)
        axis = q.argmax(axis=1)
        n = np.zeros_like(p)
        rows = np.arange(len(p))
        n[rows, axis] = np.sign(p[rows, axis])
        return n
    if kind == CYLINDER:
        radial = np.hypot(p[:, 0], p[:, 1]) / half[:, 0]
        on_cap = np.abs(p[:, 2]) / half[:, 2] > radial
        n = np.stack([p[:, 0], p[:, 1], np.zeros(len(p))], axis=1)
        n[on_cap] = 0.0
        n[on_cap, 2] = np.sign(p[on_cap, 2])
        return n
    return p / half ** 2
