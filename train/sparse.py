"""The one import point of the 3D networks' sparse convolutions (``model.sparse_backend``).

Both backends expose spconv 2.x's ``spconv.pytorch`` API (``SparseConvTensor``, ``SubMConv3d``, ``SparseConv3d``,
``SparseInverseConv3d``, ``SparseSequential``, ``ConvAlgo``), with the same weight layout (KRSC: [out, k, k, k,
in]), so :mod:`train.models` builds the same modules with either and a checkpoint of one loads into the other:

* ``spconv`` — the design's package (``spconv-cu118``): prebuilt CUDA kernels and a CPU implementation
  (``ConvAlgo.Native``), where the tests run;
* ``spconv_triton`` — spconv-triton (``pip install -e '.[triton]'``, import ``spconv_triton.pytorch``): the
  same API on Triton kernels, so it runs wherever torch's Triton does (current NVIDIA and AMD GPUs). Its pair
  generation is a Triton kernel even with ``ConvAlgo.Native``: it does not run on CPU.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from pipeline.registry import Registry

from .config import ConfigError

if TYPE_CHECKING:  # annotations only: torch loads when a backend does
    import torch

SPARSE_BACKENDS = Registry("sparse backend")


@dataclass(frozen=True)
class SparseBackend:
    """``module``: the import name of the spconv.pytorch-compatible module; ``install``: how to get it;
    ``cpu``: whether its kernels run on CPU tensors."""

    name: str
    module: str
    install: str
    cpu: bool

    def load(self, device: torch.device | str = "cpu") -> ModuleType:
        """The backend's module, or a one-line :class:`ConfigError` naming the fix."""
        import torch  # here, not at the top: train.config validates the backend's name before torch loads
        if not self.cpu and torch.device(device).type == "cpu":
            raise ConfigError(f"model.sparse_backend={self.name} runs Triton kernels on a GPU only (device cpu): "
                              "use model.sparse_backend=spconv on CPU")
        try:
            return importlib.import_module(self.module)
        except ImportError as e:
            raise ConfigError(f"model.sparse_backend={self.name} needs the package that provides {self.module} "
                              f"({e}): {self.install}") from None


for _backend in (
        SparseBackend("spconv", "spconv.pytorch", "pip install spconv-cu118 (or the spconv wheel for your CUDA)",
                      cpu=True),
        SparseBackend("spconv_triton", "spconv_triton.pytorch", "pip install -e '.[triton]' (spconv-triton)",
                      cpu=False)):
    SPARSE_BACKENDS.register(_backend.name)(_backend)


def sparse_backend(name: str) -> SparseBackend:
    """The registered backend ``name``, or a :class:`ConfigError` listing the known ones."""
    if name not in SPARSE_BACKENDS:
        raise ConfigError(f"model.sparse_backend must be one of {', '.join(SPARSE_BACKENDS.names())}, got '{name}'")
    return SPARSE_BACKENDS.get(name)


def sparse_modules(name: str = "spconv", device: torch.device | str = "cpu") -> ModuleType:
    """The spconv.pytorch-compatible module of backend ``name`` for networks that run on ``device``."""
    return sparse_backend(name).load(device)


def conv_algo(device: torch.device | str, sp: ModuleType | None = None):
    """The one place that picks the sparse convolution algorithm: ``Native`` on CPU (the only one that runs
    there), the backend's default (implicit GEMM for kernels of <= 32 offsets, Native above) on a GPU."""
    import torch
    sp = sp if sp is not None else sparse_modules("spconv")
    return sp.ConvAlgo.Native if torch.device(device).type == "cpu" else None
