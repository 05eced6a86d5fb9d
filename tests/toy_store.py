"""Small schema-conformant CNS stores for the trainer's tests and benchmark.

The toy scene is analytic: a ground plane (class 0) and axis-aligned boxes (classes 1..L-1) seen by pinhole
cameras placed around the scene centre. Every pixel is ray-cast (depth, class, object id); points are a
subsample of the back-projected pixels, and the pairs come from projecting every point into every camera
with a depth test against the ray-cast depth, exactly as the ``correspond`` stage does with real data.
``clip/label`` is the ground truth with noise, ``sam/mask_id`` the object regions, ``sam/feat`` a fixed
per-class prototype plus noise on a coarser grid, ``clip/text_embed`` random unit vectors, ``clip/feat`` the
text embedding of the cell's class plus noise on the 16-pixel patch grid, projected by a random orthonormal
``clip/proj`` (drawn from a separate random stream, so the other arrays do not depend on it).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_cache import schema
from data_cache.store import Store

TOY_CLASSES = ("ground", "car", "tree", "building")


def _look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """World -> camera (OpenCV axes: x right, y down, z forward) rigid transform."""
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    r = np.stack([x, y, z])  # rows: camera axes in world coordinates
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = -r @ eye
    return m


def _raycast(cam: np.ndarray, k: np.ndarray, h: int, w: int, boxes: list) -> tuple:
    """Depth (camera z), class and object id per pixel; class 255 / object -1 where the ray hits nothing."""
    r = cam[:3, :3]
    eye = -r.T @ cam[:3, 3]
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    rays_cam = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)], -1)
    rays = rays_cam @ r  # world directions with camera z component 1
    best = np.full((h, w), np.inf)
    cls = np.full((h, w), schema.IGNORE_INDEX, dtype=np.uint8)
    obj = np.full((h, w), -1, dtype=np.int32)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = -eye[2] / rays[..., 2]  # ground plane z = 0
        hit = (t > 0) & (np.abs(eye[0] + t * rays[..., 0]) < 12) & (np.abs(eye[1] + t * rays[..., 1]) < 12)
        best = np.where(hit, t, best)
        cls[hit] = 0
        obj[hit] = 0
        for oid, (lo, hi, c) in enumerate(boxes, start=1):
            t0 = (lo - eye) / rays
            t1 = (hi - eye) / rays
            tmin = np.nanmax(np.minimum(t0, t1), axis=-1)
            tmax = np.nanmin(np.maximum(t0, t1), axis=-1)
            hitb = (tmax >= tmin) & (tmin > 0) & (tmin < best)
            best = np.where(hitb, tmin, best)
            cls[hitb] = c
            obj[hitb] = oid
    depth = np.where(np.isfinite(best), best, 0.0)  # t is the camera-z depth since rays_cam z = 1
    return depth.astype(np.float32), cls, obj, rays, eye


def make_toy_frame(rng: np.random.Generator, num_images: int, image_size: tuple, num_classes: int,
                   point_stride: int) -> dict:
    h, w = image_size
    boxes = []
    for c in range(1, num_classes):
        for _ in range(2):
            centre = rng.uniform(-4, 4, size=2)
            size = rng.uniform(0.8, 2.0, size=3)
            lo = np.array([centre[0] - size[0] / 2, centre[1] - size[1] / 2, 0.0])
            boxes.append((lo, lo + size, c))
    k = np.array([[w * 0.6, 0, w / 2], [0, w * 0.6, h / 2], [0, 0, 1]], dtype=np.float64)
    images = []
    points, point_cls = [], []
    for i in range(num_images):
        ang = 2 * np.pi * i / num_images + rng.uniform(-0.2, 0.2)
        eye = np.array([7 * np.cos(ang), 7 * np.sin(ang), 2.0])
        cam = _look_at(eye, np.array([0.0, 0.0, 0.5]))
        depth, cls, obj, rays, eye = _raycast(cam, k, h, w, boxes)
        images.append({"cam": cam, "depth": depth, "cls": cls, "obj": obj})
        sel = np.zeros((h, w), bool)
        sel[rng.integers(0, point_stride)::point_stride] = True
        sel = sel.reshape(-1)[rng.permutation(h * w)].reshape(h, w) & (depth > 0)
        # back-project the selected pixels (depth is camera z; ray = direction with camera z = 1)
        points.append(eye + rays[sel] * depth[sel][:, None])
        point_cls.append(cls[sel])
    xyz = np.concatenate(points).astype(np.float32)
    gt = np.concatenate(point_cls).astype(np.uint8)
    # project every point into every camera; keep it where the ray-cast depth agrees (not occluded)
    pair_point, pair_image, pair_uv, pair_depth = [], [], [], []
    for i, im in enumerate(images):
        pc = (im["cam"][:3, :3] @ xyz.T.astype(np.float64) + im["cam"][:3, 3:4]).T
        z = pc[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = k[0, 0] * pc[:, 0] / z + k[0, 2]
            v = k[1, 1] * pc[:, 1] / z + k[1, 2]
        ok = (z > 0.1) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
        idx = np.flatnonzero(ok)
        col, row = u[idx].astype(int), v[idx].astype(int)
        visible = np.abs(im["depth"][row, col] - z[idx]) < 0.05 * z[idx] + 0.05
        idx, col, row = idx[visible], col[visible], row[visible]
        pair_point.append(idx)
        pair_image.append(np.full(len(idx), i))
        pair_uv.append(np.stack([col, row], 1))
        pair_depth.append(z[idx])
    return {"xyz": xyz, "gt": gt, "images": images, "k": k,
            "pair_point": np.concatenate(pair_point), "pair_image": np.concatenate(pair_image),
            "pair_uv": np.concatenate(pair_uv), "pair_depth": np.concatenate(pair_depth)}


def build_toy_store(path: str | Path, num_frames: int = 4, num_images: int = 3, image_size=(32, 48),
                    class_names=TOY_CLASSES, text_dim: int = 16, sam_dim: int = 8, sam_grid=(8, 12),
                    point_stride: int = 12, label_noise: float = 0.25, seed: int = 0, dataset: str = "toy",
                    point_features=("intensity",), schema_version: int = schema.SCHEMA_VERSION,
                    stages=schema.STAGE_ORDER, text_embed: np.ndarray | None = None,
                    images_per_frame: list | None = None, capabilities=("point_gt", "image_gt"),
                    split: str = "train") -> Path:
    """Write a toy store at ``path`` and return it. ``stages`` lists the stages marked complete."""
    rng = np.random.default_rng(seed)
    L = len(class_names)
    h, w = image_size
    per_frame_images = images_per_frame or [num_images] * num_frames
    frames = [make_toy_frame(rng, n, image_size, L, point_stride) for n in per_frame_images]
    attrs = schema.RootAttrs(dataset=dataset, split=split, class_names=list(class_names),
                             image_size=[h, w], point_features=list(point_features),
                             capabilities=list(capabilities), num_frames=num_frames,
                             schema_version=schema_version, shard_size=2)
    store = Store.create(path, attrs)
    p_off = np.cumsum([0] + [len(f["xyz"]) for f in frames])
    i_off = np.cumsum([0] + per_frame_images)
    k_off = np.cumsum([0] + [len(f["pair_point"]) for f in frames])
    dims = schema.dims_for(attrs, int(p_off[-1]), int(i_off[-1]), int(k_off[-1]), text_dim=text_dim,
                           sam_dim=sam_dim, sam_grid=sam_grid, sam_embed_dim=16)
    store.set_dims(**dims)
    for sp in schema.ARRAYS:
        if sp.when and sp.when not in attrs.capabilities:
            continue
        store.create_array(sp.name)

    cat = np.concatenate
    store.write_rows("frames/token", 0, np.array([f"toy{seed}-{i:03d}" for i in range(num_frames)], dtype=object))
    store.write_rows("points/offsets", 0, p_off.astype(np.int64))
    store.write_rows("images/offsets", 0, i_off.astype(np.int64))
    store.write_rows("pairs/offsets", 0, k_off.astype(np.int64))
    store.write_rows("images/frame", 0, cat([np.full(n, f) for f, n in enumerate(per_frame_images)]).astype(np.int32))
    store.write_rows("images/name", 0, np.array([f"CAM_{j}" for n in per_frame_images for j in range(n)],
                                                dtype=object))
    xyz = cat([f["xyz"] for f in frames])
    gt = cat([f["gt"] for f in frames])
    store.write_rows("points/xyz", 0, xyz)
    feat = (gt[:, None] / L + rng.normal(0, 0.05, (len(gt), 1))).astype(np.float32)
    store.write_rows("points/feat", 0, np.repeat(feat, len(point_features), 1))
    if "point_gt" in capabilities:
        store.write_rows("points/gt", 0, gt)

    img_cls = cat([np.stack([im["cls"] for im in f["images"]]) for f in frames])
    img_obj = cat([np.stack([im["obj"] for im in f["images"]]) for f in frames])
    palette = rng.integers(0, 256, (256, 3)).astype(np.uint8)
    rgb = np.clip(palette[img_cls].astype(int) + rng.integers(-20, 20, img_cls.shape + (3,)), 0, 255)
    store.write_rows("images/rgb", 0, rgb.astype(np.uint8))
    if "image_gt" in capabilities:
        store.write_rows("images/gt", 0, img_cls)
    store.write_rows("images/intrinsics", 0, np.stack([f["k"] for f in frames for _ in f["images"]]).astype(np.float32))

    # pairs: image index is global
    store.write_rows("pairs/point", 0, cat([f["pair_point"] for f in frames]).astype(np.int32))
    store.write_rows("pairs/image", 0, cat([f["pair_image"] + i_off[n] for n, f in enumerate(frames)]).astype(np.int32))
    store.write_rows("pairs/uv", 0, cat([f["pair_uv"] for f in frames]).astype(np.uint16))
    store.write_rows("pairs/depth", 0, cat([f["pair_depth"] for f in frames]).astype(np.float16))

    # CLIP: gt with pixel noise and a wrong class over one random block per image
    noisy = img_cls.copy()
    flip = rng.random(noisy.shape) < label_noise
    noisy[flip] = rng.integers(0, L, int(flip.sum()))
    for i in range(len(noisy)):
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        noisy[i, y0:y0 + h // 4, x0:x0 + w // 4] = rng.integers(0, L)
    noisy[img_cls == schema.IGNORE_INDEX] = rng.integers(0, L)  # CLIP labels every pixel, sky included
    if text_embed is None:
        text_embed = rng.normal(size=(L, text_dim))
        text_embed /= np.linalg.norm(text_embed, axis=1, keepdims=True)
    store.write_rows("clip/text_embed", 0, text_embed.astype(np.float32))
    store.write_rows("clip/label", 0, noisy)
    store.write_rows("clip/confidence", 0, np.full(noisy.shape, 200, np.uint8))

    # SAM: one mask per object region (the ground split into two halves), features per class prototype
    mask = img_obj.copy()
    mask[(img_obj == 0) & (np.arange(w)[None, None, :] >= w // 2)] = 1000
    for i in range(len(mask)):  # compact ids 0..M-1 per image, -1 outside every mask
        inside = mask[i] >= 0
        _, compact = np.unique(mask[i][inside], return_inverse=True)
        mask[i][inside] = compact
    store.write_rows("sam/mask_id", 0, mask.astype(np.int32))
    proto = rng.normal(size=(L + 1, sam_dim))
    gh, gw = sam_grid
    ys = (np.arange(gh) + 0.5) * h / gh
    xs = (np.arange(gw) + 0.5) * w / gw
    coarse = img_cls[:, ys.astype(int)][:, :, xs.astype(int)]
    coarse = np.where(coarse == schema.IGNORE_INDEX, L, coarse)
    sfeat = proto[coarse] + rng.normal(0, 0.3, coarse.shape + (sam_dim,))
    store.write_rows("sam/feat", 0, sfeat.transpose(0, 3, 1, 2).astype(np.float16))
    store.write_rows("sam/proj", 0, rng.normal(size=(16, sam_dim)).astype(np.float32))
    store.write_rows("sam/proj_mean", 0, np.zeros(16, np.float32))

    # dense CLIP features: the text embedding of the cell's class (noisy), normalised, projected (own stream)
    crng = np.random.default_rng(seed + 7919)
    d = store.dims()
    ys = ((np.arange(d["hc"]) + 0.5) * h / d["hc"]).astype(int)
    xs = ((np.arange(d["wc"]) + 0.5) * w / d["wc"]).astype(int)
    cell = noisy[:, ys][:, :, xs]
    cfeat = text_embed[cell] + crng.normal(0, 0.1, cell.shape + (text_dim,))
    cfeat /= np.linalg.norm(cfeat, axis=-1, keepdims=True)
    cproj = np.linalg.qr(crng.normal(size=(text_dim, text_dim)))[0][:, :d["Dc"]]
    cmean = cfeat.reshape(-1, text_dim).mean(0)
    store.write_rows("clip/feat", 0, ((cfeat - cmean) @ cproj).transpose(0, 3, 1, 2).astype(np.float16))
    store.write_rows("clip/proj", 0, cproj.astype(np.float32))
    store.write_rows("clip/proj_mean", 0, cmean.astype(np.float32))

    # refine stage with the project's Eq. 4 implementation
    import torch
    from pipeline.refine import sam_max_vote
    refined = sam_max_vote(torch.from_numpy(noisy), torch.from_numpy(mask.astype(np.int64)), L).numpy()
    store.write_rows("clip/label_refined", 0, refined.astype(np.uint8))

    store.update_attrs(stages={stage: {"version": 1, "config": {"toy": True}, "checkpoint_sha256": None}
                               for stage in stages})
    for stage in stages:
        store.mark_done(stage, "_complete", {"frames": num_frames})
    return Path(path)
