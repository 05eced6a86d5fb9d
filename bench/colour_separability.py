"""How far colour alone separates the classes of the benchmark's synthetic scenes.

A look-up classifier of the pixel colour: the RGB cube cut into ``--bins``^3 cells, each cell predicting the
class most of the training pixels in it hold; scored (per-class IoU, mIoU) on the val scenes' pixels. It is
the best any network can do from a pixel's colour alone, so it tells whether the scenes of
``bench_cns.DATASETS`` (with ``class_colours``) leave classes that no 2D network could tell apart by
appearance -- the question behind the class-colour version 2 (pipeline/synthetic/palettes.py).

    python bench/colour_separability.py [--dataset street|indoor] [--train-scenes 16] [--val-scenes 4]

Rooms are generated with 8 images each (instead of the benchmark's 16) to keep it to seconds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_cns import DATASETS  # noqa: E402
from pipeline.datasets.synthetic import SyntheticDataset  # noqa: E402
from train.evaluate import ConfusionMatrix  # noqa: E402


def labelled_pixels(kind: str, split: str, scenes: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Colours [P, 3] (uint8) and ground-truth classes [P] of every labelled pixel of ``scenes`` scenes."""
    options = {**DATASETS[kind].options, **({"frames_per_room": 8} if kind == "indoor" else {})}
    data = SyntheticDataset(None, split, kind=kind, num_scenes=scenes, cache_size=0, **options)
    colours, classes = [], []
    for i in range(len(data)):
        for image in data.load(i).images:
            keep = image.gt < len(data.class_names)
            colours.append(image.rgb[keep])
            classes.append(image.gt[keep])
    return np.concatenate(colours), np.concatenate(classes), data.class_names


def colour_cell(rgb: np.ndarray, bins: int) -> np.ndarray:
    q = (rgb.astype(np.int64) * bins) // 256
    return (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]


def colour_only_iou(kind: str, train_scenes: int, val_scenes: int, bins: int = 24) -> dict:
    train_rgb, train_gt, names = labelled_pixels(kind, "train", train_scenes)
    val_rgb, val_gt, _ = labelled_pixels(kind, "val", val_scenes)
    counts = np.zeros((bins ** 3, len(names)), np.int64)
    np.add.at(counts, (colour_cell(train_rgb, bins), train_gt.astype(np.int64)), 1)
    predict = np.where(counts.sum(1) > 0, counts.argmax(1), -1)  # a cell no training pixel fell in: no answer
    confusion = ConfusionMatrix(len(names))
    confusion.update(torch.from_numpy(predict[colour_cell(val_rgb, bins)]), torch.from_numpy(val_gt))
    return confusion.summary(names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(DATASETS), action="append")
    ap.add_argument("--train-scenes", type=int, default=16)
    ap.add_argument("--val-scenes", type=int, default=4)
    ap.add_argument("--bins", type=int, default=24, help="cells per RGB axis (default 24)")
    args = ap.parse_args()
    for kind in args.dataset or sorted(DATASETS):
        summary = colour_only_iou(kind, args.train_scenes, args.val_scenes, args.bins)
        print(f"{kind}: colour-only val mIoU {summary['miou']:.1f}  ({DATASETS[kind].options})")
        for name, iou in summary["iou"].items():
            if iou is not None:
                print(f"  {name:>20s} {iou:5.1f}")


if __name__ == "__main__":
    main()
