"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), NACLIP's post-processing.

Class scores are propagated ``iterations`` times between each pixel and its 8 neighbours at every dilation,
weighted by the softmax (over all neighbours) of ``-|I_p - I_n| / (0.1 * std_p)`` averaged over the image
channels, where ``std_p`` is the standard deviation of the image over the pixel and its neighbours at all
dilations (replicate padding at the borders). NACLIP's defaults: 10 iterations, dilations (8, 16), applied to
the upsampled patch scores with the normalised input image as the guide.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PAMR_ITERATIONS = 10
PAMR_DILATIONS = (8, 16)
_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _neighbours(t: torch.Tensor, dilation: int, with_centre: bool = False) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, 8 (or 9), H, W]: the values at the 8 neighbours ``dilation`` pixels away."""
    h, w = t.shape[-2:]
    d = int(dilation)
    padded = F.pad(t, (d, d, d, d), mode="replicate")
    offsets = _OFFSETS + (((0, 0),) if with_centre else ())
    return torch.stack([padded[..., d + dy * d:d + dy * d + h, d + dx * d:d + dx * d + w] for dy, dx in offsets], 2)


def pamr_affinity(image: torch.Tensor, dilations=PAMR_DILATIONS) -> torch.Tensor:
    """Neighbour weights [B, 1, 8 * len(dilations), H, W] (a softmax over the neighbours) of ``image`` [B, C, H, W]."""
    image = image.float()
    near = torch.cat([_neighbours(image, d) for d in dilations], 2)
    spread = torch.cat([_neighbours(image, d, with_centre=True) for d in dilations], 2).std(2, keepdim=True)
    aff = -(image.unsqueeze(2) - near).abs() / (1e-8 + 0.1 * spread)
    return aff.mean(1, keepdim=True).softmax(2)


def pamr(image: torch.Tensor, scores: torch.Tensor, iterations: int = PAMR_ITERATIONS,
         dilations=PAMR_DILATIONS) -> torch.Tensor:
    """Refined ``scores`` [B, L, H, W] (same size as ``image`` [B, C, H, W]); linear in ``scores``."""
    aff = pamr_affinity(image, dilations)
    for _ in range(int(iterations)):
        scores = (torch.cat([_neighbours(scores, d) for d in dilations], 2) * aff).sum(2)
    return scores
