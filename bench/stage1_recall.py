"""What stage 2 starts from: per class, how often each label source is right when stage 1 ends.

Label switching (Eq. 6) draws each element's target with equal probability from the refined CLIP labels and
the two networks' own (refined) predictions. On the pixels of a class the networks do not predict yet, half or
more of the targets then name another class, and training moves the networks further from it: the class is
not taught any more. This diagnostic measures that premise on a dataset's training store, for a benchmark
seed's stage-1 checkpoint: per class (ground truth), the recall of the refined CLIP labels and of the stage-1
2D and 3D networks (3D: points with a pair, which are the ones stage 2 supervises), next to the class's val
IoU in the rows given by ``--rows`` (their ``result.json``).

    python bench/stage1_recall.py runs/bench_cns/indoor-full/seed0 [--rows none,base_clip_lsc]

The stage-1 run is the one the first of ``--rows`` forked from (its ``result.json`` names it). Evaluation
mode, no augmentation, every image of a frame (``eval.images_per_frame``); one thread.

``--confidence``: also what ``labels.switch_gate: confidence`` would let through at the switch: for each
network and threshold t, the share of pixels / paired points whose softmax probability reaches t (coverage)
and the accuracy of the predictions above and below t against the ground truth. Training mode (batch
statistics, as the gate sees them in a training step), no augmentation.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train.config import load_config  # noqa: E402
from train.data import CacheFrameDataset, collate_offsets  # noqa: E402
from train.engine import check_stores  # noqa: E402
from train.evaluate import ConfusionMatrix  # noqa: E402
from train.labels import pixels_to_points  # noqa: E402
from train.models import load_trained_model  # noqa: E402


def recall(cm: ConfusionMatrix) -> torch.Tensor:
    """Per ground-truth class the share of its elements predicted as that class (NaN where it has none)."""
    m = cm.m.double()
    return torch.where(m.sum(1) > 0, m.diagonal() / m.sum(1).clamp(min=1), torch.full((cm.L,), float("nan")))


def stage1_frames(stage1: Path, store: Path, device: str = "cpu", train_mode: bool = False):
    """``cfg`` and, per frame of ``store``, ``(batch, outputs, clip3d, paired_gt)`` of the stage-1 networks:
    ``clip3d`` [P] the refined CLIP label of each point's first pair (255: unpaired), ``paired_gt`` [P] its
    ground truth where paired. ``train_mode``: batch statistics in the norm layers (no gradient either way)."""
    cfg = load_config(stage1 / "config.yaml", [])
    info = check_stores([str(store)], cfg, for_training=False)
    model, _ = load_trained_model(cfg, stage1 / "checkpoints" / "last.pth", info, device)
    model.train(train_mode)
    data = CacheFrameDataset([str(store)], cfg, train=False)

    def frames():
        with torch.no_grad():
            for i in range(len(data)):
                b = collate_offsets([data[i]])
                out = model(b["rgb"].to(device), b["voxel_feat"].to(device), b["voxel_index"].to(device),
                            b["inverse"].to(device), 1)
                clip3d = pixels_to_points(b["clip_refined"], b["pair_point"], b["pair_image"], b["pair_uv"],
                                          len(b["point_gt"]))
                paired_gt = torch.where(clip3d != 255, b["point_gt"].long(), torch.full_like(clip3d, 255))
                yield b, {k: v.cpu() for k, v in out.items() if k in ("logits2d", "logits3d")}, clip3d, paired_gt
    return cfg, frames()


def stage1_recall(stage1: Path, store: Path, device: str = "cpu") -> tuple[list[str], dict]:
    """``(class names, {source: recall [L]})`` for the sources clip2d, net2d (pixels) and clip3d, net3d
    (paired points) on ``store``."""
    cfg, frames = stage1_frames(stage1, store, device)
    names = cfg["data"]["class_names"]
    cms = {k: ConfusionMatrix(len(names)) for k in ("clip2d", "net2d", "clip3d", "net3d")}
    for b, out, clip3d, paired_gt in frames:
        cms["clip2d"].update(b["clip_refined"], b["image_gt"])
        cms["net2d"].update(out["logits2d"].argmax(1), b["image_gt"])
        cms["clip3d"].update(clip3d, paired_gt)
        cms["net3d"].update(out["logits3d"].argmax(1), paired_gt)
    return names, {k: recall(cm) * 100 for k, cm in cms.items()}


def confidence_coverage(stage1: Path, store: Path, thresholds: list[float], device: str = "cpu") -> dict:
    """What a confidence gate lets through at the switch: ``{net2d|net3d: [{"threshold", "coverage",
    "acc_above", "acc_below"}, ...]}`` over the labelled pixels / paired points of ``store`` (coverage: the
    share whose softmax probability reaches the threshold; accuracies against the ground truth, NaN where
    empty; in %). Training mode, as the gate sees the predictions."""
    _, frames = stage1_frames(stage1, store, device, train_mode=True)
    conf = {"net2d": [], "net3d": []}
    right = {"net2d": [], "net3d": []}
    for b, out, _, paired_gt in frames:
        for net, logits, gt in (("net2d", out["logits2d"], b["image_gt"].long()),
                                ("net3d", out["logits3d"], paired_gt)):
            p, pred = logits.float().softmax(1).max(1)
            keep = gt != 255
            conf[net].append(p[keep])
            right[net].append((pred == gt)[keep])
    share = lambda m: float(m.float().mean()) * 100 if m.numel() else float("nan")  # noqa: E731
    table = {}
    for net in conf:
        c, r = torch.cat(conf[net]), torch.cat(right[net])
        table[net] = [{"threshold": t, "coverage": share(c >= t), "acc_above": share(r[c >= t]),
                       "acc_below": share(r[c < t])} for t in thresholds]
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("seed_dir", type=Path, help="a benchmark seed directory, e.g. runs/bench_cns/indoor-full/seed0")
    ap.add_argument("--rows", default="none,base_clip_lsc", help="row directories (ablation names) to show")
    ap.add_argument("--store", type=Path, default=None,
                    help="the training store (default: the benchmark's, <dataset>/cache/synthetic-train.zarr)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--confidence", default=None, metavar="T1,T2,...",
                    help="also the coverage and accuracy of each network's predictions at these softmax thresholds "
                         "(labels.switch_gate: confidence), e.g. 0.3,0.5,0.7,0.9")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = a.rows.split(",")
    results = {r: json.loads((a.seed_dir / r / "result.json").read_text()) for r in rows}
    stage1 = a.seed_dir / results[rows[0]]["stage1"]
    # the benchmark's training store: <dataset>/cache/, beside the seed directories (or above a study's)
    found = [d / "cache" / "synthetic-train.zarr" for d in a.seed_dir.resolve().parents]
    store = a.store or next((s for s in found if s.exists()), None)
    if store is None:
        raise SystemExit(f"no benchmark training store above {a.seed_dir}: pass --store")
    names, rec = stage1_recall(stage1, store, a.device)
    print(f"{stage1} on {store}: recall (%) of each source at the end of stage 1 | val IoU of the rows (2D / 3D)")
    print(f"{'class':>15} | clip2d net2d | clip3d net3d || " + " | ".join(f"{r:>13}" for r in rows))
    fmt = lambda v: "    -" if v is None or v != v else f"{v:5.1f}"  # noqa: E731
    for c, name in enumerate(names):
        if rec["clip2d"][c] != rec["clip2d"][c]:
            continue  # not in the training scenes
        ious = " | ".join(f"{fmt(results[r]['rows']['cns_2d']['iou'].get(name))} / "
                          f"{fmt(results[r]['rows']['cns_3d']['iou'].get(name))}" for r in rows)
        print(f"{name:>15} | {fmt(float(rec['clip2d'][c]))} {fmt(float(rec['net2d'][c]))} | "
              f"{fmt(float(rec['clip3d'][c]))} {fmt(float(rec['net3d'][c]))} || {ious}")
    if a.confidence:
        table = confidence_coverage(stage1, store, [float(t) for t in a.confidence.split(",")], a.device)
        print("confidence gate at the switch (training mode): threshold | coverage % | accuracy above / below %")
        for net, rows_ in table.items():
            for r in rows_:
                print(f"{net:>6} {r['threshold']:9.2f} | {fmt(r['coverage'])} | {fmt(r['acc_above'])} / "
                      f"{fmt(r['acc_below'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
