"""Pixel-point correspondences: one projection routine for every dataset.

An adapter supplies, per image, the rigid transform from the frame's point coordinates into the camera
(OpenCV axes) and the intrinsics; nuScenes builds that transform with the devkit's ``transform_matrix``
chain (lidar -> ego(t_lidar) -> global -> ego(t_camera) -> camera), ScanNet from the inverted pose. The
perspective division is the devkit's ``view_points``.
"""
from __future__ import annotations

import numpy as np
from nuscenes.utils.geometry_utils import view_points


def project_points(xyz: np.ndarray, points_to_camera: np.ndarray, intrinsics: np.ndarray, image_hw,
                   min_depth: float, depth: np.ndarray | None = None, depth_intrinsics: np.ndarray | None = None,
                   tolerance: float | None = None, border: float = 0.0):
    """Points that a camera sees.

    Args:
        xyz: (N, 3) points in the frame's coordinates.
        points_to_camera: 4x4 rigid transform into the camera frame (x right, y down, z forward).
        intrinsics: 3x3 K at the image's native resolution ``image_hw`` (H, W).
        min_depth: keep points with camera depth z > min_depth (metres).
        depth: optional depth map in metres (0 = no reading); with ``depth_intrinsics`` (K of the depth
            map, same camera frame) a point is kept only where the map has a reading and
            ``|z - depth| <= tolerance`` (the occlusion test). Points over a pixel without a reading are
            dropped, since they cannot be confirmed visible.
        border: 0 keeps every point that lands on a pixel (pixel i covers [i - 0.5, i + 0.5)); a positive
            value keeps ``border < u < W - border`` and likewise for rows, as the devkit's
            ``map_pointcloud_to_image`` does with 1.
    Returns:
        ``point_index`` int64 [M] (rows of ``xyz``), ``uv`` float64 [M, 2] (column, row) at native
        resolution, ``z`` float64 [M] camera depth in metres.
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    homo = np.concatenate([xyz.astype(np.float64), np.ones((len(xyz), 1))], axis=1)
    cam = (points_to_camera @ homo.T)[:3]
    z = cam[2]
    front = z > min_depth
    idx = np.flatnonzero(front)
    cam = cam[:, idx]
    uv = view_points(cam, np.asarray(intrinsics, dtype=np.float64), normalize=True)[:2].T
    if border:  # the devkit's strict test: border < u < W - border
        inside = (uv[:, 0] > border) & (uv[:, 0] < w - border) & (uv[:, 1] > border) & (uv[:, 1] < h - border)
    else:  # pixel-centre convention: pixel i covers [i - 0.5, i + 0.5)
        inside = (uv[:, 0] >= -0.5) & (uv[:, 0] < w - 0.5) & (uv[:, 1] >= -0.5) & (uv[:, 1] < h - 0.5)
    idx, uv, z = idx[inside], uv[inside], cam[2, inside]
    if depth is not None:
        if depth_intrinsics is None or tolerance is None:
            raise ValueError("an occlusion test needs depth_intrinsics and a tolerance")
        visible = depth_visibility(cam[:, inside], depth, depth_intrinsics, tolerance)
        idx, uv, z = idx[visible], uv[visible], z[visible]
    return idx, uv, z


def depth_visibility(cam: np.ndarray, depth: np.ndarray, depth_intrinsics: np.ndarray, tolerance: float):
    """For camera-frame points (3, M): True where the depth map confirms the point within ``tolerance``."""
    dh, dw = depth.shape
    duv = view_points(cam, np.asarray(depth_intrinsics, dtype=np.float64), normalize=True)[:2]
    col = np.rint(duv[0]).astype(np.int64)
    row = np.rint(duv[1]).astype(np.int64)
    ok = (col >= 0) & (col < dw) & (row >= 0) & (row < dh)
    measured = np.zeros(cam.shape[1])
    measured[ok] = depth[row[ok], col[ok]]
    return ok & (measured > 0) & (np.abs(cam[2] - measured) <= tolerance)


def scale_intrinsics(intrinsics: np.ndarray, native_hw, target_hw) -> np.ndarray:
    """K for an image resized from ``native_hw`` to ``target_hw`` (pixel-centre convention)."""
    sy = target_hw[0] / native_hw[0]
    sx = target_hw[1] / native_hw[1]
    k = np.asarray(intrinsics, dtype=np.float64).copy()
    k[0, 0] *= sx
    k[0, 1] *= sx
    k[0, 2] = (k[0, 2] + 0.5) * sx - 0.5
    k[1, 1] *= sy
    k[1, 2] = (k[1, 2] + 0.5) * sy - 0.5
    return k


def uv_to_training_pixels(uv: np.ndarray, native_hw, target_hw) -> np.ndarray:
    """Native (column, row) coordinates -> integer pixel indices at the training resolution (uint16)."""
    sx = target_hw[1] / native_hw[1]
    sy = target_hw[0] / native_hw[0]
    col = np.clip(np.floor((uv[:, 0] + 0.5) * sx), 0, target_hw[1] - 1)
    row = np.clip(np.floor((uv[:, 1] + 0.5) * sy), 0, target_hw[0] - 1)
    return np.stack([col, row], axis=1).astype(np.uint16)
