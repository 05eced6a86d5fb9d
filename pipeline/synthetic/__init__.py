"""Procedural scenes with exact ground truth: streets (nuScenes-16, LiDAR + 6 cameras) and rooms (ScanNet-20,
RGB-D trajectory + fused cloud), built from primitives and ray cast. The dataset adapter is
:class:`pipeline.datasets.synthetic.SyntheticDataset`; the design is described in docs/synthetic.md.

Modules: ``primitives`` (solids and their ray intersections), ``raycast`` (sensors, culling, hit
attributes), ``shading`` (colour), ``palettes`` (shared colours), ``street`` and ``indoor`` (scene layout
and sensors), ``figures`` (pictures for the docs).
"""
from data_cache.exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "build_street_scene": "pipeline.synthetic.street", "render_street_sweep": "pipeline.synthetic.street",
    "build_room": "pipeline.synthetic.indoor", "render_room": "pipeline.synthetic.indoor",
})
