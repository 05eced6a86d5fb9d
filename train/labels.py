"""Training targets: the four label sources of stage 2 and the per-sample label switching (paper sec. 3.2).

Each source gives a pixel label map [I, H, W] and a point label vector [P] (255 = no label):

==========  =====================================================================================
clip2d      the SAM-refined MaskCLIP labels (``clip/label_refined``); points take their paired pixel's
clip3d      the raw MaskCLIP labels projected to the points, then max-voted through the pairs within each
            SAM mask and spread to the mask's pixels and points (:func:`refine_points_through_pairs`)
pred2d      the 2D net's own prediction, max-voted per SAM mask (Eq. 4 per image); points via the pairs
pred3d      the 3D net's own prediction, refined through the pairs like clip3d
gt          (``labels.oracle``, a sanity row, not the method) the ground truth: ``images/gt`` where the
            store has it, else the labels of the points projecting to a pixel; ``points/gt`` for
            every point, paired or not
==========  =====================================================================================

A point without a pair gets no target (255) from any source: the paper supervises the 3D net only through
pixel-point pairs, and a net's own argmax as its target would be entropy minimisation it never asks for.

``labels.point_targets`` says how a point seen by several cameras is supervised (:data:`POINT_TARGETS`):

* ``pairs`` (the default, the paper's reading of Eq. 5-6, whose 3D sums run over the pixel-point pairs i):
  every pair is a term of the 3D cross-entropy, its label the source's label *at that pair*: for clip2d /
  pred2d the pixel of the pair; for clip3d / pred3d the SAM-voted majority of the mask the pair's pixel lies
  in (the point's own label where that mask has no votes, or without refinement). The 3D target is then one
  label per pair [K]; :func:`train.losses.pair_cross_entropy` sums CE(phi_s(p_i), y_i) over the pairs as the
  equivalent soft target per point (the histogram of its pairs' labels, weighted by its number of pairs),
  exact in value and gradient without materialising [K, L] logits (rooms: ~10 pairs per point).
* ``first_pair`` (the project's reading before this option): a point takes the label of its first pair
  (lowest pair index) only; one term per point. The benchmark's and the demo's configurations pin it, since
  their committed numbers were measured with it.

``labels.switch_gate`` (not the paper's; default ``none``) limits where the networks' own predictions are
drawn in stage 2, so that a network's blind spots are not passed on as targets (docs/benchmark.md, rooms):

* ``confidence``: a prediction with a softmax probability below ``labels.gate_confidence`` neither votes in
  Eq. 4 nor labels its element (255 before the voting; a SAM mask with confident votes still spreads them);
* ``agree_sam``: pred2d / pred3d label an element only where they agree with the clip2d label there (the
  SAM-refined CLIP label; the raw one with ``labels.refine: false``).

Where a gated prediction gives 255 the Eq. 6 draw falls to the sources that label the element.

The ground-truth source of ``labels.oracle`` always supervises every point once with its own label
(:func:`point_target_mode`): it has one label per point, paired or not.

With ``labels.refine: false`` ('w/o refinement') no voting happens: clip2d uses ``clip/label`` and the
3D sources reach pixels only where a point projects. All voting is the shared Eq. 4 code of
:mod:`pipeline.refine`; nothing here counts votes itself.
"""
from __future__ import annotations

import torch

from data_cache.schema import IGNORE_INDEX as IGNORE
from pipeline.refine import apply_majority, mask_majority, per_image_groups, sam_max_vote

from .config import DEFAULTS, POINT_TARGETS


def point_target_mode(cfg: dict) -> str:
    """The effective ``labels.point_targets``: ``first_pair`` for the oracle (one ground-truth label per point,
    unpaired points included), else the configured mode."""
    return "first_pair" if cfg["labels"].get("oracle") else cfg["labels"]["point_targets"]


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
    if len(pair_point) == 0:  # e.g. every pair cropped away: nothing to read
        return torch.full((num_points,), IGNORE, dtype=torch.long, device=pixel_labels.device)
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
    return vote_through_pairs(point_labels, mask_id, pair_point, pair_image, pair_uv, num_classes)[:2]


def vote_through_pairs(point_labels: torch.Tensor, mask_id: torch.Tensor, pair_point: torch.Tensor,
                       pair_image: torch.Tensor, pair_uv: torch.Tensor, num_classes: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`refine_points_through_pairs` plus the label of each pair [K]: the majority of the mask its pixel
    lies in where that mask has votes, else its point's label. A point's label is the label of its first pair."""
    group, num_groups = per_image_groups(mask_id)
    base_pixels = points_to_pixels(point_labels, pair_point, pair_image, pair_uv, mask_id.shape)
    own = point_labels.long()[pair_point]
    if num_groups == 0 or len(pair_point) == 0:
        return base_pixels, point_labels.long().clone(), own
    pair_group = group[pair_image, pair_uv[:, 1], pair_uv[:, 0]]
    majority, has_votes = mask_majority(pair_group, point_labels[pair_point], num_groups, num_classes)
    pixels = apply_majority(base_pixels, group, majority, has_votes)
    pairs = apply_majority(own, pair_group, majority, has_votes)
    first = first_pair_of_point(pair_point, len(point_labels))
    points = torch.where(first >= 0, pairs[first.clamp(min=0)], point_labels.long())
    return pixels, points, pairs


class LabelSources:
    """Computes the (pixel, point, pair) labels of each source on demand, once per batch.

    ``gate`` is ``labels.switch_gate`` (module docstring); ``confidence``: the softmax probability of each
    prediction, ``(conf2d [I, H, W], conf3d [P])``, needed for ``gate="confidence"`` with ``threshold``."""

    def __init__(self, batch: dict, pred2d: torch.Tensor | None, pred3d: torch.Tensor | None, num_classes: int,
                 refine: bool, gate: str = "none", confidence: tuple | None = None,
                 threshold: float = DEFAULTS["labels"]["gate_confidence"]):
        self.b, self.pred2d, self.pred3d, self.L, self.refine = batch, pred2d, pred3d, num_classes, refine
        self.num_points = len(batch["coord"])
        self.gate, self.threshold = gate, float(threshold)
        if gate == "confidence" and (pred2d is not None or pred3d is not None):
            if confidence is None:
                raise ValueError("labels.switch_gate=confidence needs the predictions' confidences")
            self.pred2d, self.pred3d = (None if p is None else torch.where(c >= self.threshold, p.long(),
                                                                            torch.full_like(p.long(), IGNORE))
                                        for p, c in zip((pred2d, pred3d), confidence))
        self._cache: dict[str, tuple] = {}

    def _pairs(self):
        b = self.b
        return b["pair_point"], b["pair_image"], b["pair_uv"]

    def _from_pixels(self, pixels):
        pair_point, pair_image, pair_uv = self._pairs()
        return (pixels.long(), pixels_to_points(pixels, *self._pairs(), self.num_points),
                pixels[pair_image, pair_uv[:, 1], pair_uv[:, 0]].long())

    def _from_points(self, points):
        if self.refine:
            return vote_through_pairs(points, self.b["mask_id"], *self._pairs(), self.L)
        return (points_to_pixels(points, *self._pairs(), self.b["mask_id"].shape), points.long(),
                points.long()[self.b["pair_point"]])

    def _compute(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = self.b
        if name == "clip2d":
            return self._from_pixels(b["clip_refined"] if self.refine else b["clip_label"])
        if name == "clip3d":
            return self._from_points(pixels_to_points(b["clip_label"], *self._pairs(), self.num_points))
        if name == "pred2d":
            return self._from_pixels(sam_max_vote(self.pred2d, b["mask_id"], self.L) if self.refine else self.pred2d)
        if name == "gt":
            projected = points_to_pixels(b["point_gt"], *self._pairs(), b["mask_id"].shape)
            image_gt = b["image_gt"].long()
            point_gt = b["point_gt"].long()
            return torch.where(image_gt != IGNORE, image_gt, projected), point_gt, point_gt[b["pair_point"]]
        if name == "pred3d":  # unpaired points: no target, like every other source
            paired = first_pair_of_point(b["pair_point"], self.num_points) >= 0
            return self._from_points(torch.where(paired, self.pred3d.long(),
                                                 torch.full_like(self.pred3d.long(), IGNORE)))
        raise KeyError(name)

    def _get3(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if name not in self._cache:
            labels = self._compute(name)
            if self.gate == "agree_sam" and name in ("pred2d", "pred3d"):
                labels = tuple(torch.where(x == ref, x, torch.full_like(x, IGNORE))
                               for x, ref in zip(labels, self._get3("clip2d")))
            self._cache[name] = labels
        return self._cache[name]

    def get(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pixel labels [I, H, W], point labels [P])`` of a source (a point: its first pair's label)."""
        return self._get3(name)[:2]

    def pairs(self, name: str) -> torch.Tensor:
        """The source's label of each pixel-point pair [K] (``labels.point_targets: pairs``)."""
        return self._get3(name)[2]


def allowed_sources(cfg: dict, stage: int) -> tuple[list[str], list[str]]:
    """The sources each network may draw its target from: ``(for the 2D net, for the 3D net)``.

    Stage 1 trains both on the refined CLIP labels (for the 3D net: transferred to the paired points).
    ``labels.oracle`` trains both on the ground truth in both stages. A 2D-only model (``model.net3d``
    null) gets no 3D sources.
    Stage 2 draws from ``labels.stage2_sources``; without cross-training a network keeps only its own
    modality's sources (2D: clip2d/pred2d, 3D: clip3d/pred3d), falling back to its own CLIP labels.
    """
    two_d_only = not cfg["model"]["net3d"]
    if cfg["labels"].get("oracle"):
        return ["gt"], ([] if two_d_only else ["gt"])
    if stage == 1:
        return ["clip2d"], ([] if two_d_only else ["clip2d"])
    sources = list(cfg["labels"]["stage2_sources"])
    if two_d_only:  # 2D-only (nuImages): Eq. 5-6 with the 2D sources, no 3D target
        return sources, []
    if cfg["labels"]["cross_training"]:
        return sources, sources
    own2d = [s for s in sources if s in ("clip2d", "pred2d")] or ["clip2d"]
    own3d = [s for s in sources if s in ("clip3d", "pred3d")] or ["clip3d"]
    return own2d, own3d


def _pick_per_element(labels: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each element (column of ``labels`` [S, N]) pick, with the uniform variate ``u`` [N], one of the
    sources that label it, with equal probability; 255 where none does.

    Returns ``(target [N], source index [N], -1 where no source labels the element)``."""
    valid = labels != IGNORE
    count = valid.sum(0)
    k = (u * count).long().clamp(max=(count - 1).clamp(min=0))  # the k-th labelling source
    rank = valid.long().cumsum(0) - 1
    chosen = valid & (rank == k.unsqueeze(0))
    src = torch.where(count > 0, chosen.long().argmax(0), torch.full_like(count, -1))
    target = labels.gather(0, src.clamp(min=0).unsqueeze(0))[0]
    return torch.where(src >= 0, target, torch.full_like(target, IGNORE)), src


def _shares(src: torch.Tensor, names: list[str]) -> dict[str, float]:
    """The realised share of each source among all elements (``none``: elements left without target)."""
    n = max(int(src.numel()), 1)
    counts = torch.bincount(src.reshape(-1) + 1, minlength=len(names) + 1).tolist()
    return {"none": counts[0] / n, **{name: c / n for name, c in zip(names, counts[1:])}}


def switch_targets(sources: LabelSources, batch: dict, allowed2d: list[str], allowed3d: list[str],
                   generator: torch.Generator, unit: str = "pair", point_targets: str = "first_pair"
                   ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """**Eq. 6** label switching: the target of each supervised element is drawn with equal probability
    among the allowed sources.

    ``unit="pair"`` (the paper's R*_i): one uniform variate per pixel, and

    * ``point_targets="first_pair"``: one per point; a pixel that a point projects to takes the variate of
      that point (of the lowest-indexed one), so a pixel and its paired point draw the same source;
    * ``point_targets="pairs"``: each pair takes the variate of its pixel, so the 2D term of a pixel and the
      3D term of every pair at that pixel draw the same source; the pairs of one point draw independently.

    With cross-training that is the same label source in the 2D and the 3D term; without it the same kind
    (CLIP or prediction) of each net's own modality. An unpaired pixel draws on its own; an unpaired point
    has no target from any source. The draw is among the allowed sources that *label* the element (a 3D
    source reaches a pixel only through a pair or, refined, a SAM mask with votes), so a 255 in one source
    never turns an element into 'no supervision' while another allowed source labels it.

    ``unit="frame"``: for each frame and each network one source, drawn with equal probability; the
    frame's images / points (pairs) take that source's labels, 255 included.

    Returns ``(target2d [I, H, W], target3d, info)``: ``target3d`` is [P] (``first_pair``) or one label per
    pair [K] (``pairs``, for :func:`train.losses.pair_cross_entropy`); ``info["share2d"]``/``["share3d"]``
    hold the realised share of each allowed source among all pixels / points or pairs (``none``: left without
    target), and for ``frame`` ``info["2d"]``/``["3d"]`` the names drawn per frame. The function's default
    ``first_pair`` keeps the per-point interface; the configuration's default is ``pairs``.
    """
    if point_targets not in POINT_TARGETS:
        raise ValueError(f"unknown labels.point_targets '{point_targets}' ({' | '.join(POINT_TARGETS)})")
    if unit == "frame":
        return _switch_per_frame(sources, batch, allowed2d, allowed3d, generator, point_targets)
    if unit != "pair":
        raise ValueError(f"unknown label switching unit '{unit}' (pair | frame)")
    mask_id = batch["mask_id"]
    dev = mask_id.device
    num_images, H, W = mask_id.shape
    num_points = len(batch["coord"])
    u_point = torch.rand(num_points, generator=generator).to(dev)
    u_pixel = torch.rand(num_images * H * W, generator=generator).to(dev)
    pair_point, pair_image, pair_uv = batch["pair_point"], batch["pair_image"], batch["pair_uv"]
    flat = (pair_image * H + pair_uv[:, 1]) * W + pair_uv[:, 0]
    if point_targets == "pairs":
        u_pair = u_pixel[flat]  # R*_i: a pair draws with its pixel
    elif len(pair_point):
        owner = torch.full((num_images * H * W,), num_points, dtype=torch.long, device=dev)
        owner.scatter_reduce_(0, flat, pair_point, reduce="amin")
        paired = owner < num_points
        u_pixel[paired] = u_point[owner[paired]]
    pix = torch.stack([sources.get(n)[0].reshape(-1) for n in allowed2d])
    target2d, src2d = _pick_per_element(pix, u_pixel)
    info = {"share2d": _shares(src2d, allowed2d)}
    if not allowed3d:  # a 2D-only model: no 3D target at all
        return target2d.view(num_images, H, W), torch.zeros(0, dtype=torch.long, device=dev), info
    if point_targets == "pairs":
        target3d, src3d = _pick_per_element(torch.stack([sources.pairs(n) for n in allowed3d]), u_pair)
    else:
        target3d, src3d = _pick_per_element(torch.stack([sources.get(n)[1] for n in allowed3d]), u_point)
    info["share3d"] = _shares(src3d, allowed3d)
    return target2d.view(num_images, H, W), target3d, info


def _switch_per_frame(sources: LabelSources, batch: dict, allowed2d: list[str], allowed3d: list[str],
                      generator: torch.Generator, point_targets: str = "first_pair"
                      ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    num_frames = len(batch["point_offset"]) - 1
    draw2d = torch.randint(len(allowed2d), (num_frames,), generator=generator).tolist()
    draw3d = torch.randint(max(len(allowed3d), 1), (num_frames,), generator=generator).tolist()
    i_off = batch["image_offset"].tolist()
    per_pair = point_targets == "pairs"
    # the elements of the 3D target: points, or pairs (a pair belongs to its point's frame)
    frame_of_3d = torch.bucketize(batch["pair_point"] if per_pair else torch.arange(len(batch["coord"]),
                                                                              device=batch["coord"].device),
                                  batch["point_offset"][1:].to(batch["pair_point"].device), right=True)
    target2d = torch.full(batch["mask_id"].shape, IGNORE, dtype=torch.long, device=batch["mask_id"].device)
    target3d = torch.full(frame_of_3d.shape, IGNORE, dtype=torch.long, device=batch["coord"].device)
    src2d = torch.full(target2d.shape, -1, dtype=torch.long, device=target2d.device)
    src3d = torch.full(target3d.shape, -1, dtype=torch.long, device=target3d.device)
    for f in range(num_frames):
        pix, _ = sources.get(allowed2d[draw2d[f]])
        target2d[i_off[f]:i_off[f + 1]] = pix[i_off[f]:i_off[f + 1]]
        if allowed3d:
            name = allowed3d[draw3d[f]]
            labels3d = sources.pairs(name) if per_pair else sources.get(name)[1]
            in_frame = frame_of_3d == f
            target3d[in_frame] = labels3d[in_frame]
        src2d[i_off[f]:i_off[f + 1]] = draw2d[f]
        src3d[frame_of_3d == f] = draw3d[f]
    src2d = torch.where(target2d == IGNORE, torch.full_like(src2d, -1), src2d)
    src3d = torch.where(target3d == IGNORE, torch.full_like(src3d, -1), src3d)
    info = {"2d": [allowed2d[i] for i in draw2d], "share2d": _shares(src2d, allowed2d)}
    if allowed3d:
        info.update({"3d": [allowed3d[i] for i in draw3d], "share3d": _shares(src3d, allowed3d)})
    return target2d, target3d, info
