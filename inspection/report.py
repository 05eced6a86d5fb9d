"""``cns-cli inspect report``: one self-contained static HTML page (no server, no network).

Every picture is a PNG inlined as a data URI; the interactive 3D views are plotly figures whose JavaScript
library is embedded once in the page (only when it has a 3D view), so the file opens from disk in any
browser, offline. Sections: the store's summary tables, its histograms as charts, pseudo-labels against
ground truth (tables and confusion heat maps), with a run its evaluation tables against the baselines and
the paper, its training curves and its predictions, and a gallery of frames with a 3D view of each frame's
points (a store without points: the image pictures only).
"""
from __future__ import annotations

import base64
import datetime
import html
from pathlib import Path

import numpy as np

from . import render
from .palettes import palette_for
from .pictures import confusion_sheet, frame_pictures
from .summary import format_summary, frame_confusions, sample_frames, summarize

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px; color: #222; max-width: 1500px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccc; }
h3 { font-size: 15px; margin-bottom: 6px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; white-space: nowrap; }
.scroll { overflow-x: auto; }
th { background: #f0f0f0; }
.panels { display: grid; grid-template-columns: repeat(4, 1fr); gap: 8px; }
.panels.two { grid-template-columns: repeat(2, 1fr); max-width: 1100px; }
.panels figure { margin: 0; } .panels img { width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
figcaption { font-size: 12px; color: #444; }
img.chart { max-width: 100%; border: 0; }
.note { color: #8a5a00; font-size: 13px; }
.view3d { height: 520px; border: 1px solid #ddd; }
pre { background: #f7f7f7; padding: 8px; font-size: 12px; overflow-x: auto; }
"""


def _img(png: bytes, alt: str, cls: str = "") -> str:
    b64 = base64.b64encode(png).decode("ascii")
    c = f' class="{cls}"' if cls else ""
    return f'<img{c} alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _table(header: list, rows: list) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _iou_rows(rows: dict, names: list, titles: dict) -> list:
    out = []
    for key, title in titles.items():
        if key in rows:
            r = rows[key]
            out.append([title, f"{r['miou']:.1f}"] + ["-" if r["iou"].get(n) is None else f"{r['iou'][n]:.1f}"
                                                      for n in names])
    return out


def summary_section(s: dict, palette) -> str:
    from train.evaluate import ROW_TITLES
    parts = ["<h2>Store</h2>",
             _table(["", "value"], [["store", s["store"]], ["dataset / split", f"{s['dataset']} / {s['split']}"],
                                    ["schema version", s["schema_version"]],
                                    ["classes", f"{len(s['class_names'])} ({palette.name} colours)"],
                                    ["image size (H x W)", "x".join(map(str, s["image_size"]))],
                                    ["frames / images / points", f"{s['frames']} / {s['images']} / "
                                     + (str(s["points"]) if s["points"] is not None else "no points (2D only)")],
                                    ["statistics over", f"{s['frames_sampled']} frame(s)"]]),
             "<h3>Stages</h3>",
             _table(["stage", "shards done", "frames done", "state", "failed frames"],
                    [[r["stage"], f"{r['done']}/{r['total']}", f"{r['frames_done']}/{s['frames']}",
                      "complete" if r["complete"] else ("partial" if r["done"] else "not run"), r["failed_frames"]]
                     for r in s["stages"]])]
    p = s["pairs"]
    if p is None:
        parts.append("<p class='note'>This store has no points (modalities: images only): no point-pixel pairs, "
                     "no 3D rows, no bird's-eye or 3D views.</p>")
    else:
        parts += ["<h3>Point-pixel pairs</h3>",
                  _table(["", "value"], [["frames with pairs", p["frames"]], ["pairs", p["pairs"]],
                                         ["points with at least one pixel",
                                          f"{p['points_with_pixel']} of {p['points']} ({_pct(p['share_points_with_pixel'])})"],
                                         ["pixels per point", "-" if p["pixels_per_point"] is None
                                          else f"{p['pixels_per_point']:.2f}"],
                                         ["pixels per paired point", "-" if p["pixels_per_paired_point"] is None
                                          else f"{p['pixels_per_paired_point']:.2f}"]])]
    m = s["sam"]
    if m["images"]:
        mp, cov, area = m["masks_per_image"], m["pixel_coverage"], m["mask_area_share"]
        parts += ["<h3>SAM masks</h3>",
                  _table(["", "mean", "min", "median", "max"],
                         [["masks per image", f"{mp['mean']:.1f}", f"{mp['min']:.0f}", f"{mp['median']:.0f}",
                           f"{mp['max']:.0f}"],
                          ["pixels covered by a mask", _pct(cov["mean"]), _pct(cov["min"]), _pct(cov["median"]),
                           _pct(cov["max"])]]
                         + ([["mask area (share of the image)", _pct(area["mean"]), _pct(area["min"]),
                              _pct(area["median"]), _pct(area["max"])]] if area["n"] else []))]
    if (p is not None and p["frames"]) or m["images"]:
        parts.append(_img(render.png_bytes(render.sam_figure(s)), "SAM mask areas and pairs per point", "chart"))
    raw, ref = s["labels"]["clip/label"], s["labels"]["clip/label_refined"]
    if raw["pixels"] or ref["pixels"]:
        r = s["refinement"]
        parts += ["<h2>Pseudo-labels</h2>",
                  *([f"<p class='teacher'>{html.escape(s['teacher'])}</p>"] if s.get("teacher") else []),
                  _img(render.png_bytes(render.class_histogram_figure(s, palette)), "class histogram", "chart"),
                  _table(["class", "CLIP labels (pixels)", "%", "SAM-refined (pixels)", "%"],
                         [[n, raw["histogram"][n], _pct(raw["histogram"][n] / raw["pixels"]) if raw["pixels"] else "-",
                           ref["histogram"][n], _pct(ref["histogram"][n] / ref["pixels"]) if ref["pixels"] else "-"]
                          for n in s["class_names"]]),
                  f"<p>Refinement (Eq. 4) changed {r['changed_pixels']} of {r['pixels']} pixels "
                  f"({_pct(r['share_changed'])}) over {r['images']} images.</p>"]
    g = s["ground_truth"]
    if g["rows"]:
        names = s["class_names"]
        parts += ["<h3>Pseudo-labels against ground truth (IoU %)</h3>",
                  f"<p>2D ground truth: {html.escape(str(g['image_gt']))}; "
                  f"{'3D: points/gt' if s['points'] is not None else 'no 3D rows (no points)'}. The rows of "
                  f"<code>cns-cli eval</code>'s label-only baselines"
                  + (f"; {html.escape(s['teacher'])}" if s.get("teacher") else "") + ".</p>",
                  _table(["row", "mIoU"] + names, _iou_rows(g["rows"], names, ROW_TITLES))]
        from train.evaluate import ConfusionMatrix
        import torch
        cms = {}
        for k, r in g["rows"].items():
            cm = ConfusionMatrix(len(names))
            cm.m = torch.tensor(r["confusion"], dtype=torch.long)
            cms[k] = cm
        parts.append(_img(render.png_bytes(confusion_sheet(cms, names, "pseudo-labels against ground truth, "
                                                                        f"{s['frames_sampled']} frames")),
                          "confusion matrices", "chart"))
    parts.append(f"<details><summary>summary as text</summary><pre>{html.escape(format_summary(s))}</pre></details>")
    return "\n".join(parts)


def run_section(run, dataset: str, class_names: list, pred_confusions: dict | None, gallery_size: int) -> str:
    from train.evaluate import PAPER_REFERENCE, REFERENCE_NOTE, ROW_TITLES
    parts = [f"<h2>Training run {html.escape(str(run.path))}</h2>"]
    ev = run.eval_result()
    if ev is not None:
        names = ev.get("class_names", class_names)
        parts += ["<h3>Evaluation (<code>cns-cli eval</code>, eval/metrics.json), IoU %</h3>",
                  _table(["method", "mIoU"] + names, _iou_rows(ev["rows"], names, ROW_TITLES))]
        ref = PAPER_REFERENCE.get(ev.get("dataset") or dataset, [])
        if ref:
            parts += ["<p>Reported in the paper (label-free mIoU, full datasets; for reference only):</p>",
                      _table(["method", "mIoU"], [[t, f"{v:.1f}"] for t, v in ref]),
                      f"<p>{html.escape(REFERENCE_NOTE[0].upper() + REFERENCE_NOTE[1:])}.</p>"]
    else:
        parts.append('<p class="note">no eval/metrics.json yet (run <code>cns-cli eval --run ...</code>)</p>')
    records = run.metrics()
    if records:
        parts += ["<h3>Training curves (metrics.jsonl)</h3>",
                  _img(render.png_bytes(curves_figure(records)), "training curves", "chart")]
    else:
        parts.append('<p class="note">no metrics.jsonl records yet</p>')
    if pred_confusions:
        parts += ["<h3>Predictions against ground truth</h3>",
                  _img(render.png_bytes(confusion_sheet(pred_confusions, class_names,
                                                        f"the {gallery_size} gallery frames")),
                       "confusion matrices of the predictions", "chart")]
    return "\n".join(parts)


def curves_figure(records: list):
    """Losses, learning rate, realised label-source shares and evaluation mIoU over the training steps."""
    from matplotlib.ticker import MaxNLocator

    from .run import curves
    plt = render.pyplot()
    c = curves(records)
    panels = [("losses", "loss", c["losses"], "log"), ("shares", "label-source share", c["shares"], "linear"),
              ("miou", "mIoU (evaluation)", c["miou"], "linear"), ("lr", "learning rate", c["lr"], "linear")]
    panels = [p for p in panels if p[2]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), dpi=100, squeeze=False)
    for ax, (_, title, series, yscale) in zip(axes[0], panels):
        for key, (x, y) in series.items():
            ax.plot(x, y, marker="o" if len(x) < 20 else None, ms=3, lw=1.2, label=key)
        for step in c["stage_changes"]:
            ax.axvline(step, color="0.6", ls="--", lw=0.8)
        if yscale == "log" and all((y > 0).all() for _, y in series.values()):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, framealpha=0.8)
    if c["stage_changes"]:
        fig.text(0.01, 0.01, "dashed: stage 1 -> stage 2", fontsize=7, color="0.4")
    fig.tight_layout()
    return fig


def view3d_html(xyz: np.ndarray, label_sets: dict, palette, div_id: str, max_points: int, seed: int = 0) -> str:
    """A plotly 3D scatter of the points, one trace per class per colouring, switched by buttons."""
    import plotly.graph_objects as go
    n = len(xyz)
    keep = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False)) if n > max_points else np.arange(n)
    pts = np.asarray(xyz, np.float32)[keep]
    L = len(palette.class_names)
    if not label_sets:
        label_sets = {"none": ("points", np.full(n, 255, np.uint8))}
    fig = go.Figure()
    owners = []
    for j, (key, (title, labels)) in enumerate(label_sets.items()):
        lab = np.asarray(labels)[keep]
        for c in list(np.unique(lab[lab < L])) + [255]:
            sel = lab == c if c < L else lab >= L
            if not sel.any():
                continue
            name = palette.class_names[c] if c < L else "no label"
            colour = palette.hex(c) if c < L else "#969696"
            fig.add_trace(go.Scatter3d(x=pts[sel, 0], y=pts[sel, 1], z=pts[sel, 2], mode="markers", name=name,
                                       marker={"size": 1.6, "color": colour}, visible=j == 0,
                                       legendgroup=key, hoverinfo="name"))
            owners.append(j)
    buttons = [{"label": title, "method": "update",
                "args": [{"visible": [o == j for o in owners]}, {"title.text": f"coloured by {title}"}]}
               for j, (title, _) in enumerate(label_sets.values())]
    first = next(iter(label_sets.values()))[0]
    fig.update_layout(
        title={"text": f"coloured by {first}", "font": {"size": 13}},
        scene={"aspectmode": "data", "xaxis": {"title": {"text": "x"}}, "yaxis": {"title": {"text": "y"}},
               "zaxis": {"title": {"text": "z"}}},
        margin={"l": 0, "r": 0, "t": 40, "b": 0}, height=520, legend={"font": {"size": 10}, "itemsizing": "constant"},
        updatemenus=[{"type": "buttons", "direction": "right", "x": 0.0, "y": 1.0, "xanchor": "left",
                      "yanchor": "bottom", "buttons": buttons, "pad": {"t": 0, "b": 4}}] if len(buttons) > 1 else [])
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def gallery_section(view, frames, images_per_frame: int, predictor, max_points: int, point_scale: int,
                    confusions: dict) -> str:
    parts = [f"<h2>Gallery ({len(frames)} frame{'s' if len(frames) != 1 else ''})</h2>"]
    for f in frames:
        frame = view.frame(int(f))
        predictions = predictor.predict(int(f)) if predictor is not None else None
        if predictor is not None:
            frame_confusions(frame, predictions, confusions)
        n = frame.num_images
        images = sorted(set(np.linspace(0, n - 1, min(images_per_frame, n)).round().astype(int).tolist())) if n else []
        pics = frame_pictures(frame, images, 1, predictions, grow=1, point_scale=point_scale)
        parts.append(f"<h3>frame {int(f)} &middot; {html.escape(frame.token)}</h3>")
        parts += [f'<p class="note">{html.escape(n)}</p>' for n in pics.notes]
        for k, panels in pics.images.items():
            figs = "".join(f"<figure>{_img(render.png_bytes(img), title)}<figcaption>{html.escape(title)}"
                           f"</figcaption></figure>" for _, title, img in panels)
            parts.append(f"<p>image {k}: {html.escape(frame.image_names[k])}</p><div class='panels'>{figs}</div>")
        xyz = frame.points("points/xyz")
        if xyz is not None and pics.bev:
            parts.append("<div class='panels two'>" + "".join(
                f"<figure>{_img(render.png_bytes(render.bev_figure(xyz, lab, pics.palette, title)), title)}</figure>"
                for _, title, lab in pics.bev) + "</div>")
            sets = {k: v for k, v in pics.point_labels.items() if not (k == "clip" and "refined" in pics.point_labels)}
            shown = min(max_points, len(xyz))
            parts.append(f"<p>3D view: {shown} of {len(xyz)} points (drag to rotate, scroll to zoom; the buttons "
                         f"switch the colouring)</p><div class='view3d'>"
                         f"{view3d_html(xyz, sets, pics.palette, f'view3d-{int(f)}', max_points)}</div>")
    return "\n".join(parts)


def build_report(view, out_dir, num_frames: int = 4, images_per_frame: int = 1, run=None, predictor=None,
                 max_frames: int | None = None, max_points: int = 20000, point_scale: int = 2) -> Path:
    """Write ``out_dir/report.html`` and return its path."""
    from plotly.offline import get_plotlyjs
    palette = palette_for(view.class_names)
    s = summarize(view, max_frames=max_frames)
    ingested = np.flatnonzero(view.done_frames("correspond"))
    frames = ingested[sample_frames(len(ingested), num_frames)] if len(ingested) and num_frames else []
    confusions: dict = {}
    gallery = gallery_section(view, frames, images_per_frame, predictor, max_points, point_scale, confusions)
    body = [f"<h1>CNS cache report: {html.escape(view.path.name)}</h1>",
            f"<p>{html.escape(str(view.path))} &middot; generated "
            f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} by <code>cns-cli inspect report</code></p>",
            *([f"<p class='simulated'><strong>{html.escape(s['simulated'])}</strong></p>"] if s.get("simulated")
              else []),
            *([f"<p class='teacher'>{html.escape(s['teacher'])}</p>"] if s.get("teacher") else []),
            summary_section(s, palette)]
    if run is not None:
        body.append(run_section(run, view.attrs.dataset, view.class_names, confusions, len(frames)))
    body.append(gallery)
    page = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>CNS report {html.escape(view.path.name)}</title><style>{CSS}</style>"
            + (f"<script type='text/javascript'>{get_plotlyjs()}</script>" if "class='view3d'" in gallery else "")
            + "</head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    tmp = out / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
