"""``clearclip`` (Lan et al., ECCV 2024; mc-lan/ClearCLIP ``open_clip/transformer.py``, ``model_type='ClearCLIP'``,
``ignore_residual=True``).

q-q self-attention, and the last block's residual connection and feed-forward network dropped:
``x = out_proj(softmax(s q q^T) v)`` (per head).
Deviation: ClearCLIP slides 224x224 windows and uses its own logit temperature; here the whole training image is
one window and the stage's ``logit_scale`` applies (see docs/teachers.md).
"""
from __future__ import annotations

from . import DENSE_TEACHERS, DenseTeacher, attend, heads_qkv, self_similarity


@DENSE_TEACHERS.register("clearclip")
class ClearCLIPTeacher(DenseTeacher):
    name = "clearclip"
    changes = "attention -> softmax(s qq^T); no residual, no FFN"
    published = "ClearCLIP paper (ECCV 2024); its README gives the numbers only as an image, not transcribed here"

    def __call__(self, block, x, grid_hw):
        q, k, v, s = heads_qkv(block, x)
        return attend(block, self_similarity(q, s).softmax(-1), v)
