"""SAM max-voting, paper Eq. 4 — the one implementation, used by the ``refine`` stage and by the trainer.

Every pixel (or point) inside a SAM mask takes the majority label of that mask; pixels outside every mask
(mask id ``-1``) keep their label. Votes with ``ignore_index`` do not count; a mask without any valid vote
keeps its labels unchanged. Ties go to the smallest class index (``argmax`` of the vote counts).

Vectorised, no Python loop over masks. Every element gets one integer key ``row * width + label``, where
``row`` is its group's row in the vote table (row 0 of an image's block = "in no mask") and ``width`` covers
every label value (classes and ``ignore_index``: 256 for uint8 labels). One ``bincount`` of the keys gives the
[rows, width] vote counts; the refined label of each (row, label) pair is tabulated (the row's majority where
it has votes, else the label itself) and one gather of that table by the same keys writes the result: the keys
are computed once and there is no boolean mask over the pixels.
"""
from __future__ import annotations

import torch

from data_cache.schema import IGNORE_INDEX


def label_width(labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> int:
    """Width of a vote-table row: the number of label values, classes and ``ignore_index`` included.

    Raises ``ValueError`` for a label outside ``0..width-1`` (found with one min/max; uint8 labels of a
    256-wide table cannot be outside).
    """
    if ignore_index < 0:
        raise ValueError(f"ignore_index must be >= 0 (got {ignore_index})")
    width = max(num_classes, ignore_index + 1)
    if labels.numel() and not (labels.dtype == torch.uint8 and width >= 256):
        lo, hi = torch.aminmax(labels)
        if int(lo) < 0 or int(hi) >= width:
            bad = int(lo) if int(lo) < 0 else int(hi)
            raise ValueError(f"label {bad} out of range for {num_classes} classes")
    return width


def vote_keys(rows: torch.Tensor, labels: torch.Tensor, width: int, num_rows: int) -> torch.Tensor:
    """Flat keys ``rows * width + labels``: int32 where the table fits (faster than int64 on CPU)."""
    dtype = torch.int32 if num_rows * width < 2 ** 31 else torch.int64
    key = rows.reshape(-1).to(dtype).mul(width)
    return key.add_(labels.reshape(-1) if labels.dtype == torch.uint8 else labels.reshape(-1).to(dtype))


def vote_counts(keys: torch.Tensor, num_rows: int, width: int, num_classes: int,
                ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """[rows, width] vote counts of the keys (one ``bincount``); a label that is neither a class nor
    ``ignore_index`` is an error. The ignore column is zeroed: its votes do not count."""
    counts = torch.bincount(keys, minlength=num_rows * width).view(num_rows, width)
    extra = counts[:, num_classes:].sum(dim=0)
    if ignore_index >= num_classes:
        extra[ignore_index - num_classes] = 0
    if bool(extra.any()):
        raise ValueError(f"label {num_classes + int(extra.nonzero().max())} out of range for {num_classes} classes")
    if ignore_index < num_classes:
        counts[:, ignore_index] = 0
    return counts


def majority_of(counts: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``majority`` [rows] (ties to the lowest class) and ``has_votes`` [rows] of vote counts [rows, width]."""
    votes = counts[:, :num_classes]
    return votes.argmax(dim=1), votes.amax(dim=1) > 0


def relabel(keys: torch.Tensor, majority: torch.Tensor, has_votes: torch.Tensor, width: int,
            like: torch.Tensor) -> torch.Tensor:
    """The refined labels, shaped and typed like ``like``: the table [rows, width] holds each row's majority
    where it has votes and the label itself elsewhere; one gather of it by the keys."""
    dtype = like.dtype
    table = torch.where(has_votes[:, None], majority.to(dtype)[:, None],
                        torch.arange(width, device=like.device).to(dtype)[None])
    return table.view(-1).index_select(0, keys).view_as(like)


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
    width = label_width(labels, num_classes, ignore_index)
    keys = vote_keys(group.reshape(-1) + 1, labels, width, num_groups + 1)  # row 0: no group
    counts = vote_counts(keys, num_groups + 1, width, num_classes, ignore_index)
    return majority_of(counts[1:], num_classes)


def apply_majority(labels: torch.Tensor, group: torch.Tensor, majority: torch.Tensor,
                   has_votes: torch.Tensor) -> torch.Tensor:
    """Give every element of a group with votes its group's majority; others keep their label.

    ``labels`` must be ``>= 0`` (they are a class or the ignore index).
    """
    if labels.numel() == 0:
        return labels.clone()
    width = max(int(labels.max()) + 1, int(majority.max()) + 1 if len(majority) else 1)
    if int(labels.min()) < 0:
        raise ValueError(f"label {int(labels.min())} out of range (labels must be >= 0)")
    keys = vote_keys(group.reshape(-1) + 1, labels, width, len(majority) + 1)  # row 0: no group
    return relabel(keys, torch.cat([majority.new_zeros(1), majority]),
                   torch.cat([has_votes.new_zeros(1), has_votes]), width, labels)


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
    width = label_width(labels, num_classes, ignore_index)
    if labels.numel() == 0:
        return labels.clone()
    # one block of rows per image: row 0 = no mask, row 1 + m = mask m
    ids = mask_ids.reshape(-1, mask_ids.shape[-2] * mask_ids.shape[-1]) if mask_ids.dim() >= 2 \
        else mask_ids.reshape(1, -1)
    stride = int(ids.max()) + 2
    num_rows = stride * ids.shape[0]
    keys = vote_keys(ids, labels, width, num_rows)
    first = torch.arange(ids.shape[0], device=ids.device).mul_(stride).add_(1).mul_(width)
    keys = keys.view(ids.shape).add_(first.to(keys.dtype)[:, None]).view(-1)
    counts = vote_counts(keys, num_rows, width, num_classes, ignore_index)
    majority, has_votes = majority_of(counts, num_classes)
    has_votes[::stride] = False  # the "no mask" rows keep their labels
    return relabel(keys, majority, has_votes, width, labels)


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
