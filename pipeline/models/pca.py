"""The fixed projection of dense features to D channels (a PCA fitted once per store).

Used by the ``sam`` stage (phi_f of Eq. 7: ``sam/feat``) and the ``maskclip`` stage (the dense CLIP features
of Eq. 7's CLIP rows: ``clip/feat``); the fit/copy/reuse bookkeeping around it is
:func:`pipeline.stages.base.ensure_projection`.
"""
from __future__ import annotations

import numpy as np


def fit_pca(samples: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """PCA of ``samples`` [N, S]: ``proj`` [S, dim] (principal axes, by decreasing variance) and ``mean`` [S].

    Deterministic: float64 covariance, ``eigh``, each axis signed so its largest-magnitude entry is positive.
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 2 or dim > x.shape[1]:
        raise ValueError(f"cannot project {x.shape} samples to {dim} channels")
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / max(1, len(x) - 1)
    vals, vecs = np.linalg.eigh(cov)
    vecs = vecs[:, np.argsort(vals)[::-1][:dim]]
    sign = np.sign(vecs[np.abs(vecs).argmax(axis=0), np.arange(dim)])
    vecs = vecs * np.where(sign == 0, 1.0, sign)
    return vecs.astype(np.float32), mean.astype(np.float32)


def project(embedding: np.ndarray, proj: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """[S, h, w] (or [B, S, h, w]) embedding -> [D, h, w] (or [B, D, h, w]): ``(e - mean) @ proj``."""
    e = np.asarray(embedding, dtype=np.float32)
    return np.einsum("...shw,sd->...dhw", e - mean[:, None, None], proj, optimize=True)


def unproject(feat: np.ndarray, proj: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """The inverse of :func:`project` on the projection's span: [..., D, h, w] -> [..., S, h, w],
    ``f @ proj.T + mean`` (lossless when D reaches the rank of the fitted samples)."""
    f = np.asarray(feat, dtype=np.float32)
    return np.einsum("...dhw,sd->...shw", f, proj, optimize=True) + mean[:, None, None]
