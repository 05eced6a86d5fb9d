"""Statistics of a store as plain dicts (``cns-cli inspect summary``; ``--json`` prints the dict).

Every statistic is computed over the frames whose shard of the stage that writes its input is done. The
pseudo-label rows against ground truth are the label-only baselines of ``cns-cli eval`` (same row keys,
same confusion matrix, same transfer to points through the pairs), so the two commands agree on a store:

=========== ===================================================================================
clip_2d     ``clip/label`` against the 2D ground truth
wo_cns_2d   ``clip/label_refined`` (SAM max-voting, Eq. 4) against the 2D ground truth
clip_3d     ``clip/label`` read at each point's first paired pixel, against ``points/gt`` (a point
            without a pair counts as a miss of its true class)
wo_cns_3d   the same for ``clip/label_refined``
\*_paired   ``clip_3d`` / ``wo_cns_3d`` over the points with a pair only
=========== ===================================================================================

The 2D ground truth is ``images/gt``; a store with point labels only scores the pixels labelled points
project to (as ``cns-cli eval`` does). A store without points (``modalities: ["images"]``, nuImages) has
only the 2D rows; its ``points`` and ``pairs`` are ``None`` in the dict.
"""
from __future__ import annotations

import numpy as np
import torch

from data_cache import schema
from data_cache.schema import IGNORE_INDEX
from data_cache.validate import simulated_note

from .frames import StoreView

#: pseudo-label rows: key -> (label array, dimension)
PSEUDO_ROWS = {"clip_2d": ("clip/label", "2d"), "wo_cns_2d": ("clip/label_refined", "2d"),
               "clip_3d": ("clip/label", "3d"), "wo_cns_3d": ("clip/label_refined", "3d"),
               "clip_3d_paired": ("clip/label", "3d_paired"), "wo_cns_3d_paired": ("clip/label_refined", "3d_paired")}
#: mask-area histogram bins, as a share of the image (log-spaced, 1e-5 .. 1)
MASK_AREA_BINS = np.logspace(-5, 0, 21)


def sample_frames(num_frames: int, max_frames: int | None) -> np.ndarray:
    """All frames, or ``max_frames`` of them spread evenly (first and last included)."""
    if not max_frames or max_frames >= num_frames:
        return np.arange(num_frames)
    return np.unique(np.linspace(0, num_frames - 1, max_frames).round().astype(np.int64))


def _stats(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    if not len(v):
        return {"n": 0}
    return {"n": int(len(v)), "mean": float(v.mean()), "min": float(v.min()), "p10": float(np.percentile(v, 10)),
            "median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "max": float(v.max())}


def gt_2d(frame, pairs: dict | None) -> tuple[np.ndarray | None, str | None]:
    """The frame's 2D ground truth and where it comes from (``images/gt`` or the labelled points)."""
    from train.labels import points_to_pixels
    gt = frame.images("images/gt")
    if gt is not None:
        return gt, "images/gt"
    point_gt = frame.points("points/gt")
    if point_gt is None or pairs is None:
        return None, None
    h, w = frame.view.attrs.image_size
    pix = points_to_pixels(torch.from_numpy(point_gt.astype(np.int64)), *_pair_tensors(pairs),
                           (frame.num_images, h, w))
    return pix.numpy(), "points/gt projected to their pixels"


def _pair_tensors(pairs: dict):
    return (torch.from_numpy(pairs["point"]), torch.from_numpy(pairs["image"]), torch.from_numpy(pairs["uv"]))


def labels_to_points(labels: np.ndarray, pairs: dict, num_points: int) -> np.ndarray:
    """Pixel labels [I, H, W] of a frame read at each point's first paired pixel (255 without a pair)."""
    from train.labels import pixels_to_points
    return pixels_to_points(torch.from_numpy(labels), *_pair_tensors(pairs), num_points).numpy()


def scored_rows(frame, maps: dict, predictions: dict | None = None):
    """``(row key, prediction, ground truth, 2D GT source)`` for each row the frame can score: the pseudo-label
    rows of :data:`PSEUDO_ROWS` for the label maps in ``maps`` (array name -> [I, H, W]) and, given the
    run's ``predictions``, ``cns_2d``/``cns_3d`` (the rows of ``cns-cli eval``)."""
    pairs = frame.pairs
    gt2, source = gt_2d(frame, pairs)
    gt3 = frame.points("points/gt")
    for key, (name, dim) in PSEUDO_ROWS.items():
        if name not in maps:
            continue
        if dim == "2d" and gt2 is not None:
            yield key, maps[name], gt2, source
        elif dim.startswith("3d") and gt3 is not None and pairs is not None:
            projected = labels_to_points(maps[name], pairs, frame.num_points)
            if dim == "3d_paired":  # points without a pair are left out (255) rather than missed
                paired = np.zeros(frame.num_points, bool)
                paired[pairs["point"]] = True
                yield key, projected, np.where(paired, gt3, IGNORE_INDEX), None
            else:
                yield key, projected, gt3, None
    if predictions is not None:
        if predictions.get("pred2d") is not None and gt2 is not None:
            yield "cns_2d", predictions["pred2d"], gt2, source
        if gt3 is not None and predictions.get("pred3d") is not None:
            yield "cns_3d", predictions["pred3d"], gt3, None


def summarize(view: StoreView, max_frames: int | None = None, progress: bool = False) -> dict:
    """The statistics of ``view`` (over ``max_frames`` frames spread evenly, or all)."""
    from tqdm import tqdm

    from train.evaluate import ConfusionMatrix
    attrs = view.attrs
    names = view.class_names
    L = len(names)
    frames = sample_frames(view.num_frames, max_frames)
    out = {
        "store": str(view.path), "dataset": attrs.dataset, "split": attrs.split,
        "schema_version": attrs.schema_version, "class_names": names, "image_size": list(attrs.image_size),
        "modalities": list(attrs.modalities), "frames": view.num_frames, "images": int(view.image_off[-1]),
        "points": int(view.point_off[-1]) if view.has_points else None,
        "frames_sampled": int(len(frames)), "stages": view.stage_rows(),
        "simulated": simulated_note(view.store),
        "teacher": schema.teacher_line(schema.teacher_of(view.store.raw_attrs.get("stages", {}))),
    }
    pair_counts, pair_frames, pair_points = [], 0, 0
    masks_per_image, coverage, mask_areas, sam_images = [], [], [], 0
    hist = {"clip/label": np.zeros(256, np.int64), "clip/label_refined": np.zeros(256, np.int64)}
    hist_images = {"clip/label": 0, "clip/label_refined": 0}
    changed = compared = changed_images = 0
    confusion = {k: ConfusionMatrix(L) for k in PSEUDO_ROWS}
    frames_scored = {k: 0 for k in PSEUDO_ROWS}
    gt2d_source = None
    for f in tqdm(frames, disable=not progress, desc="frames", leave=False):
        fr = view.frame(int(f))
        pairs = fr.pairs
        if pairs is not None:
            pair_counts.append(np.bincount(pairs["point"], minlength=fr.num_points))
            pair_frames += 1
            pair_points += fr.num_points
        ids = fr.images("sam/mask_id")
        if ids is not None:
            h, w = ids.shape[1:]
            for im in ids:
                inside = im[im >= 0]
                sizes = np.bincount(inside)
                sizes = sizes[sizes > 0]
                masks_per_image.append(len(sizes))
                coverage.append(len(inside) / im.size)
                mask_areas.append(sizes / (h * w))
            sam_images += len(ids)
        maps = {}
        for name in hist:
            lab = fr.images(name)
            if lab is not None:
                maps[name] = lab
                hist[name] += np.bincount(lab.ravel(), minlength=256)
                hist_images[name] += len(lab)
        if len(maps) == 2:
            diff = int((maps["clip/label"] != maps["clip/label_refined"]).sum())
            changed += diff
            compared += maps["clip/label"].size
            changed_images += len(maps["clip/label"])
        if not maps:
            continue
        for key, pred, gt, source in scored_rows(fr, maps):
            confusion[key].update(torch.from_numpy(pred), torch.from_numpy(gt))
            frames_scored[key] += 1
            gt2d_source = source or gt2d_source

    counts = np.concatenate(pair_counts) if pair_counts else np.zeros(0, np.int64)
    paired = counts > 0
    out["pairs"] = None if not view.has_points else {
        "frames": pair_frames, "points": pair_points, "pairs": int(counts.sum()),
        "points_with_pixel": int(paired.sum()),
        "share_points_with_pixel": float(paired.mean()) if len(counts) else None,
        "pixels_per_point": float(counts.mean()) if len(counts) else None,
        "pixels_per_paired_point": float(counts[paired].mean()) if paired.any() else None,
        "pixels_per_point_histogram": np.bincount(counts).tolist() if len(counts) else [],
    }
    areas = np.concatenate(mask_areas) if mask_areas else np.zeros(0)
    out["sam"] = {
        "images": sam_images, "masks": int(len(areas)), "masks_per_image": _stats(masks_per_image),
        "pixel_coverage": _stats(coverage), "mask_area_share": _stats(areas),
        "mask_area_histogram": {"bin_edges": MASK_AREA_BINS.tolist(),
                                "counts": np.histogram(areas, MASK_AREA_BINS)[0].tolist()},
    }
    out["labels"] = {}
    for name, h in hist.items():
        out["labels"][name] = {"images": hist_images[name], "pixels": int(h.sum()),
                               "histogram": {n: int(h[i]) for i, n in enumerate(names)},
                               "unlabelled": int(h.sum() - h[:L].sum())}
    out["refinement"] = {"images": changed_images, "pixels": compared, "changed_pixels": changed,
                         "share_changed": changed / compared if compared else None}
    rows = {}
    for key, cm in confusion.items():
        if frames_scored[key]:
            rows[key] = {**cm.summary(names), "frames": frames_scored[key], "confusion": cm.m.tolist()}
    out["ground_truth"] = {"image_gt": gt2d_source, "point_gt": "points/gt" in view.store, "rows": rows}
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _num(x, fmt=".1f") -> str:
    return "-" if x is None else format(x, fmt)


def format_summary(s: dict) -> str:
    """The summary as plain-text tables."""
    from train.evaluate import ROW_TITLES
    lines = ([f"NOTE      {s['simulated']}"] if s.get("simulated") else []) + [
             f"store     {s['store']}",
             f"dataset   {s['dataset']}/{s['split']}, schema {s['schema_version']}, {len(s['class_names'])} classes, "
             f"images {s['image_size'][0]}x{s['image_size'][1]}",
             f"contents  {s['frames']} frames, {s['images']} images, "
             + (f"{s['points']} points" if s["points"] is not None else "no points (a 2D-only store: no point "
                                                                       "clouds, no pairs, no 3D rows)")
             + (f"  (statistics over {s['frames_sampled']} frames spread evenly)"
                if s["frames_sampled"] < s["frames"] else ""),
             *([f"teacher   {s['teacher'][len('teacher: '):]}"] if s.get("teacher") else []),
             "", f"{'stage':<11} {'shards':>9} {'frames':>9}  state"]
    for r in s["stages"]:
        state = "complete" if r["complete"] else ("partial" if r["done"] else "not run")
        fail = f", {r['failed_frames']} failed frame(s)" if r["failed_frames"] else ""
        lines.append(f"{r['stage']:<11} {r['done']:>4}/{r['total']:<4} {r['frames_done']:>4}/{s['frames']:<4}  "
                     f"{state}{fail}")
    p = s["pairs"]
    if p is not None:
        lines += ["", f"pairs     {p['pairs']} point-pixel pairs over {p['frames']} frames"]
    if p is not None and p["points"]:
        lines.append(f"          points with a pixel {p['points_with_pixel']}/{p['points']} "
                     f"({_pct(p['share_points_with_pixel'])}); pixels per point {_num(p['pixels_per_point'], '.2f')}, "
                     f"per paired point {_num(p['pixels_per_paired_point'], '.2f')}")
    m = s["sam"]
    if m["images"]:
        mp, cov, area = m["masks_per_image"], m["pixel_coverage"], m["mask_area_share"]
        lines += ["", f"SAM       {m['masks']} masks over {m['images']} images; masks per image mean {mp['mean']:.1f} "
                      f"(min {mp['min']:.0f}, median {mp['median']:.0f}, max {mp['max']:.0f})",
                  f"          pixels covered by a mask {_pct(cov['mean'])} (min {_pct(cov['min'])})"]
        if area["n"]:
            lines.append(f"          mask area: median {_pct(area['median'])} of the image (10 % below "
                         f"{_pct(area['p10'])}, 10 % above {_pct(area['p90'])})")
    else:
        lines += ["", "SAM       no done shard of the sam stage"]
    raw, ref = s["labels"]["clip/label"], s["labels"]["clip/label_refined"]
    if raw["images"] or ref["images"]:
        width = max(len(n) for n in s["class_names"] + ["unlabelled"])
        lines += ["", f"{'class':<{width}}  {'CLIP labels':>16}  {'SAM-refined':>16}"
                      + (f"  ({s['teacher']})" if s.get("teacher") else "")]
        for n in s["class_names"] + ["unlabelled"]:
            cells = []
            for h in (raw, ref):
                c = h["unlabelled"] if n == "unlabelled" else h["histogram"][n]
                cells.append(f"{c:>9} {100 * c / h['pixels']:5.1f} %" if h["pixels"] else f"{'-':>16}")
            lines.append(f"{n:<{width}}  {cells[0]:>16}  {cells[1]:>16}")
        lines.append(f"{'images':<{width}}  {raw['images']:>16}  {ref['images']:>16}")
        r = s["refinement"]
        if r["images"]:
            lines.append(f"refinement changed {r['changed_pixels']} of {r['pixels']} pixels "
                         f"({_pct(r['share_changed'])}) over {r['images']} images")
    else:
        lines += ["", "labels    no done shard of the maskclip or refine stage"]
    g = s["ground_truth"]
    if g["rows"]:
        names = s["class_names"]
        width = max(len(ROW_TITLES[k]) for k in g["rows"])
        lines += ["", f"pseudo-labels against ground truth (2D: {g['image_gt'] or '-'}"
                      + ("; 3D: points/gt" if s["points"] is not None else "; no 3D rows: no points") + "), IoU %"
                      + (f"; {s['teacher']}" if s.get("teacher") else ""),
                  f"{'row':<{width}}  {'mIoU':>6}  " + " ".join(f"{n[:8]:>8}" for n in names)]
        for k, r in g["rows"].items():
            ious = " ".join(f"{'-' if r['iou'][n] is None else format(r['iou'][n], '.1f'):>8}" for n in names)
            lines.append(f"{ROW_TITLES[k]:<{width}}  {r['miou']:6.1f}  {ious}")
    elif not g["point_gt"] and not g["image_gt"]:
        lines += ["", "no ground truth in this store"]
    return "\n".join(lines)


def frame_confusions(frame, predictions: dict | None = None, into: dict | None = None) -> dict:
    """Confusion matrices (:class:`train.evaluate.ConfusionMatrix`) of the frame's pseudo-labels (and
    predictions) against its ground truth, added to ``into`` (row key -> matrix) when given."""
    from train.evaluate import ConfusionMatrix
    into = {} if into is None else into
    maps = {n: m for n in ("clip/label", "clip/label_refined") if (m := frame.images(n)) is not None}
    for key, pred, gt, _ in scored_rows(frame, maps, predictions):
        into.setdefault(key, ConfusionMatrix(len(frame.view.class_names))).update(
            torch.from_numpy(np.asarray(pred)), torch.from_numpy(np.asarray(gt)))
    return into
