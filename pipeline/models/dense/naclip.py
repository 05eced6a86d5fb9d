"""``naclip`` (Hajimiri et al., WACV 2025; sinahmr/NACLIP ``clip/model.py``, ``arch='reduced'``,
``attn_strategy='naclip'``).

k-k attention plus a Gaussian neighbourhood window, the last block's residual and FFN dropped:
``x = out_proj(softmax(s k k^T + Omega) v)`` (per head), where ``Omega[i, j] = exp(-|p_i - p_j|^2 / (2 sigma^2))``
for the patch-grid positions ``p`` (row, column in patches) of tokens i, j and 0 on the class token's row and
column; ``sigma`` = ``maskclip.naclip_sigma`` (NACLIP's 5).
Deviations: NACLIP slides 224x224 windows (stride 112) and scales the logits by 40; here the whole training
image is one window and the stage's ``logit_scale`` applies. Its PAMR post-processing is the stage option
``maskclip.pamr`` (:mod:`pipeline.models.pamr`), off by default.
"""
from __future__ import annotations

import functools

import torch

from . import DENSE_TEACHERS, DenseTeacher, TeacherError, attend, heads_qkv, self_similarity


@functools.lru_cache(maxsize=8)
def neighbourhood_window(grid_hw: tuple[int, int], sigma: float) -> torch.Tensor:
    """Omega [1 + h*w, 1 + h*w] float32: the Gaussian of the patch distance, zero row/column for the class token."""
    h, w = grid_hw
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
    p = torch.stack([rows.flatten(), cols.flatten()], 1)
    omega = torch.zeros(1 + h * w, 1 + h * w)
    omega[1:, 1:] = torch.exp(-torch.cdist(p, p).square() / (2.0 * sigma ** 2))
    return omega


@DENSE_TEACHERS.register("naclip")
class NACLIPTeacher(DenseTeacher):
    name = "naclip"
    changes = "attention -> softmax(s kk^T + Gaussian window over patch positions); no residual, no FFN"
    published = "NACLIP README (sinahmr/NACLIP), ViT-B/16 with PAMR: Cityscapes 38.27, VOC20 83.03"
    options = {"naclip_sigma": 5.0}

    def __init__(self, **options):
        super().__init__(**options)
        sigma = self.config["naclip_sigma"]
        if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not sigma > 0:
            raise TeacherError(f"maskclip.naclip_sigma must be a positive number, got {sigma!r}")

    def __call__(self, block, x, grid_hw):
        q, k, v, s = heads_qkv(block, x)
        omega = neighbourhood_window(tuple(int(g) for g in grid_hw), float(self.config["naclip_sigma"]))
        logits = self_similarity(k, s) + omega.to(k.device, k.dtype)
        return attend(block, logits.softmax(-1), v)
