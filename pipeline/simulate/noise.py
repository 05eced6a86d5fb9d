"""The corruption models of the simulated foundation models: pure numpy functions of a ground-truth map.

Everything here is per image and draws from the ``rng`` it is given, so an image's simulated outputs depend
only on the seed, the image's identity and its ground truth (never on the shard layout or worker count).

MaskCLIP (:func:`simulate_clip`)
    1. Per 16x16 patch (the ViT-B/16 token grid), the histogram ``P`` of ground-truth classes (unknown pixels
       count as a uniform histogram).
    2. ``Q = P @ C``: what CLIP "perceives", with ``C`` the class-confusion matrix (:func:`confusion_matrix`:
       ``accuracy`` on the diagonal, ``group_confusion`` spread over the classes CLIP confuses with it,
       ``uniform_confusion`` over all others).
    3. The patch's class ``k = argmax(log Q + G)`` with ``G`` Gumbel noise made from Gaussian random fields
       smoothed over ``correlation_patches`` patches (one field per class, pushed through the normal CDF and
       the Gumbel quantile): at each patch ``k`` is an exact draw from ``Q`` (Gumbel-max), and neighbouring
       patches draw alike, so errors come in blobs as MaskCLIP's do.
    4. The dense feature of the patch is the text embedding of ``k`` plus Gaussian noise, L2-normalised;
       the labels are the argmax over classes of the bilinearly upsampled cosine similarities (as the real
       stage does), the confidence their softmax at ``logit_scale``.

SAM (:func:`simulate_sam_masks`, :func:`simulate_sam_embedding`)
    Regions = 4-connected components of the (filled) ground-truth class map; regions smaller than
    ``min_region_px`` are left uncovered; large regions are split into 2..``split_max_parts`` Voronoi
    pieces around random seed pixels with ``split_prob``; a mask is merged with a random neighbouring mask
    (whatever its class) with ``merge_prob``; dropped (uncovered) with ``drop_prob``; the boundaries are
    displaced by a smooth random field of amplitude ``boundary_jitter_px``. Ids are ranked by area from the
    smallest, as the real stage writes them. The features: per mask a unit embedding mixing a per-class
    direction (``feat_class_weight``) and a per-mask one, averaged over each feature cell's pixels, plus
    per-cell noise.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage, special

from data_cache.schema import IGNORE_INDEX, NO_MASK


# -- shared ----------------------------------------------------------------------------------------------
def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def gaussian_fields(rng: np.random.Generator, n: int, shape, sigma: float) -> np.ndarray:
    """``n`` standard-normal random fields [n, *shape], spatially correlated over ``sigma`` cells (0: white)."""
    z = rng.standard_normal((n, *shape))
    if sigma <= 0:
        return z
    z = ndimage.gaussian_filter(z, sigma=(0, sigma, sigma), mode="reflect")
    return z / np.maximum(z.std(axis=(1, 2), keepdims=True), 1e-12)


def fill_ground_truth(gt: np.ndarray, max_distance: float) -> np.ndarray:
    """Unlabelled pixels (255) take the class of the nearest labelled pixel within ``max_distance`` px;
    farther ones stay 255 ("unknown"). An image without any labelled pixel stays all unknown."""
    unlabelled = gt == IGNORE_INDEX
    if not unlabelled.any() or unlabelled.all():
        return gt.copy()
    dist, (iy, ix) = ndimage.distance_transform_edt(unlabelled, return_indices=True)
    out = gt[iy, ix]
    out[dist > max_distance] = IGNORE_INDEX
    return out


def class_partners(class_names, groups) -> list[set[int]]:
    """For each class, the other classes it shares a confusion group with (groups use class names; names a
    store does not have are left out)."""
    index = {n: i for i, n in enumerate(class_names)}
    partners = [set() for _ in class_names]
    for group in groups:
        members = [index[n] for n in group if n in index]
        for i in members:
            partners[i].update(m for m in members if m != i)
    return partners


def confusion_matrix(class_names, groups, accuracy: float, group_confusion: float,
                     uniform_confusion: float) -> np.ndarray:
    """Row-stochastic [L, L]: ``C[i, j]`` = probability that CLIP labels a pixel of class ``i`` as ``j``.

    The diagonal gets ``accuracy``, the group partners of ``i`` share ``group_confusion`` (a class without
    partners adds it to the uniform part), every other class gets an equal share of ``uniform_confusion``.
    """
    L = len(class_names)
    if L == 1:
        return np.ones((1, 1))
    C = np.zeros((L, L))
    for i, partners in enumerate(class_partners(class_names, groups)):
        others = [j for j in range(L) if j != i]
        uniform = uniform_confusion + (0.0 if partners else group_confusion)
        C[i, others] = uniform / len(others)
        for j in partners:
            C[i, j] += group_confusion / len(partners)
        C[i, i] += accuracy
    return C / C.sum(1, keepdims=True)


def text_embeddings(class_names, groups, dim: int, group_similarity: float, rng: np.random.Generator) -> np.ndarray:
    """[L, dim] unit vectors; classes of a confusion group share a component (cosine about
    ``group_similarity`` between two members of one group)."""
    L = len(class_names)
    own = unit_rows(rng.standard_normal((L, dim)))
    shared = unit_rows(rng.standard_normal((max(1, len(groups)), dim)))
    index = {n: i for i, n in enumerate(class_names)}
    common = np.zeros((L, dim))
    for g, group in enumerate(groups):
        members = [index[n] for n in group if n in index]
        if len(members) > 1:
            common[members] += shared[g]
    has = np.linalg.norm(common, axis=1) > 0
    out = own.copy()
    out[has] = np.sqrt(group_similarity) * unit_rows(common[has]) + np.sqrt(1 - group_similarity) * own[has]
    return unit_rows(out).astype(np.float32)


# -- MaskCLIP --------------------------------------------------------------------------------------------
def patch_histograms(filled: np.ndarray, num_classes: int, patch: int) -> np.ndarray:
    """[hc, wc, L] class fractions per ``patch`` x ``patch`` cell (hc = H // patch; the grid is stretched
    over the whole image when H is not a multiple); unknown pixels spread evenly over the classes."""
    H, W = filled.shape
    hc, wc = max(1, H // patch), max(1, W // patch)
    cy = np.minimum(np.arange(H) * hc // H, hc - 1)
    cx = np.minimum(np.arange(W) * wc // W, wc - 1)
    cell = (cy[:, None] * wc + cx[None, :]).ravel()
    lab = filled.ravel().astype(np.int64)
    known = lab != IGNORE_INDEX
    counts = np.bincount(cell[known] * num_classes + lab[known], minlength=hc * wc * num_classes)
    counts = counts.reshape(hc * wc, num_classes).astype(np.float64)
    counts += np.bincount(cell[~known], minlength=hc * wc)[:, None] / num_classes
    return (counts / np.maximum(counts.sum(1, keepdims=True), 1e-12)).reshape(hc, wc, num_classes)


def perceived_patch_classes(filled: np.ndarray, C: np.ndarray, patch: int, correlation: float,
                            rng: np.random.Generator) -> np.ndarray:
    """[hc, wc] the class CLIP "sees" in each patch: a spatially correlated Gumbel-max draw from ``P @ C``."""
    L = C.shape[0]
    q = patch_histograms(filled, L, patch) @ C  # [hc, wc, L]
    z = gaussian_fields(rng, L, q.shape[:2], correlation)  # [L, hc, wc]
    u = np.clip(special.ndtr(z), 1e-12, 1 - 1e-12)
    gumbel = -np.log(-np.log(u))
    return np.argmax(np.log(np.maximum(q, 1e-30)).transpose(2, 0, 1) + gumbel, axis=0)


def clip_features(patch_class: np.ndarray, text: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """[E, hc, wc] unit dense features: the text embedding of each patch's class plus Gaussian noise of norm
    about ``noise``."""
    E = text.shape[1]
    f = text[patch_class] + rng.standard_normal((*patch_class.shape, E)) * (noise / np.sqrt(E))
    return unit_rows(f).transpose(2, 0, 1).astype(np.float32)


def labels_from_features(feat: np.ndarray, text: np.ndarray, out_hw, logit_scale: float):
    """Labels (uint8 [H, W]) and confidence (uint8 0..255): the argmax and softmax of the cosine similarities
    upsampled bilinearly (align_corners=False) from the patch grid, as the real MaskCLIP stage computes them."""
    import torch
    import torch.nn.functional as F
    cos = torch.from_numpy(np.einsum("ehw,le->lhw", feat, text, optimize=True)).float()[None]
    up = F.interpolate(cos, size=tuple(out_hw), mode="bilinear", align_corners=False)[0]
    prob = torch.softmax(up * logit_scale, dim=0)
    conf, label = prob.max(0)
    return label.numpy().astype(np.uint8), (conf * 255).round().clamp(0, 255).numpy().astype(np.uint8)


def simulate_clip(filled: np.ndarray, text: np.ndarray, C: np.ndarray, knobs: dict, rng: np.random.Generator):
    """One image: (label uint8 [H, W], confidence uint8 [H, W], unit features float32 [E, hc, wc])."""
    k = perceived_patch_classes(filled, C, int(knobs["patch_size"]), float(knobs["correlation_patches"]), rng)
    feat = clip_features(k, text, float(knobs["feat_noise"]), rng)
    label, conf = labels_from_features(feat, text, filled.shape, float(knobs["logit_scale"]))
    return label, conf, feat


# -- SAM -------------------------------------------------------------------------------------------------
def connected_regions(filled: np.ndarray) -> np.ndarray:
    """int32 [H, W]: 4-connected components of each class value (unknown 255 included), numbered from 0."""
    out = np.full(filled.shape, -1, dtype=np.int32)
    n = 0
    for value in np.unique(filled):
        comp, count = ndimage.label(filled == value)
        sel = comp > 0
        out[sel] = comp[sel] - 1 + n
        n += count
    return out


def _pixels_by_id(ids: np.ndarray, n: int):
    """(order, starts): flat pixel indices grouped by id (``ids`` >= 0), ``order[starts[r]:starts[r+1]]``."""
    flat = ids.ravel()
    valid = np.flatnonzero(flat >= 0)
    order = valid[np.argsort(flat[valid], kind="stable")]
    starts = np.concatenate([[0], np.cumsum(np.bincount(flat[valid], minlength=n))])
    return order, starts


def _relabel(ids: np.ndarray) -> tuple[np.ndarray, int]:
    """Consecutive ids 0..n-1 (-1 kept)."""
    flat = ids.ravel()
    valid = flat >= 0
    uniq, inv = np.unique(flat[valid], return_inverse=True)
    out = np.full(flat.shape, -1, dtype=np.int32)
    out[valid] = inv
    return out.reshape(ids.shape), len(uniq)


def _split(ids: np.ndarray, n: int, knobs: dict, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    W = ids.shape[1]
    order, starts = _pixels_by_id(ids, n)
    out = ids.ravel().copy()
    nxt = n
    for r in range(n):
        size = starts[r + 1] - starts[r]
        if size < knobs["split_min_px"] or rng.random() >= knobs["split_prob"]:
            continue
        pix = order[starts[r]:starts[r + 1]]
        parts = min(size, int(rng.integers(2, int(knobs["split_max_parts"]) + 1)))
        seeds = pix[rng.choice(size, size=parts, replace=False)]
        py, px = np.divmod(pix, W)
        sy, sx = np.divmod(seeds, W)
        nearest = np.argmin((py[:, None] - sy[None]) ** 2 + (px[:, None] - sx[None]) ** 2, axis=1)
        new = np.concatenate([[r], np.arange(nxt, nxt + parts - 1)])
        out[pix] = new[nearest]
        nxt += parts - 1
    return out.reshape(ids.shape), nxt


def _neighbour_pairs(ids: np.ndarray) -> np.ndarray:
    """Unique (a, b) pairs of different ids (both >= 0) that touch horizontally or vertically."""
    pairs = []
    for a, b in ((ids[:, :-1], ids[:, 1:]), (ids[:-1, :], ids[1:, :])):
        sel = (a != b) & (a >= 0) & (b >= 0)
        pairs.append(np.stack([a[sel], b[sel]], 1))
    p = np.concatenate(pairs)
    p = np.concatenate([p, p[:, ::-1]])
    return np.unique(p, axis=0) if len(p) else p.reshape(0, 2)


def _merge(ids: np.ndarray, n: int, prob: float, rng: np.random.Generator) -> np.ndarray:
    if n == 0 or prob <= 0:
        return ids
    pairs = _neighbour_pairs(ids)
    parent = np.arange(n)

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    starts = np.searchsorted(pairs[:, 0], np.arange(n + 1))
    for r in range(n):
        if rng.random() >= prob or starts[r + 1] == starts[r]:
            continue
        other = pairs[rng.integers(starts[r], starts[r + 1]), 1]
        parent[find(r)] = find(other)
    roots = np.array([find(r) for r in range(n)])
    out = ids.copy()
    sel = ids >= 0
    out[sel] = roots[ids[sel]]
    return out


def _jitter(ids: np.ndarray, amplitude: float, scale: float, rng: np.random.Generator) -> np.ndarray:
    if amplitude <= 0:
        return ids
    H, W = ids.shape
    dy, dx = gaussian_fields(rng, 2, (H, W), scale) * amplitude
    yy = np.clip(np.rint(np.arange(H)[:, None] + dy), 0, H - 1).astype(np.int64)
    xx = np.clip(np.rint(np.arange(W)[None, :] + dx), 0, W - 1).astype(np.int64)
    return ids[yy, xx]


def _uncover(ids: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """Mask ids with the masks whose ``flags`` are set turned into uncovered pixels (-1)."""
    if not flags.any():
        return ids
    return np.where((ids >= 0) & flags[np.maximum(ids, 0)], NO_MASK, ids).astype(np.int32)


def simulate_sam_masks(filled: np.ndarray, knobs: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One image: mask ids int32 [H, W] (-1 = uncovered; 0..M-1 by area from the smallest) and the majority
    ground-truth class of each mask (uint8 [M], 255 = unknown)."""
    ids = connected_regions(filled)
    ids, n = _relabel(ids)
    area = np.bincount(ids[ids >= 0], minlength=n)
    ids, n = _relabel(_uncover(ids, area < int(knobs["min_region_px"])))
    ids, n = _split(ids, n, knobs, rng)
    ids = _merge(ids, n, float(knobs["merge_prob"]), rng)
    ids, n = _relabel(ids)
    ids = _uncover(ids, rng.random(n) < float(knobs["drop_prob"]))
    ids = _jitter(ids, float(knobs["boundary_jitter_px"]), float(knobs["boundary_jitter_scale_px"]), rng)
    ids, n = _relabel(ids)
    area = np.bincount(ids[ids >= 0], minlength=n)
    if n == 0:  # every pixel uncovered (e.g. one region, dropped)
        return np.full(ids.shape, NO_MASK, dtype=np.int32), np.zeros(0, dtype=np.uint8)
    rank = np.empty(n, dtype=np.int32)
    rank[np.argsort(area, kind="stable")] = np.arange(n, dtype=np.int32)
    ids = np.where(ids >= 0, rank[np.maximum(ids, 0)], NO_MASK).astype(np.int32)
    # the majority class of each mask (256 bins: the unknown value 255 is a class here)
    sel = ids >= 0
    votes = np.bincount(ids[sel].astype(np.int64) * 256 + filled[sel], minlength=n * 256).reshape(n, 256)
    return ids, votes.argmax(1).astype(np.uint8)


def class_directions(num_classes: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """[L + 1, dim] unit vectors: one per class and a last one for unknown ground truth."""
    return unit_rows(rng.standard_normal((num_classes + 1, dim))).astype(np.float32)


def simulate_sam_embedding(ids: np.ndarray, mask_class: np.ndarray, directions: np.ndarray, grid, knobs: dict,
                           rng: np.random.Generator) -> np.ndarray:
    """float32 [S, h, w]: per mask a unit embedding ``sqrt(a) class_dir + sqrt(1 - a) own_dir`` (a =
    ``feat_class_weight``), uncovered pixels one random direction per image; each grid cell averages its
    pixels' embeddings (the grid spans the whole image), plus Gaussian noise of norm about ``feat_noise``."""
    H, W = ids.shape
    h, w = int(grid[0]), int(grid[1])
    S = directions.shape[1]
    n = len(mask_class)
    a = float(knobs["feat_class_weight"])
    cls = np.where(mask_class == IGNORE_INDEX, len(directions) - 1, mask_class).astype(np.int64)
    own = unit_rows(rng.standard_normal((n + 1, S)))
    emb = np.concatenate([own[:1], np.sqrt(a) * directions[cls] + np.sqrt(1 - a) * own[1:]])  # row 0: uncovered
    emb = unit_rows(emb)
    cy = np.minimum(np.arange(H) * h // H, h - 1)
    cx = np.minimum(np.arange(W) * w // W, w - 1)
    cell = (cy[:, None] * w + cx[None, :]).ravel()
    counts = np.bincount(cell * (n + 1) + (ids.ravel().astype(np.int64) + 1), minlength=h * w * (n + 1))
    frac = counts.reshape(h * w, n + 1).astype(np.float64)
    frac /= np.maximum(frac.sum(1, keepdims=True), 1e-12)
    out = frac @ emb + rng.standard_normal((h * w, S)) * (float(knobs["feat_noise"]) / np.sqrt(S))
    return out.T.reshape(S, h, w).astype(np.float32)
