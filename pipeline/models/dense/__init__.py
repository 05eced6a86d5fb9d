"""Dense CLIP teachers: the training-free variants of CLIP's last vision block (``maskclip.dense``).

Every teacher keeps CLIP's weights, prompts, upsampling and the ``clip/feat`` projection; only the last
transformer block of the image tower changes. A teacher is a module of this package that registers a
:class:`DenseTeacher` in :data:`DENSE_TEACHERS` (``@DENSE_TEACHERS.register("name")``):

* :mod:`.maskclip`  — the paper's MaskCLIP value path (the default)
* :mod:`.sclip`     — SCLIP's correlative self-attention (q-q plus k-k)
* :mod:`.clearclip` — ClearCLIP's q-q attention without residual and FFN
* :mod:`.naclip`    — NACLIP's k-k attention plus a Gaussian neighbourhood window, without residual and FFN

Notation of every ``last_block``: ``x`` [B, N, C] batch-first tokens entering the last block (the class token
first, then the h x w patches row by row); ``h = ln_1(x)``; ``q, k, v = in_proj(h)`` split into heads
[B, heads, N, C/heads]; ``s = (C/heads)^-0.5``. The block returns tokens [B, N, C]; the caller applies
``ln_post`` and ``proj`` to the patch tokens.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from data_cache.errors import UserError

from ...registry import Registry


class TeacherError(UserError, ValueError):
    """A bad teacher choice or option (``maskclip.dense``, ``maskclip.naclip_sigma``, ``maskclip.import_dir``)."""


DENSE_TEACHERS = Registry("dense CLIP teacher")
_MODULES = ("maskclip", "sclip", "clearclip", "naclip")


class DenseTeacher:
    """One dense CLIP teacher.

    Class attributes: ``name``; ``changes`` (one line: what it does to the last block); ``published`` (its
    zero-shot mIoU as its authors report it, with the source); ``options`` (its own options with defaults,
    the stage's ``maskclip.<option>`` keys). Instances hold the option values and are callables
    ``(block, x, grid_hw) -> x``.
    """

    name = ""
    changes = ""
    published = ""
    label_free = True  # CLIP was trained on image-text pairs, never on human segmentation labels
    options: dict = {}

    def __init__(self, **options):
        unknown = set(options) - set(self.options)
        if unknown:
            raise TeacherError(f"dense teacher '{self.name}' takes no option(s) {sorted(unknown)}")
        self.config = {**self.options, **options}

    def __call__(self, block, x: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError


def heads_qkv(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """``q, k, v`` [B, heads, N, C/heads] of ``in_proj(ln_1(x))`` and the scale ``s = (C/heads)^-0.5``."""
    attn = block.attn
    b, n, c = x.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = (t.reshape(b, n, heads, c // heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    return q, k, v, (c // heads) ** -0.5


def self_similarity(t: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * t t^T`` per head: [B, heads, N, d] -> attention logits [B, heads, N, N] (q-q, k-k)."""
    return scale * t @ t.transpose(-2, -1)


def attend(block, weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``out_proj(weights @ v)`` with the heads merged back: [B, heads, N, N] x [B, heads, N, d] -> [B, N, C];
    the block's layer scale (``ls_1``, the identity for OpenAI's CLIP) applies as to its attention branch."""
    out = (weights @ v).transpose(1, 2).flatten(2)
    return block.ls_1(block.attn.out_proj(out))


def get_teacher(name: str, **options) -> DenseTeacher:
    """The dense teacher ``name`` with its options (a ``KeyError`` names the known teachers)."""
    for module in _MODULES:
        importlib.import_module(f"{__name__}.{module}")
    return DENSE_TEACHERS.get(name)(**options)


def teacher_names() -> list[str]:
    for module in _MODULES:
        importlib.import_module(f"{__name__}.{module}")
    return DENSE_TEACHERS.names()
