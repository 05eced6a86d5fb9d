"""The pictures of one frame, shared by ``cns-cli inspect frame`` (PNG files) and the report (inlined).

Per image: the image, its 2D ground truth, the raw and the SAM-refined CLIP labels, the SAM masks, the
projected points coloured by their label (ground truth where the store has it, else the transferred
pseudo-label) and by depth, and with a run the 2D prediction and the points coloured by the 3D prediction.
Per frame: bird's-eye views of the points coloured by their transferred labels (and ground truth and 3D
prediction). Only what the store's done shards hold is drawn; a store without points (nuImages) gets the
image pictures only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import render
from .palettes import Palette, palette_for
from .summary import labels_to_points


@dataclass
class FramePictures:
    """Everything drawn for a frame: ``images[k]`` = ``[(key, title, uint8 array), ...]`` per image ``k``,
    ``bev`` = ``[(key, title, labels [P]), ...]``, the classes that occur, the depth scale, notes."""

    frame: object
    palette: Palette
    images: dict = field(default_factory=dict)
    bev: list = field(default_factory=list)
    present: set = field(default_factory=set)
    depth_max: float | None = None
    notes: list = field(default_factory=list)
    point_labels: dict = field(default_factory=dict)


def point_label_sets(frame, predictions: dict | None = None) -> dict:
    """Per-point labels of the frame: ``gt``, ``refined`` / ``clip`` (pseudo-labels transferred through the
    pairs) and ``pred3d``; each ``(title, labels [P])``."""
    out = {}
    gt = frame.points("points/gt")
    if gt is not None:
        out["gt"] = ("ground truth", gt)
    pairs = frame.pairs
    if pairs is not None:
        for key, name, title in (("refined", "clip/label_refined", "SAM-refined CLIP labels"),
                                 ("clip", "clip/label", "CLIP labels")):
            lab = frame.images(name)
            if lab is not None:
                out[key] = (f"{title} (transferred)", labels_to_points(lab, pairs, frame.num_points).astype(np.uint8))
    if predictions is not None and predictions.get("pred3d") is not None:  # None: a 2D-only run
        out["pred3d"] = ("3D prediction", predictions["pred3d"])
    return out


def frame_pictures(frame, images, scale: int = 2, predictions: dict | None = None, grow: int = 1,
                   point_scale: int | None = None) -> FramePictures:
    """Draw the frame's ``images`` (indices within the frame); projected points at ``point_scale`` (default
    ``scale``), grown by ``grow`` picture pixels."""
    view = frame.view
    palette = palette_for(view.class_names)
    L = len(view.class_names)
    pics = FramePictures(frame, palette)
    pairs = frame.pairs
    if not view.has_points:
        pics.notes.append("the store has no points (a 2D-only store): no projected points, no bird's-eye view")
    elif pairs is None:
        pics.notes.append("no pairs: the frame's correspond shard is not done")
    labels3d = point_label_sets(frame, predictions)
    pics.point_labels = labels3d
    for stage in ("maskclip", "sam", "refine"):
        if not view.done_frames(stage)[frame.index]:
            pics.notes.append(f"no {stage} output for this frame yet (its {stage} shard is not done)")
    if pairs is not None and len(pairs["depth"]):
        _, pics.depth_max = render.depth_colours(pairs["depth"])
    h, w = view.attrs.image_size
    xyz = frame.points("points/xyz")
    ps = point_scale or scale
    for k in images:
        panels = []
        rgb = frame.images("images/rgb", [k])
        rgb = rgb[0] if rgb is not None else np.zeros((h, w, 3), np.uint8)
        name = frame.image_names[k]
        panels.append(("rgb", f"{name}", render.upscale(rgb, scale)))
        for arr, key, title in (("images/gt", "gt", "2D ground truth"), ("clip/label", "clip_label", "CLIP labels"),
                                ("clip/label_refined", "clip_label_refined", "SAM-refined CLIP labels (Eq. 4)")):
            lab = frame.images(arr, [k])
            if lab is not None:
                panels.append((key, title, render.label_picture(lab[0], palette, scale)))
                pics.present |= set(np.unique(lab[0][lab[0] < L]).tolist())
        if predictions is not None and predictions.get("pred2d") is not None:
            p2 = predictions["pred2d"][k]
            panels.append(("pred2d", "2D prediction", render.label_picture(p2, palette, scale)))
            pics.present |= set(np.unique(p2[p2 < L]).tolist())
        ids = frame.images("sam/mask_id", [k])
        if ids is not None:
            n = len(np.unique(ids[0][ids[0] >= 0]))
            panels.append(("sam_masks", f"SAM masks ({n})", render.sam_picture(rgb, ids[0], scale)))
        ip = frame.image_pairs(k)
        if ip is not None:
            pseudo = "refined" if "refined" in labels3d else "clip"
            for key3, short in (("gt", "points_gt"), (pseudo, "points_label"), ("pred3d", "points_pred3d")):
                if key3 not in labels3d:
                    continue
                title, lab = labels3d[key3]
                seen = lab[ip["point"]]
                panels.append((short, f"points: {title}", render.points_picture(
                    rgb, (h, w), ip["uv"], palette.colourize(seen), ip["depth"], ps, grow)))
                pics.present |= set(np.unique(seen[seen < L]).tolist())
            colours, _ = render.depth_colours(ip["depth"], pics.depth_max)
            panels.append(("points_depth", f"points by depth (0-{pics.depth_max or 0:.0f} m), {len(ip['point'])}",
                           render.points_picture(rgb, (h, w), ip["uv"], colours, ip["depth"], ps, grow)))
        pics.images[k] = panels
    if xyz is not None:
        for key3 in ("refined", "clip", "gt", "pred3d"):
            if key3 in labels3d and not (key3 == "clip" and "refined" in labels3d):
                title, lab = labels3d[key3]
                pics.bev.append((f"bev_{key3}", f"bird's-eye view: {title}", lab))
                pics.present |= set(np.unique(lab[lab < L]).tolist())
        if not pics.bev:
            pics.bev.append(("bev", "bird's-eye view (no labels yet)", np.full(len(xyz), 255, np.uint8)))
    return pics


def confusion_sheet(confusions: dict, class_names, title: str):
    """Heat maps of the rows in ``confusions`` (eval's row key -> ConfusionMatrix): one line per dimension
    (2D, 3D), one column per source (CLIP labels, SAM-refined, the run's network)."""
    from train.evaluate import ROW_TITLES
    plt = render.pyplot()
    kinds = [k for k in ("clip", "wo_cns", "cns") if any(f"{k}_{d}" in confusions for d in ("2d", "3d"))]
    dims = [d for d in ("2d", "3d") if any(f"{k}_{d}" in confusions for k in kinds)]
    size = 1.6 + 0.22 * len(class_names)
    fig, axes = plt.subplots(len(dims), len(kinds), figsize=(len(kinds) * (size + 0.3), len(dims) * (size + 0.4) + 0.5),
                             dpi=90, squeeze=False)
    for r, d in enumerate(dims):
        for c, k in enumerate(kinds):
            ax, key = axes[r, c], f"{k}_{d}"
            if key not in confusions:
                ax.axis("off")
                continue
            cm = confusions[key]
            miou = cm.summary(class_names)["miou"]
            render.confusion_figure(cm.m.numpy(), class_names, f"{ROW_TITLES[key]}\nmIoU {miou:.1f}", ax=ax)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return fig


def write_frame(view, index: int, images, out_dir, scale: int = 2, predictor=None) -> tuple[list, list]:
    """PNG files of the frame's pictures in ``out_dir`` (created here) and ``frame.json`` naming them.
    Returns the files written and the notes on what the store does not hold yet."""
    import json
    from pathlib import Path
    frame = view.frame(index)
    predictions = predictor.predict(index) if predictor is not None else None
    pics = frame_pictures(frame, images, scale, predictions)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, index_json = [], {"store": str(view.path), "frame": index, "token": frame.token, "images": {},
                                "notes": pics.notes, "palette": pics.palette.name}
    xyz = frame.points("points/xyz")
    for k, panels in pics.images.items():
        name = frame.image_names[k]
        prefix = f"{k:02d}_{name}"
        files = {}
        for key, title, img in panels:
            files[key] = render.save_png(img, out / f"{prefix}_{key}.png").name
            written.append(out / files[key])
        bev = None
        if pics.bev:
            _, title, lab = pics.bev[0]
            bev = (xyz, lab, title)
        sheet = render.sheet_figure([(t, img) for _, t, img in panels], pics.palette, pics.present, bev,
                                    pics.depth_max, f"{view.attrs.dataset} frame {index} ({frame.token}), "
                                                    f"image {k} ({name})")
        files["sheet"] = render.save_figure(sheet, out / f"{prefix}_sheet.png").name
        written.append(out / files["sheet"])
        index_json["images"][name] = files
    for key, title, lab in pics.bev:
        written.append(render.save_figure(render.bev_figure(xyz, lab, pics.palette, title), out / f"{key}.png"))
    written.append(render.save_figure(render.legend_figure(pics.palette), out / "legend.png"))
    from .summary import frame_confusions
    conf = frame_confusions(frame, predictions)
    if conf:
        fig = confusion_sheet(conf, view.class_names, f"frame {index} ({frame.token}) against ground truth")
        written.append(render.save_figure(fig, out / "confusion.png"))
    index_json["files"] = sorted(p.name for p in written)
    (out / "frame.json").write_text(json.dumps(index_json, indent=1))
    return written + [out / "frame.json"], pics.notes
