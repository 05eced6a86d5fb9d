"""Dataset adapters, one registry: ``build_adapter("nuscenes", root, split)``."""
from .base import (DATASETS, DatasetAdapter, DatasetError, Frame, FrameInfo, ImageRecord, build_adapter,
                   check_points, check_rigid)

__all__ = ["DATASETS", "DatasetAdapter", "DatasetError", "Frame", "FrameInfo", "ImageRecord", "build_adapter",
           "check_points", "check_rigid"]
