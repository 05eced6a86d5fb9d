"""Pictures of generated frames: ``python -m pipeline.synthetic.figures docs/img``.

Writes ``synthetic_street.png`` (front camera, its label map, the LiDAR sweep from above coloured by class)
and ``synthetic_room.png`` (one RGB-D frame of a room: colour, label map, depth).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

#: one distinct colour per class index (up to 20 classes); unlabelled (255) is black
CLASS_PALETTE = np.array([
    (255, 120, 50), (255, 192, 203), (255, 255, 0), (0, 150, 245), (0, 255, 255), (200, 180, 0), (255, 0, 0),
    (255, 240, 150), (135, 60, 0), (160, 32, 240), (255, 0, 255), (139, 137, 137), (75, 0, 75), (150, 240, 80),
    (230, 230, 250), (0, 175, 0), (30, 60, 150), (100, 80, 250), (80, 30, 180), (170, 170, 60),
], dtype=np.uint8)
UNLABELLED_COLOUR = np.zeros(3, np.uint8)


def colorize_labels(labels: np.ndarray) -> np.ndarray:
    """Class indices (any shape, 255 = unlabelled) -> uint8 RGB of the same shape + (3,)."""
    lut = np.tile(UNLABELLED_COLOUR, (256, 1))
    lut[:len(CLASS_PALETTE)] = CLASS_PALETTE
    return lut[labels]


def labels_from_colours(rgb: np.ndarray) -> np.ndarray:
    """Inverse of :func:`colorize_labels`: uint8 RGB -> class indices, 255 for any colour not in the palette."""
    flat = rgb.reshape(-1, 3).astype(np.int64)
    codes = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    palette = CLASS_PALETTE.astype(np.int64)
    keys = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
    out = np.full(len(codes), 255, np.uint8)
    for index, key in enumerate(keys):
        out[codes == key] = index
    return out.reshape(rgb.shape[:-1])


def _legend(ax, class_names, present):
    from matplotlib.patches import Patch
    handles = [Patch(color=CLASS_PALETTE[i] / 255.0, label=class_names[i]) for i in sorted(present) if i < 255]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)


def street_figure(frame, class_names, path) -> None:
    """Front camera, its label map and the LiDAR sweep seen from above, saved to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    front = frame.images[0]
    fig, axes = plt.subplots(1, 3, figsize=(16, 3.6), gridspec_kw={"width_ratios": [1.86, 1.86, 1.2]})
    axes[0].imshow(front.rgb)
    axes[0].set_title(f"{front.name} (rgb)")
    axes[1].imshow(colorize_labels(front.gt))
    axes[1].set_title(f"{front.name} (labels)")
    xyz, gt = frame.xyz, frame.gt
    near = np.abs(xyz[:, :2]).max(axis=1) < 40
    axes[2].scatter(xyz[near, 0], xyz[near, 1], s=0.3, c=colorize_labels(gt[near]) / 255.0)
    axes[2].set_aspect("equal")
    axes[2].set_title(f"LiDAR, {len(xyz)} points (top view)")
    for ax in axes[:2]:
        ax.axis("off")
    _legend(axes[2], class_names, set(np.unique(gt)) | set(np.unique(front.gt)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def room_figure(frame, class_names, path, image_index: int = 0) -> None:
    """One RGB-D frame of a room: colour, label map and depth, saved to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    im = frame.images[image_index]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].imshow(im.rgb)
    axes[0].set_title(f"{frame.extra['room_type']}, {im.name} (rgb)")
    axes[1].imshow(colorize_labels(im.gt))
    axes[1].set_title("labels")
    shown = axes[2].imshow(np.where(im.depth > 0, im.depth, np.nan), cmap="viridis")
    axes[2].set_title(f"depth (m); room cloud {len(frame.xyz)} points")
    fig.colorbar(shown, ax=axes[2], fraction=0.035)
    for ax in axes:
        ax.axis("off")
    _legend(axes[1], class_names, set(np.unique(im.gt)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from ..datasets.synthetic import SyntheticDataset
    args.out_dir.mkdir(parents=True, exist_ok=True)
    streets = SyntheticDataset(kind="street", num_scenes=1, seed=args.seed)
    street_figure(streets.load(0), streets.class_names, args.out_dir / "synthetic_street.png")
    rooms = SyntheticDataset(kind="indoor", num_scenes=1, seed=args.seed)
    room_figure(rooms.load(0), rooms.class_names, args.out_dir / "synthetic_room.png")
    print(f"wrote {args.out_dir / 'synthetic_street.png'} and {args.out_dir / 'synthetic_room.png'}")


if __name__ == "__main__":
    main()
