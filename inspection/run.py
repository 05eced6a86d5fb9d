"""A training run for inspection: its metrics (``metrics.jsonl``), its evaluation (``eval/metrics.json`` of
``cns-cli eval``) and its networks' predictions on a store's frames.

``metrics.jsonl`` holds one JSON record per line: ``type: train`` records (step, epoch, stage, the losses,
lr, and ``share2d_<source>``/``share3d_<source>``: the realised label-source shares) and ``type: eval``
records (``miou_<row>``). A run that is still training may have a half-written last line: it is skipped.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import InspectError

LOSS_KEYS = ("loss", "ce2d", "ce3d", "latent2d", "latent3d")


class RunView:
    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise InspectError(f"run {self.path} is not a directory")
        if not (self.path / "config.yaml").exists():
            raise InspectError(f"{self.path} is not a training run (no config.yaml; make one with `cns-cli train`)")
        from train.config import ConfigError, load_config
        try:
            self.config = load_config(self.path / "config.yaml", {})
        except (ConfigError, OSError, ValueError) as e:
            raise InspectError(f"{self.path / 'config.yaml'}: {e}") from None
        self.checkpoint = self.path / "checkpoints" / "last.pth"

    def metrics(self) -> list[dict]:
        p = self.path / "metrics.jsonl"
        if not p.exists():
            return []
        out = []
        for line in p.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line a running trainer is writing
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def eval_result(self) -> dict | None:
        p = self.path / "eval" / "metrics.json"
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise InspectError(f"{p} is not valid JSON ({e})") from None

    def predictor(self, view, device: str = "cpu") -> "Predictor":
        return Predictor(self, view, device)


class Predictor:
    """The run's networks (``checkpoints/last.pth``) on frames of a store, as ``cns-cli eval`` builds them."""

    def __init__(self, run: RunView, view, device: str = "cpu"):
        import copy

        import torch

        from data_cache.store import CacheError
        from train.data import CacheFrameDataset
        from train.engine import check_stores
        from train.models import load_trained_model
        if not run.checkpoint.exists():
            raise InspectError(f"{run.path} has no checkpoint yet ({run.checkpoint}): predictions need one")
        cfg = copy.deepcopy(run.config)
        try:
            info = check_stores([str(view.path)], cfg, for_training=False)
        except CacheError as e:
            raise InspectError(f"the run's networks cannot read this store: {e}") from None
        cfg["eval"]["images_per_frame"] = 0  # every image of a frame
        cfg["data"]["num_workers"] = 0
        self.model, _ = load_trained_model(cfg, run.checkpoint, info, device)
        self.model.eval()
        self.dataset = CacheFrameDataset([str(view.path)], cfg, train=False)
        self.image_size = tuple(view.attrs.image_size)
        self.device = device
        self.num_classes = len(view.class_names)

    def predict(self, frame: int) -> dict:
        """``pred2d`` [I, H, W] uint8 at the store's resolution (``None`` without a 2D net) and ``pred3d`` [P]."""
        import torch
        import torch.nn.functional as F

        from train.data import batch_to, collate_offsets
        b = batch_to(collate_offsets([self.dataset[frame]]), self.device)
        with torch.no_grad():
            out = self.model(b["rgb"], b["voxel_feat"], b["voxel_index"], b["inverse"], 1)
        pred3d = out["logits3d"].argmax(1).to(torch.uint8).cpu().numpy() if "logits3d" in out else None
        pred2d = None
        if "logits2d" in out:
            p = out["logits2d"].argmax(1)
            if tuple(p.shape[-2:]) != self.image_size:  # data.image_size differs from the store's
                p = F.interpolate(p[:, None].float(), size=self.image_size, mode="nearest")[:, 0].long()
            pred2d = p.to(torch.uint8).cpu().numpy()
        return {"pred2d": pred2d, "pred3d": pred3d}


def curves(records: list[dict]) -> dict:
    """Series for the training curves: ``{"train": {key: (steps, values)}, "eval": {...}, "stages": ...}``."""
    train = [r for r in records if r.get("type") == "train" and "step" in r]
    evals = [r for r in records if r.get("type") == "eval" and "step" in r]

    def series(recs, keys):
        out = {}
        for k in keys:
            pts = [(r["step"], r[k]) for r in recs if isinstance(r.get(k), (int, float))]
            if pts:
                out[k] = (np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=np.float64))
        return out

    share_keys = sorted({k for r in train for k in r if k.startswith("share")})
    # the headline rows repeat cns_* or cns_refined_* (whichever eval.post_refine names)
    miou_keys = sorted({k for r in evals for k in r if k.startswith("miou_") and not k.startswith("miou_headline")})
    stage_change = [b["step"] for a, b in zip(train, train[1:]) if a.get("stage") != b.get("stage")]
    return {"losses": series(train, LOSS_KEYS), "lr": series(train, ("lr",)), "shares": series(train, share_keys),
            "miou": series(evals, miou_keys), "stage_changes": stage_change}
