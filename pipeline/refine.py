"""SAM max-voting, paper Eq. 4 — the one implementation, used by the ``refine`` stage and by the trainer.

Every pixel (or point) inside a SAM mask takes the majority label of that mask; pixels outside every mask
(mask id ``-1``) keep their label. Votes with ``ignore_index`` do not count; a mask without any valid vote
keeps its labels unchanged. Ties go to the smallest class index (``argmax`` of the vote counts).

Vectorised with one ``bincount`` over (mask id x class): no Python loop over masks.
"""
from __future__ import annotations

import torch

from data_cache.schema import IGNORE_INDEX


def mask_majority(group: torch.Tensor, labels: torch.Tensor, num_groups: int, num_classes: int,
                  ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Majority label per group.

    Args:
        group: int tensor of group ids (``-1`` = no group), any shape.
        labels: int tensor of class indices, same shape as ``group``.
        num_groups: number of groups G (ids are ``0..G-1``).
        num_classes: number of classes C (labels ``>= C`` other than ``ignore_index`` are an error).
    Returns:
        ``majority`` [G] int64 (the most voted class; ties to the lowest index) and ``has_votes`` [G] bool.
    """
    counts = _vote_counts(group.reshape(-1), labels.reshape(-1), num_groups, num_classes, ignore_index)
    return counts.argmax(dim=1), counts.amax(dim=1) > 0


def _vote_counts(group: torch.Tensor, labels: torch.Tensor, num_groups: int, num_classes: int,
                 ignore_index: int) -> torch.Tensor:
    """[G, C] vote counts from one bincount; votes outside any group or ignored land in a spare last bin.

    The keys are computed in int32 where they fit (several times faster than int64 on CPU) and without
    boolean selection, which copies.
    """
    bins = num_groups * num_classes
    dtype = torch.int32 if bins < 2 ** 31 - 1 else torch.int64
    g = group.to(dtype)
    lab = labels.to(dtype)
    out_of_range = (lab >= num_classes) & (lab != ignore_index)
    if bool(out_of_range.any()):
        raise ValueError(f"label {int(lab[out_of_range].max())} out of range for {num_classes} classes")
    key = torch.where((g >= 0) & (lab != ignore_index), g * num_classes + lab, bins)
    return torch.bincount(key.long(), minlength=bins + 1)[:bins].view(num_groups, num_classes)


def sam_max_vote(labels: torch.Tensor, mask_ids: torch.Tensor, num_classes: int,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Refine a label map with SAM masks (Eq. 4).

    Args:
        labels: [..., H, W] class indices (uint8/int), ``ignore_index`` = no label.
        mask_ids: same shape, int, ``-1`` = no mask; ids are per image (the leading dims are images), so the
            same id in two images is two masks.
        num_classes: number of classes.
    Returns:
        The refined labels, same shape and dtype as ``labels``.
    """
    if labels.shape != mask_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and mask ids {tuple(mask_ids.shape)} differ in shape")
    group, num_groups = per_image_groups(mask_ids)
    if num_groups == 0:
        return labels.clone()
    majority, has_votes = mask_majority(group, labels, num_groups, num_classes, ignore_index)
    return apply_majority(labels, group, majority, has_votes)


def per_image_groups(mask_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Make mask ids unique across the leading (image) dimensions: returns global ids and their count."""
    ids = mask_ids.long()
    if ids.dim() <= 2:
        return ids, int(ids.max()) + 1 if ids.numel() else 0
    flat = ids.reshape(-1, ids.shape[-2] * ids.shape[-1])
    stride = int(flat.max()) + 1 if flat.numel() else 0
    if stride <= 0:
        return ids, 0
    base = torch.arange(flat.shape[0], device=ids.device).unsqueeze(1) * stride
    glob = torch.where(flat >= 0, flat + base, torch.full_like(flat, -1))
    return glob.view_as(ids), stride * flat.shape[0]


def apply_majority(labels: torch.Tensor, group: torch.Tensor, majority: torch.Tensor,
                   has_votes: torch.Tensor) -> torch.Tensor:
    """Give every element of a group with votes its group's majority; others keep their label.

    Looks up tables shifted by one (row 0 = "no group") with ``index_select``, which avoids both a clamp of
    the ids and boolean indexing.
    """
    idx = group.reshape(-1).long() + 1
    value = torch.cat([labels.new_zeros(1), majority.to(labels.dtype)]).index_select(0, idx)
    take = torch.cat([has_votes.new_zeros(1), has_votes]).index_select(0, idx)
    return torch.where(take, value, labels.reshape(-1)).view_as(labels)


def sam_max_vote_loop(labels: torch.Tensor, mask_ids: torch.Tensor, num_classes: int,
                      ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Reference implementation with a Python loop over masks (tests and the benchmark only)."""
    out = labels.clone()
    lab2 = labels.reshape(-1, labels.shape[-2], labels.shape[-1]) if labels.dim() > 2 else labels[None]
    ids2 = mask_ids.reshape(lab2.shape) if labels.dim() > 2 else mask_ids[None]
    out2 = out.view(lab2.shape)
    for i in range(lab2.shape[0]):
        for m in torch.unique(ids2[i]).tolist():
            if m < 0:
                continue
            sel = ids2[i] == m
            votes = lab2[i][sel].long()
            votes = votes[votes != ignore_index]
            if votes.numel() == 0:
                continue
            counts = torch.bincount(votes, minlength=num_classes)
            out2[i][sel] = int(counts.argmax())
    return out
