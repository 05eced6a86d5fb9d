"""``sclip`` (Wang et al., ECCV 2024; wangf3014/SCLIP ``clip/model.py``, ``custom_attn(csa=True)``).

Correlative self-attention in the last block, residual and FFN kept:
``x = x + out_proj((softmax(s q q^T) + softmax(s k k^T)) v); x = x + mlp(ln_2(x))`` (per head).
Deviation: SCLIP's evaluation slides 224x224 windows (stride 112) and uses its own logit temperature; here the
whole training image is one window and the stage's ``logit_scale`` applies (see docs/teachers.md).
"""
from __future__ import annotations

from . import DENSE_TEACHERS, DenseTeacher, attend, heads_qkv, self_similarity


@DENSE_TEACHERS.register("sclip")
class SCLIPTeacher(DenseTeacher):
    name = "sclip"
    changes = "attention -> softmax(s qq^T) + softmax(s kk^T); residual and FFN kept"
    published = "SCLIP README (wangf3014/SCLIP), ViT-B/16, no post-processing: Cityscapes 32.34, VOC20 81.54"

    def __call__(self, block, x, grid_hw):
        q, k, v, s = heads_qkv(block, x)
        w = self_similarity(q, s).softmax(-1) + self_similarity(k, s).softmax(-1)
        x = x + attend(block, w, v)
        return x + block.ls_2(block.mlp(block.ln_2(x)))
