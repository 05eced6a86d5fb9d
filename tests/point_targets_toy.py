"""The label-switching targets of a toy-store batch, for the ``labels.point_targets`` golden test.

``tests/data/first_pair_targets_toy.npz`` holds what :func:`toy_targets` returned with the code of commit
7d746e1 (before ``labels.point_targets`` existed: a point took the label of its first pair only). Regenerate
it only with that code: ``git stash; git checkout 7d746e1 -- train/labels.py; python -m
tests.point_targets_toy``, then restore train/labels.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.toy_store import TOY_CLASSES, build_toy_store
from train.config import load_config
from train.data import CacheFrameDataset, collate_offsets
from train.labels import LabelSources, switch_targets

GOLDEN = Path(__file__).parent / "data" / "first_pair_targets_toy.npz"
SOURCES = ["clip2d", "clip3d", "pred2d", "pred3d"]


def toy_batch(root: Path) -> dict:
    """Two frames of a three-image toy store, read without augmentation, collated as the trainer does."""
    store = build_toy_store(Path(root) / "toy.zarr", num_frames=2, num_images=3)
    ds = CacheFrameDataset([store], load_config("synthetic_street_cpu"), train=False)
    return {k: (torch.as_tensor(v) if isinstance(v, np.ndarray) else v)
            for k, v in collate_offsets([ds[0], ds[1]]).items()}


def toy_predictions(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed stand-ins for the two networks' argmax: seeded random classes per pixel and per point."""
    g = torch.Generator().manual_seed(7)
    L = len(TOY_CLASSES)
    pred2d = torch.randint(L, tuple(batch["mask_id"].shape), generator=g)
    pred3d = torch.randint(L, (len(batch["coord"]),), generator=g)
    return pred2d, pred3d


def toy_targets(batch: dict, **switch_kwargs) -> dict[str, np.ndarray]:
    """Stage-1 (clip2d only) and stage-2 (all four sources) targets, refined and not, with seeded draws; stage 2
    also with one draw per frame (``labels.switch: frame``)."""
    pred2d, pred3d = toy_predictions(batch)
    out = {}
    for refine in (True, False):
        sources = LabelSources(batch, pred2d, pred3d, len(TOY_CLASSES), refine=refine)
        for key, stage, allowed, unit in (("stage1", 1, ["clip2d"], "pair"), ("stage2", 2, SOURCES, "pair"),
                                          ("stage2_frame", 2, SOURCES, "frame")):
            t2, t3, _ = switch_targets(sources, batch, allowed, allowed, torch.Generator().manual_seed(stage),
                                       unit=unit, **switch_kwargs)
            out[f"refine{int(refine)}_{key}_2d"] = t2.numpy().astype(np.uint8)
            out[f"refine{int(refine)}_{key}_3d"] = t3.numpy().astype(np.uint8)
    return out


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        np.savez_compressed(GOLDEN, **toy_targets(toy_batch(Path(tmp))))
    print(f"wrote {GOLDEN}")
