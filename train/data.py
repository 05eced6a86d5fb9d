"""Frames of one or more cache stores as a torch ``Dataset``, and their offset-based collation.

A sample is one frame: its points (augmented, voxelised, with the voxel -> point inverse map), its images
(augmented; ScanNet samples N of them), the cached pseudo-labels, SAM mask ids and SAM features, and the
point-pixel pairs re-expressed in the augmented images. Nothing is loaded at construction beyond the small
offsets arrays: each DataLoader worker opens the Zarr stores lazily on first use and reads only the chunks
of the frame it is asked for.

Image augmentations are one affine map per image from output pixel to source pixel (crop, resize,
horizontal flip): ``x_src = a_x * x_out + b_x`` (continuous coordinates, pixel centres at ``i + 0.5``).
The same map resamples the image, its label maps (nearest) and the pairs (dropped when they leave the
crop); the trainer uses it to sample the cached SAM feature grid at every output pixel.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch.utils.data import Dataset, Sampler

from data_cache import schema
from data_cache.integrity import read_guard, require_complete_chunks
from data_cache.store import Store

IGNORE = schema.IGNORE_INDEX

#: Arrays of a store that training and evaluation read; the stage that writes each is what a user must run.
TRAINING_ARRAYS = ("points/xyz", "points/feat", "images/rgb", "pairs/point", "pairs/image", "pairs/uv",
                   "clip/text_embed", "clip/label", "sam/mask_id", "clip/label_refined")


def latent_feature_arrays(cfg: dict) -> tuple[str, ...]:
    """The cached feature grids the Eq. 7 target of ``loss.latent_target`` needs (``sam/feat``, ``clip/feat``)."""
    from .losses import LATENT_FEATURES
    return tuple(f"{name}/feat" for name in LATENT_FEATURES[cfg["loss"]["latent_target"]])


def _read_rows(arr, rows: np.ndarray) -> np.ndarray:
    """Rows of a Zarr array: one slice when they are contiguous (the common case), else one read each."""
    rows = np.asarray(rows)
    if len(rows) == 0:
        return np.zeros((0,) + tuple(arr.shape[1:]), dtype=arr.dtype)
    if np.all(np.diff(rows) == 1):
        return np.asarray(arr[int(rows[0]):int(rows[-1]) + 1])
    return np.stack([np.asarray(arr[int(r)]) for r in rows])


def voxelize(coord: np.ndarray, voxel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """Integer voxel coordinates [V, 3] (non-negative) and the point -> voxel inverse map [P]."""
    grid = np.floor(coord / voxel_size).astype(np.int64)
    grid -= grid.min(axis=0)
    extent = grid.max(axis=0) + 1
    key = (grid[:, 0] * extent[1] + grid[:, 1]) * extent[2] + grid[:, 2]
    uniq, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    return grid[first].astype(np.int32), inverse.astype(np.int64)


def scatter_mean(values: np.ndarray, index: np.ndarray, size: int) -> np.ndarray:
    counts = np.bincount(index, minlength=size).astype(np.float64)
    out = np.stack([np.bincount(index, weights=values[:, c], minlength=size) for c in range(values.shape[1])], 1)
    return (out / np.maximum(counts, 1)[:, None]).astype(np.float32)


def image_affine(rng: np.random.Generator | None, src_hw, out_hw, aug: dict) -> np.ndarray:
    """(a_x, b_x, a_y, b_y): a random resized crop and horizontal flip (identity resize when ``rng`` is None)."""
    H, W = src_hw
    Ho, Wo = out_hw
    x0, y0, cw, ch = 0.0, 0.0, float(W), float(H)
    flip = False
    if rng is not None:
        lo, hi = aug.get("crop_scale", [1.0, 1.0])
        if hi < 1.0 or lo < 1.0:
            area = rng.uniform(lo, hi) * H * W
            rlo, rhi = aug.get("crop_ratio", [1.0, 1.0])
            aspect = (Wo / Ho) * math.exp(rng.uniform(math.log(rlo), math.log(rhi)))
            cw = min(float(W), math.sqrt(area * aspect))
            ch = min(float(H), math.sqrt(area / aspect))
            x0 = rng.uniform(0, W - cw)
            y0 = rng.uniform(0, H - ch)
        flip = bool(aug.get("hflip", False)) and rng.random() < 0.5
    a_x, b_x = (-cw / Wo, x0 + cw) if flip else (cw / Wo, x0)
    return np.array([a_x, b_x, ch / Ho, y0], dtype=np.float64)


def _source_index(a: float, b: float, n_out: int, n_src: int) -> np.ndarray:
    return np.clip(np.floor(a * (np.arange(n_out) + 0.5) + b).astype(np.int64), 0, n_src - 1)


def warp_nearest(maps: np.ndarray, affines: np.ndarray, out_hw) -> np.ndarray:
    """Resample label-like maps [I, H, W] (nearest) with one affine per image."""
    Ho, Wo = out_hw
    H, W = maps.shape[1:3]
    out = np.empty((len(maps), Ho, Wo), dtype=maps.dtype)
    for i, (ax, bx, ay, by) in enumerate(affines):
        out[i] = maps[i][_source_index(ay, by, Ho, H)[:, None], _source_index(ax, bx, Wo, W)[None, :]]
    return out


def affine_grid(affines: torch.Tensor, src_hw, out_hw) -> torch.Tensor:
    """``grid_sample`` grid [I, Ho, Wo, 2] (align_corners=False) of the source position of every output pixel."""
    Ho, Wo = out_hw
    affines = affines.to(torch.float32)
    src = torch.as_tensor(src_hw, dtype=torch.float32, device=affines.device).reshape(-1, 2)
    H, W = src[:, 0:1], src[:, 1:2]  # one source size per image (or one for all)
    xs = torch.arange(Wo, device=affines.device, dtype=torch.float32) + 0.5
    ys = torch.arange(Ho, device=affines.device, dtype=torch.float32) + 0.5
    gx = (affines[:, 0:1] * xs + affines[:, 1:2]) / W * 2 - 1  # [I, Wo]
    gy = (affines[:, 2:3] * ys + affines[:, 3:4]) / H * 2 - 1  # [I, Ho]
    return torch.stack([gx[:, None, :].expand(-1, Ho, -1), gy[:, :, None].expand(-1, -1, Wo)], dim=-1)


def warp_rgb(rgb: np.ndarray, affines: np.ndarray, out_hw) -> np.ndarray:
    """Bilinear resample of [I, H, W, 3] uint8 images; returns [I, 3, Ho, Wo] uint8."""
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float()
    grid = affine_grid(torch.from_numpy(affines), rgb.shape[1:3], out_hw)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8).numpy()


def jitter_colours(rgb: np.ndarray, rng: np.random.Generator, strength) -> np.ndarray:
    """Photometric augmentation of [I, 3, H, W] uint8 images, one draw per image from ``rng`` (so an item's
    augmentation stays seeded by (seed, epoch, index)): ``strength`` = (brightness, contrast, saturation,
    hue) as in ``torchvision.transforms.ColorJitter`` -- factors drawn in [1 - s, 1 + s], the hue shift in
    [-h, h] -- applied in that order by torchvision's functional ops. The label maps are untouched."""
    b, c, s, h = (float(v) for v in strength)
    images = []
    for img in torch.from_numpy(rgb):
        if b:
            img = TF.adjust_brightness(img, rng.uniform(1 - b, 1 + b))
        if c:
            img = TF.adjust_contrast(img, rng.uniform(1 - c, 1 + c))
        if s:
            img = TF.adjust_saturation(img, rng.uniform(1 - s, 1 + s))
        if h:
            img = TF.adjust_hue(img, rng.uniform(-h, h))
        images.append(img)
    return torch.stack(images).numpy() if images else rgb.copy()


def warp_pairs(uv: np.ndarray, image: np.ndarray, affines: np.ndarray, out_hw) -> tuple[np.ndarray, np.ndarray]:
    """Pair pixels (col, row) in the output images and the mask of pairs that stay inside them."""
    Ho, Wo = out_hw
    a = affines[image]
    col = np.floor((uv[:, 0] + 0.5 - a[:, 1]) / a[:, 0]).astype(np.int64)
    row = np.floor((uv[:, 1] + 0.5 - a[:, 3]) / a[:, 2]).astype(np.int64)
    keep = (col >= 0) & (col < Wo) & (row >= 0) & (row < Ho)
    return np.stack([col, row], 1), keep


class CacheFrameDataset(Dataset):
    """One item per frame of the given stores (frames of several stores are concatenated)."""

    def __init__(self, store_paths, cfg: dict, train: bool = True, images_per_frame: int | None = None):
        """``train``: random augmentations and ``data.images_per_frame``; otherwise none and
        ``eval.images_per_frame`` (or ``images_per_frame`` when given). Training items carry the cached
        feature grids of the latent target."""
        self.paths = [str(p) for p in store_paths]
        self.cfg = cfg
        self.train = train
        self.images_per_frame = images_per_frame
        self.feature_arrays = latent_feature_arrays(cfg) if train else ()
        self.epoch = 0
        self.seed = int(cfg.get("seed", 0))
        self.index: list[tuple[int, int]] = []
        self.meta = []
        for s, path in enumerate(self.paths):
            st = Store(path)
            require_complete_chunks(st)  # a lost chunk would read back as the fill value: refuse the store
            attrs = st.attrs
            has_points = "points" in attrs.modalities  # a 2D-only store (nuImages) has no points and no pairs
            offs = {k: st.offsets(k) for k in (("points", "images", "pairs") if has_points else ("images",))}
            has_image_gt = "images/gt" in st
            gt_source = (f"images/gt ({attrs.image_gt_source or 'per-pixel labels'})" if has_image_gt
                         else "projected 3D labels (pixels of labelled points only)")
            self.meta.append({"offsets": offs, "image_size": tuple(attrs.image_size), "has_points": has_points,
                              "has_point_gt": "points/gt" in st, "has_image_gt": has_image_gt,
                              "image_gt_source": gt_source})
            self.index += [(s, f) for f in range(len(offs["images"]) - 1)]
        sizes = {m["image_size"] for m in self.meta}
        self.out_size = tuple(cfg["data"]["image_size"] or next(iter(sizes)))
        if cfg["data"]["image_size"] is None and len(sizes) > 1:
            raise ValueError(f"the stores have different image sizes {sorted(sizes)}: set data.image_size")
        self._stores = None
        self._pid = None

    def set_epoch(self, epoch: int) -> None:
        """The epoch of plain indices (``0..len-1``); :class:`EpochSampler` indices carry their own."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self):  # open stores never travel to worker processes
        state = dict(self.__dict__)
        state["_stores"] = None
        return state

    def store(self, s: int) -> Store:
        if self._stores is None or self._pid != os.getpid():
            self._stores = [Store(p) for p in self.paths]
            self._pid = os.getpid()
        return self._stores[s]

    def _images_per_frame(self) -> int:
        if self.images_per_frame is not None:
            return int(self.images_per_frame)
        return int(self.cfg["data"]["images_per_frame"] if self.train else self.cfg["eval"]["images_per_frame"])

    def __getitem__(self, idx: int) -> dict:
        """The item of ``idx``; a chunk of the frame's rows that fails to decode is one line naming the array,
        the chunk and the frames (:func:`data_cache.integrity.read_guard`)."""
        s, f = self.index[int(idx) % len(self.index)]
        with read_guard(self.store(s), frames=(f, f + 1)):
            return self._item(idx)

    def _item(self, idx: int) -> dict:
        epoch, idx = divmod(int(idx), len(self.index))  # see EpochSampler
        epoch += self.epoch
        s, f = self.index[idx]
        st, meta = self.store(s), self.meta[s]
        offs = meta["offsets"]
        dcfg, aug = self.cfg["data"], self.cfg["data"]["augment"]
        rng = np.random.default_rng([self.seed, epoch, idx]) if self.train else None

        # -- points ---------------------------------------------------------------------------
        if not meta["has_points"]:
            return self._images_only_item(st, meta, s, f, rng)
        p0, p1 = int(offs["points"][f]), int(offs["points"][f + 1])
        coord = np.asarray(st.array("points/xyz")[p0:p1], dtype=np.float32)
        feat = np.asarray(st.array("points/feat")[p0:p1], dtype=np.float32)
        gt = (np.asarray(st.array("points/gt")[p0:p1]) if meta["has_point_gt"]
              else np.full(p1 - p0, IGNORE, np.uint8))
        # centred in training and evaluation alike: the coordinates are also input features (use_xyz)
        coord = coord - coord.mean(0, keepdims=True)
        if rng is not None:
            if aug.get("rotate_z"):
                t = rng.uniform(0, 2 * np.pi)
                c, sn = np.cos(t), np.sin(t)
                coord = coord @ np.array([[c, sn, 0], [-sn, c, 0], [0, 0, 1]], dtype=np.float32)
            if aug.get("flip_xy"):
                coord[:, 0] *= rng.choice([-1, 1])
                coord[:, 1] *= rng.choice([-1, 1])
            if aug.get("scale"):
                coord *= rng.uniform(*aug["scale"])
        point_feat = np.concatenate([feat, coord], 1) if dcfg["use_xyz"] else feat
        voxel_coord, inverse = voxelize(coord, float(dcfg["voxel_size"]))
        voxel_feat = scatter_mean(point_feat, inverse, len(voxel_coord))

        rows, local, n_avail, affines, images = self._images(st, meta, f, rng)
        i0 = int(offs["images"][f])

        # -- pairs: keep those on a sampled image and inside its crop ----------------------------
        k0, k1 = int(offs["pairs"][f]), int(offs["pairs"][f + 1])
        pair_point = np.asarray(st.array("pairs/point")[k0:k1], dtype=np.int64)
        pair_image = np.asarray(st.array("pairs/image")[k0:k1], dtype=np.int64) - i0
        pair_uv = np.asarray(st.array("pairs/uv")[k0:k1], dtype=np.int64)
        lut = np.full(n_avail, -1, np.int64)
        lut[local] = np.arange(len(local))
        pair_image = lut[pair_image]
        on = pair_image >= 0
        pair_point, pair_image, pair_uv = pair_point[on], pair_image[on], pair_uv[on]
        pair_uv, inside = warp_pairs(pair_uv, pair_image, affines, self.out_size)
        return {
            "coord": coord.astype(np.float32), "point_gt": gt.astype(np.int64), "inverse": inverse,
            "voxel_coord": voxel_coord, "voxel_feat": voxel_feat, **images,
            "pair_point": pair_point[inside], "pair_image": pair_image[inside], "pair_uv": pair_uv[inside],
            "store": s, "frame": f,
        }

    def _images_only_item(self, st, meta, s: int, f: int, rng) -> dict:
        """A frame of a 2D-only store: its images; the point fields are empty (no 3D net reads them)."""
        _, _, _, _, images = self._images(st, meta, f, rng)
        empty = np.zeros(0, np.int64)
        return {"coord": np.zeros((0, 3), np.float32), "point_gt": empty, "inverse": empty,
                "voxel_coord": np.zeros((0, 3), np.int32), "voxel_feat": np.zeros((0, 1), np.float32), **images,
                "pair_point": empty, "pair_image": empty, "pair_uv": np.zeros((0, 2), np.int64),
                "store": s, "frame": f}

    def _images(self, st, meta, f: int, rng):
        """The frame's images (all, or N sampled: ScanNet 'image numbers'), augmented, with their label maps
        and cached feature grids. Returns ``(rows, local, n_avail, affines, fields)``."""
        offs = meta["offsets"]
        aug = self.cfg["data"]["augment"]
        i0, i1 = int(offs["images"][f]), int(offs["images"][f + 1])
        n_avail, n_want = i1 - i0, self._images_per_frame()
        if n_want <= 0 or n_want >= n_avail:
            local = np.arange(n_avail)
        elif rng is not None:
            local = np.sort(rng.choice(n_avail, n_want, replace=False))
        else:
            local = np.unique(np.linspace(0, n_avail - 1, n_want).round().astype(np.int64))
        rows = i0 + local
        src_hw = meta["image_size"]
        affines = np.stack([image_affine(rng, src_hw, self.out_size, aug) for _ in rows]) if len(rows) else \
            np.zeros((0, 4))
        rgb = warp_rgb(_read_rows(st.array("images/rgb"), rows), affines, self.out_size)
        if rng is not None and aug.get("color_jitter"):
            rgb = jitter_colours(rgb, rng, aug["color_jitter"])
        maps = {}
        for key, name in (("clip_label", "clip/label"), ("clip_refined", "clip/label_refined"),
                          ("mask_id", "sam/mask_id"), ("image_gt", "images/gt")):
            if name == "images/gt" and not meta["has_image_gt"]:
                maps[key] = np.full((len(rows),) + self.out_size, IGNORE, np.uint8)
                continue
            maps[key] = warp_nearest(_read_rows(st.array(name), rows), affines, self.out_size)
        feats = {f"{name.split('/')[0]}_feat": _read_rows(st.array(name), rows) for name in self.feature_arrays}

        fields = {"rgb": rgb, "affine": affines.astype(np.float32), **feats,
                  "clip_label": maps["clip_label"], "clip_refined": maps["clip_refined"],
                  "mask_id": maps["mask_id"].astype(np.int64), "image_gt": maps["image_gt"],
                  "image_rows": rows.astype(np.int64), "src_hw": np.tile(np.asarray(src_hw, np.int64), (len(rows), 1))}
        return rows, local, n_avail, affines, fields


class EpochSampler(Sampler):
    """Wraps a sampler and encodes the epoch in the indices (``index + epoch * len(dataset)``).

    The augmentation of an item is seeded by (seed, epoch, index); passing the epoch inside the index lets
    the DataLoader keep its workers alive across epochs (``persistent_workers``) -- a worker's copy of the
    dataset never sees ``set_epoch`` calls made in the main process.
    """

    def __init__(self, sampler, dataset_len: int):
        self.sampler, self.n, self.epoch = sampler, dataset_len, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        return (int(i) + self.epoch * self.n for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def collate_offsets(samples: list[dict]) -> dict:
    """Concatenate frames without padding (Pointcept style): ``*_offset`` [B+1] splits points, voxels, images.

    Per-frame indices become batch indices: ``pair_point`` indexes the batch's points, ``pair_image`` its
    images, ``inverse`` its voxels; ``voxel_index`` is [V, 4] (frame, x, y, z) for spconv.
    """
    def offsets(n):
        return torch.as_tensor(np.concatenate([[0], np.cumsum(n)]), dtype=torch.long)

    p_off = offsets([len(s["coord"]) for s in samples])
    v_off = offsets([len(s["voxel_coord"]) for s in samples])
    i_off = offsets([len(s["rgb"]) for s in samples])
    cat = lambda key: torch.from_numpy(np.concatenate([s[key] for s in samples]))  # noqa: E731
    out = {
        "point_offset": p_off, "voxel_offset": v_off, "image_offset": i_off,
        "coord": cat("coord"), "point_gt": cat("point_gt"), "voxel_feat": cat("voxel_feat"),
        "inverse": torch.cat([torch.from_numpy(s["inverse"]) + v_off[b] for b, s in enumerate(samples)]),
        "voxel_index": torch.cat([torch.cat([torch.full((len(s["voxel_coord"]), 1), b, dtype=torch.int32),
                                             torch.from_numpy(s["voxel_coord"])], 1) for b, s in enumerate(samples)]),
        "rgb": cat("rgb"), "affine": cat("affine"),
        **{k: cat(k) for k in ("sam_feat", "clip_feat") if k in samples[0]},
        "clip_label": cat("clip_label"), "clip_refined": cat("clip_refined"), "mask_id": cat("mask_id"),
        "image_gt": cat("image_gt"),
        "pair_point": torch.cat([torch.from_numpy(s["pair_point"]) + p_off[b] for b, s in enumerate(samples)]),
        "pair_image": torch.cat([torch.from_numpy(s["pair_image"]) + i_off[b] for b, s in enumerate(samples)]),
        "pair_uv": cat("pair_uv"), "image_rows": cat("image_rows"), "src_hw": cat("src_hw"),
        "store": torch.tensor([s["store"] for s in samples]), "frame": torch.tensor([s["frame"] for s in samples]),
    }
    return out


def worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # a worker decodes chunks; threads would fight the main process


def batch_to(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
