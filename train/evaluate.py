"""Evaluation: confusion matrices, mIoU tables, label-only baselines, open vocabulary, prediction export.

3D: every point of every frame (voxel predictions mapped back through the inverse map) against
``points/gt``. 2D: every pixel with ``images/gt``; for a dataset with 3D labels only, the pixels that
labelled points project to, with the point's label. A missing prediction (a point without pair for the
projected CLIP baseline) counts as a miss of the true class.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from data_cache import schema
from pipeline.refine import sam_max_vote

from .data import CacheFrameDataset, batch_to, collate_offsets, worker_init
from .labels import IGNORE, first_pair_of_point, pixels_to_points, points_to_pixels, refine_points_through_pairs

#: Table 1 of the paper (Chen et al. 2023): label-free mIoU of each method per dataset and modality, as printed.
#: The one place these numbers live; :data:`PAPER_REFERENCE` and the docs' table are read from it.
PAPER_TABLE1 = {
    "MaskCLIP": {"ScanNet 2D": 17.3, "ScanNet 3D": 14.2, "nuImages 2D": 14.1, "nuScenes 3D": 12.8},
    "MaskCLIP+": {"ScanNet 2D": 20.3, "ScanNet 3D": 21.6, "nuImages 2D": 17.3, "nuScenes 3D": 15.3},
    "OpenScene": {"ScanNet 2D": 14.2, "ScanNet 3D": 16.8, "nuImages 2D": 12.4, "nuScenes 3D": 14.6},
    "CLIP2Scene": {"ScanNet 2D": 23.7, "ScanNet 3D": 25.6, "nuImages 2D": 18.6, "nuScenes 3D": 20.8},
    "CNS": {"ScanNet 2D": 28.4, "ScanNet 3D": 33.5, "nuImages 2D": 22.1, "nuScenes 3D": 26.8},
}
#: The Table 1 columns a store's dataset compares with (nuScenes' images have no 2D labels: the paper's 2D
#: column for it is nuImages).
TABLE1_COLUMNS = {"scannet": ("ScanNet 2D", "ScanNet 3D"), "nuscenes": ("nuImages 2D", "nuScenes 3D"),
                  "nuimages": ("nuImages 2D",)}
#: Label-free mIoU reported in the paper, per store dataset: ``[(title, mIoU)]``, printed next to measured rows.
PAPER_REFERENCE = {dataset: [(f"{method} (paper), {col}", row[col]) for col in cols
                             for method, row in PAPER_TABLE1.items()]
                   for dataset, cols in TABLE1_COLUMNS.items()}
#: Said under the reference rows: what of Table 1 this project reproduces.
REFERENCE_NOTE = ("of these methods only the MaskCLIP baseline is reproduced here (the clip_* rows); "
                  "MaskCLIP+, OpenScene and CLIP2Scene are quoted from the paper")


class ConfusionMatrix:
    """L x (L + 1) counts: rows ground truth, columns prediction, the last column 'no prediction'."""

    def __init__(self, num_classes: int):
        self.L = num_classes
        self.m = torch.zeros(num_classes, num_classes + 1, dtype=torch.long)

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        gt, pred = gt.reshape(-1).long().cpu(), pred.reshape(-1).long().cpu()
        keep = (gt != IGNORE) & (gt < self.L)
        gt, pred = gt[keep], pred[keep]
        pred = torch.where((pred >= 0) & (pred < self.L), pred, torch.full_like(pred, self.L))
        self.m += torch.bincount(gt * (self.L + 1) + pred, minlength=self.L * (self.L + 1)).view(self.L, self.L + 1)

    def iou(self) -> np.ndarray:
        m = self.m.double()
        tp = m.diagonal()
        fp = m[:, : self.L].sum(0) - tp
        fn = m.sum(1) - tp
        union = tp + fp + fn
        iou = torch.where(m.sum(1) > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        return iou.numpy()

    def summary(self, class_names) -> dict:
        iou = self.iou()
        present = ~np.isnan(iou)
        return {"miou": float(np.mean(iou[present]) * 100) if present.any() else float("nan"),
                "iou": {n: (None if np.isnan(v) else round(float(v) * 100, 2)) for n, v in zip(class_names, iou)},
                "counted": int(self.m.sum())}


def _gt_lut(store_classes, eval_classes) -> torch.Tensor:
    """Store class index -> evaluation class index (255 for store classes not in the evaluated list)."""
    lut = torch.full((256,), IGNORE, dtype=torch.long)
    for i, n in enumerate(store_classes):
        if n in eval_classes:
            lut[i] = list(eval_classes).index(n)
    return lut


def store_text_tower(store_path) -> dict:
    """The CLIP text tower that made a store's text space, from its ``maskclip`` fingerprint ({} if none).

    New class names must be embedded by the same tower, or their embeddings do not live in the space the
    networks' heads were trained against.
    """
    from data_cache.store import Store
    fp = Store(store_path).raw_attrs.get("stages", {}).get("maskclip")
    if not fp:
        return {}
    c = fp.get("config", {})
    return {"model": c.get("model"), "pretrained": c.get("pretrained"), "tiny": bool(c.get("tiny")),
            "checkpoint_sha256": fp.get("checkpoint_sha256")}


def store_teacher(store_path) -> dict:
    """The teacher of a store's labels: its CLIP text tower (:func:`store_text_tower`), its dataset and split,
    and the stages simulated from the ground truth (a benchmark store; ``[]`` for real CLIP/SAM labels)."""
    from data_cache.store import Store
    st = Store(store_path)
    return {"store": str(store_path), "dataset": st.attrs.dataset, "split": st.attrs.split,
            "text_tower": store_text_tower(store_path), "simulated_stages": sorted(st.simulated_stages())}


def open_vocabulary_embeddings(class_names, clip_cfg: dict, device) -> torch.Tensor:
    """Embed new class names with the CLIP text tower (evaluation only; the import is deliberately lazy so
    that training never loads open_clip).

    ``clip_cfg``: ``model``, ``pretrained``, ``checkpoint``, ``tiny`` and, from the store, the
    ``checkpoint_sha256`` its labels were made with: a checkpoint that hashes differently is refused.
    """
    from pipeline.models.maskclip import build_text_embeddings
    want_sha = clip_cfg.get("checkpoint_sha256")
    if want_sha:
        from pipeline.models.weights import resolve_weights
        from pipeline.stages.base import cached_sha256
        src = resolve_weights("clip", clip_cfg.get("model"), clip_cfg.get("checkpoint"), clip_cfg.get("pretrained"))
        if src["source"] == "checkpoint" and cached_sha256(src["path"]) != want_sha:
            from pipeline.models.weights import WeightsError
            raise WeightsError(f"CLIP checkpoint {src['path']} is not the one the store's labels were made with "
                             f"(sha256 {want_sha[:12]}...); pass that one with --clip-checkpoint")
    emb = build_text_embeddings(list(class_names), model=clip_cfg.get("model"), pretrained=clip_cfg.get("pretrained"),
                                checkpoint=clip_cfg.get("checkpoint"), tiny=bool(clip_cfg.get("tiny")),
                                device=str(device))
    emb = torch.as_tensor(emb, dtype=torch.float32)
    return emb / emb.norm(dim=1, keepdim=True).clamp(min=1e-12)


@torch.no_grad()
def evaluate(model, store_paths, cfg: dict, device, with_baselines: bool = True, eval_classes=None,
             text_embed: torch.Tensor | None = None, export_dir: str | Path | None = None,
             post_refine: bool | None = None, batch_statistics: bool = False) -> dict:
    """mIoU rows: ``cns_3d``/``cns_2d`` (and ``cns_refined_*``: post-refinement by SAM max-voting), and
    with ``with_baselines`` ``clip_2d``, ``clip_3d`` (CLIP labels projected to points), ``wo_cns_2d``/
    ``wo_cns_3d`` (SAM-refined CLIP labels, no training). ``model=None`` evaluates the baselines only.
    The projected 3D baselines come twice: ``*_3d`` over every labelled point (a point no camera sees is
    a miss) and ``*_3d_paired`` over the points with a pair only (the paper does not say which it used).

    ``eval_classes`` + ``text_embed``: open vocabulary -- predict among new class names; ground truth of
    store classes absent from the list is ignored, and the baselines (store classes) are not computed.
    ``batch_statistics``: a diagnostic -- BatchNorm normalises with each frame's own statistics instead of
    the running ones (the running statistics are left untouched).
    """
    store_classes = list(cfg["data"]["class_names"])
    names = list(eval_classes) if eval_classes is not None else store_classes
    open_vocab = eval_classes is not None and list(eval_classes) != store_classes
    lut = _gt_lut(store_classes, names).to(device)
    L = len(names)
    post_refine = cfg["eval"]["post_refine"] if post_refine is None else post_refine
    ds = CacheFrameDataset(store_paths, cfg, train=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, shuffle=False, collate_fn=collate_offsets,
                                         num_workers=int(cfg["data"]["num_workers"]), worker_init_fn=worker_init)
    rows: dict[str, ConfusionMatrix] = {}

    def add(key, pred, gt):
        rows.setdefault(key, ConfusionMatrix(L)).update(pred, gt)

    if model is not None:
        was_training = model.training
        model.eval()
        bn_momenta = {}
        if batch_statistics:  # train-mode BatchNorm with momentum 0: batch statistics, running ones kept
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    bn_momenta[m] = m.momentum
                    m.momentum = 0.0
                    m.train()
        saved_text = model.text_embed.clone()
        if text_embed is not None:
            model.set_text_embeddings(text_embed.to(device))
    export = Path(export_dir) if export_dir else None
    amp = bool(cfg["schedule"]["amp"]) and torch.device(device).type == "cuda"
    try:
        for batch in loader:
            b = batch_to(batch, device)
            s = int(b["store"][0])
            meta = ds.meta[s]
            pairs = (b["pair_point"], b["pair_image"], b["pair_uv"])
            gt3d = lut[b["point_gt"].clamp(max=255)]
            if meta["has_image_gt"]:
                gt2d = lut[b["image_gt"].long()]
            else:  # 3D labels only: score the pixels labelled points project to
                gt2d = lut[points_to_pixels(b["point_gt"], *pairs, b["mask_id"].shape)]
            if with_baselines and not open_vocab:
                paired = first_pair_of_point(b["pair_point"], len(b["coord"])) >= 0
                gt3d_paired = torch.where(paired, gt3d, torch.full_like(gt3d, IGNORE))
                for key, maps in (("clip", b["clip_label"]), ("wo_cns", b["clip_refined"])):
                    add(f"{key}_2d", maps.long(), gt2d)
                    if not meta["has_points"]:  # a 2D-only store: no 3D rows
                        continue
                    projected = pixels_to_points(maps, *pairs, len(b["coord"]))
                    add(f"{key}_3d", projected, gt3d)
                    add(f"{key}_3d_paired", projected, gt3d_paired)
            if model is None:
                continue
            with torch.autocast(torch.device(device).type, dtype=torch.float16, enabled=amp):
                out = model(b["rgb"], b["voxel_feat"], b["voxel_index"], b["inverse"], 1)
            pred3d = ref3d = out["logits3d"].argmax(1) if "logits3d" in out else None
            pred2d = out["logits2d"].argmax(1) if "logits2d" in out else None
            if pred3d is not None and meta["has_points"]:
                add("cns_3d", pred3d, gt3d)
                ref3d = refine_points_through_pairs(pred3d, b["mask_id"], *pairs, L)[1]
                add("cns_refined_3d", ref3d, gt3d)
            if pred2d is not None:
                add("cns_2d", pred2d, gt2d)
                ref2d = sam_max_vote(pred2d, b["mask_id"], L)
                add("cns_refined_2d", ref2d, gt2d)
            if export is not None:
                _export(export, ds, s, int(b["frame"][0]), ref3d if post_refine else pred3d,
                        (ref2d if post_refine else pred2d) if pred2d is not None else None, b["image_rows"])
    finally:
        if model is not None:
            model.set_text_embeddings(saved_text)
            for m, momentum in bn_momenta.items():
                m.momentum = momentum
            model.train(was_training)
    summary = {k: v.summary(names) for k, v in rows.items()}
    if model is not None:  # the headline rows follow eval.post_refine
        for dim in ("2d", "3d"):
            src = f"cns_refined_{dim}" if post_refine else f"cns_{dim}"
            if src in summary:
                summary[f"headline_{dim}"] = summary[src]
    gt2d_sources = sorted({m["image_gt_source"] for m in ds.meta})
    from data_cache.store import Store
    from data_cache.validate import simulated_note
    simulated = sorted({n for n in (simulated_note(Store(p)) for p in store_paths) if n})
    teachers = [schema.teacher_of(Store(p).raw_attrs.get("stages", {})) for p in store_paths]
    return {"rows": summary, "class_names": names, "post_refine": bool(post_refine),
            "dataset": _dataset_name(store_paths[0]), "stores": store_label(store_paths), "open_vocabulary": open_vocab,
            "gt2d": " + ".join(gt2d_sources), "batch_statistics": bool(batch_statistics),
            "simulated": simulated, "teachers": sorted({schema.teacher_line(t) for t in teachers if t})}


def _dataset_name(path) -> str:
    from data_cache.store import Store
    return Store(path).attrs.dataset


def store_label(paths) -> str:
    """How an evaluation names the stores it ran on: ``<dataset>-<split>`` of each, e.g. ``synthetic-val``."""
    from data_cache.store import Store
    return "+".join(f"{a.dataset}-{a.split}" for a in (Store(p).attrs for p in paths))


def _export(root: Path, ds: CacheFrameDataset, s: int, frame: int, pred3d, pred2d, image_rows) -> None:
    """Per-point labels as ``<token>_lidarseg.bin`` (uint8, lidarseg-like) and one PNG per image."""
    from PIL import Image
    st = ds.store(s)
    token = str(st.array("frames/token")[frame])
    if pred3d is not None and ds.meta[s]["has_points"]:
        (root / "points").mkdir(parents=True, exist_ok=True)
        pred3d.to(torch.uint8).cpu().numpy().tofile(root / "points" / f"{token}_lidarseg.bin")
    if pred2d is not None:
        (root / "images").mkdir(parents=True, exist_ok=True)
        names = st.array("images/name")
        for img, row in zip(pred2d.to(torch.uint8).cpu().numpy(), image_rows.tolist()):
            Image.fromarray(img, mode="L").save(root / "images" / f"{token}_{row:06d}_{names[row]}.png")


ROW_TITLES = {
    "clip_2d": "CLIP labels (MaskCLIP), 2D",
    "clip_3d": "CLIP labels projected, 3D, all points (unpaired = miss)",
    "clip_3d_paired": "CLIP labels projected, 3D, paired points only",
    "wo_cns_2d": "w/o CNS (SAM-refined CLIP), 2D",
    "wo_cns_3d": "w/o CNS (refined, projected), 3D, all points",
    "wo_cns_3d_paired": "w/o CNS (refined, projected), 3D, paired points only",
    "cns_2d": "CNS 2D net", "cns_3d": "CNS 3D net",
    "cns_refined_2d": "CNS 2D net + post-refinement", "cns_refined_3d": "CNS 3D net + post-refinement",
}


def _titles_for(teachers) -> dict:
    """ROW_TITLES with the 2D teacher's name for "MaskCLIP" when the stores name one other teacher."""
    names = {line.split(" ")[1] for line in teachers}
    if len(names) != 1 or names == {"maskclip"}:
        return dict(ROW_TITLES)
    name = next(iter(names))
    return {k: v.replace("MaskCLIP", name) for k, v in ROW_TITLES.items()}


def format_tables(result: dict) -> str:
    names = result["class_names"]
    lines = [f"NOTE: {note}" for note in result.get("simulated", [])] + list(result.get("teachers", []))
    rows = [k for k in ROW_TITLES if k in result["rows"]]
    titles = _titles_for(result.get("teachers", []))
    width = max([len(titles[k]) for k in rows] + [30])
    short = [n[:8] for n in names]
    lines.append(f"{'method':<{width}}  {'mIoU':>6}  " + " ".join(f"{n:>8}" for n in short))
    for k in rows:
        r = result["rows"][k]
        ious = " ".join(f"{'-' if r['iou'][n] is None else format(r['iou'][n], '.1f'):>8}" for n in names)
        lines.append(f"{titles[k]:<{width}}  {r['miou']:6.1f}  {ious}")
    if result.get("stores"):
        lines.append(f"evaluated on: {result['stores']}")
    if result.get("gt2d"):
        lines.append(f"2D ground truth: {result['gt2d']}")
    ref = PAPER_REFERENCE.get(result.get("dataset", ""), [])  # only the store's dataset; synthetic has none
    if ref:
        lines.append("")
        lines.append("reported in the paper (label-free mIoU, full datasets; for reference only):")
        for title, v in ref:
            lines.append(f"  {title:<{width - 2}}  {v:6.1f}")
        lines.append(f"  ({REFERENCE_NOTE})")
    return "\n".join(lines)


def write_result(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, sort_keys=True))
