"""``maskclip`` (default; Zhou et al., ECCV 2022, the CNS paper's Eq. 1): the value path.

``x = x + out_proj(v); x = x + mlp(ln_2(x))`` -- the block with its attention replaced by the identity
(:func:`pipeline.models.maskclip.value_path`, unchanged).
"""
from __future__ import annotations

from ..maskclip import value_path
from . import DENSE_TEACHERS, DenseTeacher


@DENSE_TEACHERS.register("maskclip")
class MaskCLIPTeacher(DenseTeacher):
    name = "maskclip"
    changes = "attention -> identity (each patch keeps its value); residual and FFN kept"
    published = ("MaskCLIP (ECCV 2022) reports its zero-shot numbers on PASCAL Context and COCO-Stuff; "
                 "not transcribed here")

    def __call__(self, block, x, grid_hw):
        return value_path(block, x)
