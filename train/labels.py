"""Training targets: the four label sources of stage 2 and the per-sample label switching (paper sec. 3.2).

Each source gives a pixel label map [I, H, W] and a point label vector [P] (255 = no label):

==========  =====================================================================================
clip2d      the SAM-refined MaskCLIP labels (``clip/label_refined``); points take their paired pixel's
clip3d      the raw MaskCLIP labels projected to the points, then max-voted through the pairs within each
            SAM mask and spread to the mask's pixels and points (:func:`refine_points_through_pairs`)
pred2d      the 2D net's own prediction, max-voted per SAM mask (Eq. 4 per image); points via the pairs
pred3d      the 3D net's own prediction, refined through the pairs like clip3d
==========  =====================================================================================

With ``labels.refine: false`` ('w/o refinement') no voting happens: clip2d uses ``clip/label`` and the
3D sources reach pixels only where a point projects. All voting is the shared Eq. 4 code of
:mod:`pipeline.refine`; nothing here counts votes itself.
"""
from __future__ import annotations

import torch

from data_cache.schema import IGNORE_INDEX as IGNORE
from pipeline.refine import apply_majority, mask_majority, per_image_groups, sam_max_vote


def first_pair_of_point(pair_point: torch.Tensor, num_points: int) -> torch.Tensor:
    """For each point the index of its first pair (the lowest pair index), -1 for unpaired points.

    A point seen by several cameras takes the label of one deterministic pair (scatter with ``amin``)."""
    first = torch.full((num_points,), torch.iinfo(torch.long).max, dtype=torch.long, device=pair_point.device)
    order = torch.arange(len(pair_point), device=pair_point.device)
    first.scatter_reduce_(0, pair_point, order, reduce="amin")
    return torch.where(first == torch.iinfo(torch.long).max, torch.full_like(first, -1), first)


def pixels_to_points(pixel_labels: torch.Tensor, pair_point: torch.Tensor, pair_image: torch.Tensor,
                     pair_uv: torch.Tensor, num_points: int) -> torch.Tensor:
    """Point labels read at each point's first paired pixel; 255 where a point has no pair."""
    first = first_pair_of_point(pair_point, num_points)
    has = first >= 0
    k = first.clamp(min=0)
    lab = pixel_labels[pair_image[k], pair_uv[k, 1], pair_uv[k, 0]].long()
    return torch.where(has, lab, torch.full_like(lab, IGNORE))


def points_to_pixels(point_labels: torch.Tensor, pair_point: torch.Tensor, pair_image: torch.Tensor,
                     pair_uv: torch.Tensor, image_shape) -> torch.Tensor:
    """A pixel map [I, H, W] holding the point labels at their paired pixels, 255 elsewhere."""
    out = torch.full(tuple(image_shape), IGNORE, dtype=torch.long, device=point_labels.device)
    out[pair_image, pair_uv[:, 1], pair_uv[:, 0]] = point_labels[pair_point].long()
    return out


def refine_points_through_pairs(point_labels: torch.Tensor, mask_id: torch.Tensor, pair_point: torch.Tensor,
                                pair_image: torch.Tensor, pair_uv: torch.Tensor, num_classes: int
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4 for point labels: every pair votes with its point's label for the SAM mask its pixel lies in.

    Returns ``(pixel_labels [I, H, W], point_labels [P])``: each pixel of a mask with votes takes the mask's
    majority; other pixels keep the label of a point projecting there (or 255). Each point whose first pair
    falls into a voted mask takes that mask's majority; other points keep their label.
    """
    group, num_groups = per_image_groups(mask_id)
    base_pixels = points_to_pixels(point_labels, pair_point, pair_image, pair_uv, mask_id.shape)
    if num_groups == 0 or len(pair_point) == 0:
        return base_pixels, point_labels.long().clone()
    pair_group = group[pair_image, pair_uv[:, 1], pair_uv[:, 0]]
    majority, has_votes = mask_majority(pair_group, point_labels[pair_point], num_groups, num_classes)
    pixels = apply_majority(base_pixels, group, majority, has_votes)
    first = first_pair_of_point(pair_point, len(point_labels))
    point_group = torch.where(first >= 0, pair_group[first.clamp(min=0)], torch.full_like(first, -1))
    points = apply_majority(point_labels.long(), point_group, majority, has_votes)
    return pixels, points


class LabelSources:
    """Computes the (pixel, point) labels of each source on demand, once per batch."""

    def __init__(self, batch: dict, pred2d: torch.Tensor | None, pred3d: torch.Tensor | None, num_classes: int,
                 refine: bool):
        self.b, self.pred2d, self.pred3d, self.L, self.refine = batch, pred2d, pred3d, num_classes, refine
        self.num_points = len(batch["coord"])
        self._cache: dict[str, tuple] = {}

    def _pairs(self):
        b = self.b
        return b["pair_point"], b["pair_image"], b["pair_uv"]

    def _from_pixels(self, pixels):
        return pixels.long(), pixels_to_points(pixels, *self._pairs(), self.num_points)

    def _from_points(self, points):
        if self.refine:
            return refine_points_through_pairs(points, self.b["mask_id"], *self._pairs(), self.L)
        return points_to_pixels(points, *self._pairs(), self.b["mask_id"].shape), points.long()

    def get(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self._cache:
            b = self.b
            if name == "clip2d":
                self._cache[name] = self._from_pixels(b["clip_refined"] if self.refine else b["clip_label"])
            elif name == "clip3d":
                raw = pixels_to_points(b["clip_label"], *self._pairs(), self.num_points)
                self._cache[name] = self._from_points(raw)
            elif name == "pred2d":
                pix = sam_max_vote(self.pred2d, b["mask_id"], self.L) if self.refine else self.pred2d
                self._cache[name] = self._from_pixels(pix)
            elif name == "pred3d":
                self._cache[name] = self._from_points(self.pred3d)
            else:
                raise KeyError(name)
        return self._cache[name]


def allowed_sources(cfg: dict, stage: int) -> tuple[list[str], list[str]]:
    """The sources each network may draw its target from: ``(for the 2D net, for the 3D net)``.

    Stage 1 trains both on the refined CLIP labels (for the 3D net: transferred to the paired points).
    Stage 2 draws from ``labels.stage2_sources``; without cross-training a network keeps only its own
    modality's sources (2D: clip2d/pred2d, 3D: clip3d/pred3d), falling back to its own CLIP labels.
    """
    if stage == 1:
        return ["clip2d"], ["clip2d"]
    sources = list(cfg["labels"]["stage2_sources"])
    if cfg["labels"]["cross_training"]:
        return sources, sources
    own2d = [s for s in sources if s in ("clip2d", "pred2d")] or ["clip2d"]
    own3d = [s for s in sources if s in ("clip3d", "pred3d")] or ["clip3d"]
    return own2d, own3d


def switch_targets(sources: LabelSources, batch: dict, allowed2d: list[str], allowed3d: list[str],
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Label switching: for each sample (frame) and each network, draw one allowed source with equal
    probability; the 2D target of a frame's images and the 3D target of its points come from that source.

    Returns ``(target2d [I, H, W], target3d [P], choices)`` with ``choices`` = the drawn names per frame.
    """
    num_frames = len(batch["point_offset"]) - 1
    draw2d = torch.randint(len(allowed2d), (num_frames,), generator=generator).tolist()
    draw3d = torch.randint(len(allowed3d), (num_frames,), generator=generator).tolist()
    p_off, i_off = batch["point_offset"].tolist(), batch["image_offset"].tolist()
    target2d = torch.full(batch["mask_id"].shape, IGNORE, dtype=torch.long, device=batch["mask_id"].device)
    target3d = torch.full((len(batch["coord"]),), IGNORE, dtype=torch.long, device=batch["coord"].device)
    for f in range(num_frames):
        pix, _ = sources.get(allowed2d[draw2d[f]])
        target2d[i_off[f]:i_off[f + 1]] = pix[i_off[f]:i_off[f + 1]]
        _, pts = sources.get(allowed3d[draw3d[f]])
        target3d[p_off[f]:p_off[f + 1]] = pts[p_off[f]:p_off[f + 1]]
    choices = {"2d": [allowed2d[i] for i in draw2d], "3d": [allowed3d[i] for i in draw3d]}
    return target2d, target3d, choices
