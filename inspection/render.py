"""Pictures: exact rasters of label maps, SAM masks and projected points (numpy, saved with Pillow), and
matplotlib figures (bird's-eye views, legends, contact sheets, charts, confusion matrices).

Rasters are drawn at an integer ``scale`` of the training resolution: training pixel (column ``u``, row
``v``) is the block ``[v*s:(v+1)*s, u*s:(u+1)*s]`` of the picture, so a label map's colours and a projected
point's position can be checked pixel by pixel.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .palettes import Palette

BOUNDARY = (255, 255, 255)
NO_PAIR_GREY = (150, 150, 150)
POINT_BACKGROUND_DIM = 0.55  # brightness of the image under projected points


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display): imported on first use."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def upscale(img: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour enlargement by an integer factor (each pixel becomes a ``scale`` x ``scale`` block)."""
    if scale == 1:
        return img
    return np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)


def label_picture(labels: np.ndarray, palette: Palette, scale: int = 1) -> np.ndarray:
    """A label map [H, W] in the palette's colours (unlabelled black), uint8 [H*s, W*s, 3]."""
    return upscale(palette.colourize(labels), scale)


def sam_picture(rgb: np.ndarray, mask_id: np.ndarray, scale: int = 1, alpha: float = 0.35) -> np.ndarray:
    """The image with each SAM mask tinted (a tab20 colour by mask id, blended at ``alpha``) and the mask
    boundaries in white: a picture pixel is a boundary when its right or lower neighbour lies in another
    mask (or outside every mask while it is inside one). Pixels outside every mask keep their colour."""
    import matplotlib
    ids = upscale(mask_id, scale).astype(np.int64)
    out = upscale(rgb, scale).astype(np.float64)
    tab = np.round(np.array([matplotlib.colormaps["tab20"](i)[:3] for i in range(20)]) * 255)
    inside = ids >= 0
    out[inside] = (1 - alpha) * out[inside] + alpha * tab[ids[inside] % 20]
    edge = np.zeros(ids.shape, bool)
    right = ids[:, :-1] != ids[:, 1:]
    down = ids[:-1] != ids[1:]
    edge[:, :-1] |= right & ((ids[:, :-1] >= 0) | (ids[:, 1:] >= 0))
    edge[:-1] |= down & ((ids[:-1] >= 0) | (ids[1:] >= 0))
    out = np.round(out).astype(np.uint8)
    out[edge] = BOUNDARY
    return out


def depth_colours(depth: np.ndarray, vmax: float | None = None, cmap: str = "turbo") -> tuple[np.ndarray, float]:
    """uint8 RGB per depth on a matplotlib colour map from 0 to ``vmax`` (the 99th percentile by default)."""
    import matplotlib
    from matplotlib.colors import Normalize
    depth = np.asarray(depth, dtype=np.float64)
    if vmax is None:
        vmax = float(np.percentile(depth, 99)) if len(depth) else 1.0
    vmax = max(vmax, 1e-6)
    rgba = matplotlib.colormaps[cmap](Normalize(0.0, vmax, clip=True)(depth))
    return np.round(np.asarray(rgba)[..., :3] * 255).astype(np.uint8), vmax


def points_picture(background: np.ndarray | None, image_hw, uv: np.ndarray, colours: np.ndarray, depth: np.ndarray,
                   scale: int = 1, grow: int = 1, dim: float = POINT_BACKGROUND_DIM) -> np.ndarray:
    """Projected points over the image: each point fills its training pixel's block, grown by ``grow``
    picture pixels on every side; nearer points cover farther ones. ``background`` (the image, shown at
    ``dim`` brightness) may be ``None`` for black."""
    h, w = image_hw
    H, W = h * scale, w * scale
    if background is None:
        out = np.zeros((H, W, 3), np.uint8)
    else:
        out = np.round(upscale(background, scale).astype(np.float64) * dim).astype(np.uint8)
    if len(uv) == 0:
        return out
    order = np.argsort(-np.asarray(depth, dtype=np.float64), kind="stable")  # far first: near ones win below
    uv = np.asarray(uv, dtype=np.int64)[order]
    colours = np.asarray(colours)[order]
    rank = np.full(H * W, -1, np.int64)
    steps = range(-grow, scale + grow)
    for dy in steps:
        for dx in steps:
            y = uv[:, 1] * scale + dy
            x = uv[:, 0] * scale + dx
            ok = (y >= 0) & (y < H) & (x >= 0) & (x < W)
            np.maximum.at(rank, y[ok] * W + x[ok], np.flatnonzero(ok))
    hit = rank >= 0
    flat = out.reshape(-1, 3)
    flat[hit] = colours[rank[hit]]
    return out


def save_png(img: np.ndarray, path) -> Path:
    from PIL import Image
    path = Path(path)
    Image.fromarray(np.ascontiguousarray(img)).save(path)
    return path


def png_bytes(obj) -> bytes:
    """PNG bytes of a uint8 array or a matplotlib figure (which is closed)."""
    buf = io.BytesIO()
    if isinstance(obj, np.ndarray):
        from PIL import Image
        Image.fromarray(np.ascontiguousarray(obj)).save(buf, format="PNG")
    else:
        obj.savefig(buf, format="png", dpi=obj.get_dpi())
        pyplot().close(obj)
    return buf.getvalue()


def save_figure(fig, path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=fig.get_dpi())
    pyplot().close(fig)
    return path


# -- matplotlib figures -------------------------------------------------------------------------------
def legend_handles(palette: Palette, indices, unlabelled: bool = True, no_label_points: bool = False):
    """Patches of the classes in ``indices``, then black for unlabelled pixels and, with ``no_label_points``,
    grey for points without a label (a bird's-eye view's points that no camera sees)."""
    from matplotlib.patches import Patch
    handles = [Patch(color=np.array(palette.colour(i)) / 255, label=palette.class_names[i])
               for i in sorted(set(int(i) for i in indices)) if i < len(palette.class_names)]
    if unlabelled:
        handles.append(Patch(facecolor="black", edgecolor="0.5", label="unlabelled"))
    if no_label_points:
        handles.append(Patch(color=np.array(NO_PAIR_GREY) / 255, label="point without label"))
    return handles


def legend_figure(palette: Palette, indices=None):
    """Every class (or those in ``indices``) with its colour."""
    plt = pyplot()
    idx = range(len(palette.class_names)) if indices is None else indices
    handles = legend_handles(palette, idx)
    fig = plt.figure(figsize=(2.6, 0.25 * len(handles) + 0.4), dpi=100)
    fig.legend(handles=handles, loc="center", frameon=False, fontsize=9, title=palette.name, title_fontsize=8)
    return fig


def bev_axes(ax, xyz: np.ndarray, labels: np.ndarray | None, palette: Palette, title: str, max_range=None):
    """A bird's-eye view (x right, y up) of the points coloured by ``labels`` (grey where unlabelled)."""
    xy = np.asarray(xyz)[:, :2]
    if labels is None:
        labels = np.full(len(xy), 255, np.uint8)
    labelled = labels < len(palette.class_names)
    colours = np.where(labelled[:, None], palette.colourize(labels), np.array(NO_PAIR_GREY))
    order = np.argsort(labelled, kind="stable")  # labelled points on top
    size = float(np.clip(12000 / max(len(xy), 1), 0.6, 8))  # small clouds get bigger dots
    ax.scatter(xy[order, 0], xy[order, 1], s=size, c=colours[order] / 255, linewidths=0, rasterized=True)
    if max_range is None:
        centre = np.median(xy, 0)
        half = float(np.percentile(np.abs(xy - centre).max(1), 98)) if len(xy) else 1.0
    else:
        centre, half = np.zeros(2), float(max_range)
    ax.set_xlim(centre[0] - half, centre[0] + half)
    ax.set_ylim(centre[1] - half, centre[1] + half)
    ax.set_aspect("equal")
    ax.set_facecolor("white")
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("x (m)", fontsize=7)
    ax.set_ylabel("y (m)", fontsize=7)


def bev_figure(xyz, labels, palette: Palette, title: str):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.2, 5.2), dpi=110)
    bev_axes(ax, xyz, labels, palette, title)
    present = np.unique(labels[labels < len(palette.class_names)]) if labels is not None else []
    ax.legend(handles=legend_handles(palette, present, unlabelled=False, no_label_points=True), loc="center left",
              bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def sheet_figure(panels: list, palette: Palette, present, bev=None, depth_max: float | None = None,
                 title: str = ""):
    """A contact sheet: the image panels ``[(title, uint8 array), ...]`` in a grid, the bird's-eye view
    ``(xyz, labels, title)`` and the legend of the classes in ``present``."""
    plt = pyplot()
    n = len(panels) + (1 if bev is not None else 0)
    cols = min(3, n)
    rows = -(-n // cols)
    h, w = panels[0][1].shape[:2]
    fig = plt.figure(figsize=(cols * 4.2 + 2.2, rows * 4.2 * h / w + 0.9), dpi=100)
    grid = fig.add_gridspec(rows, cols + 1, width_ratios=[1] * cols + [0.5])
    for j, (name, img) in enumerate(panels):
        ax = fig.add_subplot(grid[j // cols, j % cols])
        ax.imshow(img, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if bev is not None:
        j = len(panels)
        ax = fig.add_subplot(grid[j // cols, j % cols])
        bev_axes(ax, *bev[:2], palette, bev[2])
    side = grid[:, cols].subgridspec(24, 1)
    lax = fig.add_subplot(side[:20])
    lax.axis("off")
    lax.legend(handles=legend_handles(palette, present, no_label_points=bev is not None), loc="upper left", fontsize=8,
               frameon=False,
               title=palette.name, title_fontsize=7)
    if depth_max is not None:
        import matplotlib
        from matplotlib.colors import Normalize
        cax = fig.add_subplot(side[23])
        fig.colorbar(matplotlib.cm.ScalarMappable(Normalize(0, depth_max), "turbo"), cax=cax,
                     orientation="horizontal", label="depth (m)")
        cax.tick_params(labelsize=7)
        cax.xaxis.label.set_size(8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def confusion_figure(matrix, class_names, title: str, ax=None):
    """Rows ground truth, columns prediction (last column 'none': no prediction), normalised per row;
    classes without ground truth are grey."""
    plt = pyplot()
    import matplotlib
    m = np.asarray(matrix, dtype=np.float64)
    rows = m.sum(1, keepdims=True)
    norm = np.where(rows > 0, m / np.maximum(rows, 1), np.nan)  # no ground truth of the class: grey
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    own = ax is None
    if own:
        size = 2.5 + 0.32 * len(class_names)
        fig, ax = plt.subplots(figsize=(size + 1.2, size), dpi=100)
    shown = ax.imshow(norm, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    cols = list(class_names) + ["none"]
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
    ax.set_xlabel("predicted / pseudo-label", fontsize=8)
    ax.set_ylabel("ground truth", fontsize=8)
    import textwrap
    ax.set_title("\n".join(w for line in title.splitlines() for w in textwrap.wrap(line, 34)), fontsize=8)
    if own:
        fig.colorbar(shown, ax=ax, fraction=0.04, label="share of the row")
        fig.tight_layout()
        return fig
    return shown


def class_histogram_figure(summary: dict, palette: Palette):
    """Pixels per class of the raw and the SAM-refined CLIP labels, side by side (share of the pixels)."""
    plt = pyplot()
    names = summary["class_names"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 3.4), dpi=100)
    x = np.arange(len(names))
    for j, (key, label, hatch) in enumerate((("clip/label", "CLIP labels", None),
                                             ("clip/label_refined", "SAM-refined", "//"))):
        h = summary["labels"][key]
        if not h["pixels"]:
            continue
        share = np.array([h["histogram"][n] for n in names]) / h["pixels"] * 100
        ax.bar(x + (j - 0.5) * 0.4, share, width=0.4, color=[np.array(palette.colour(i)) / 255 for i in x],
               edgecolor="black", linewidth=0.4, hatch=hatch, label=label)
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("% of pixels", fontsize=8)
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(facecolor="white", edgecolor="black", label="CLIP labels"),
                       Patch(facecolor="white", edgecolor="black", hatch="//", label="SAM-refined")],
              fontsize=8, frameon=False)
    ax.set_title("class histogram: CLIP labels (plain) and SAM-refined (hatched)", fontsize=9)
    fig.tight_layout()
    return fig


def sam_figure(summary: dict):
    """Distribution of SAM mask areas and of pixels per point (the panels with data)."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator
    hist = summary["sam"]["mask_area_histogram"]
    per_point = (summary["pairs"] or {}).get("pixels_per_point_histogram", [])  # None: a store without points
    panels = [p for p, has in (("sam", summary["sam"]["masks"] > 0), ("pairs", len(per_point) > 0)) if has]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.75 * len(panels), 3.0), dpi=100, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "sam":
            edges = np.array(hist["bin_edges"])
            ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", color="tab:blue",
                   edgecolor="black", linewidth=0.3)
            ax.set_xscale("log")
            ax.set_xlabel("mask area (share of the image)", fontsize=8)
            ax.set_ylabel("masks", fontsize=8)
            ax.set_title(f"SAM mask areas ({summary['sam']['masks']} masks)", fontsize=9)
        else:
            ax.bar(np.arange(len(per_point)), per_point, color="tab:orange", edgecolor="black", linewidth=0.3)
            ax.set_xlabel("pixels per point (0 = not seen by any camera)", fontsize=8)
            ax.set_ylabel("points", fontsize=8)
            ax.set_title("pairs per point", fontsize=9)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig
