"""The cache schema: every array of a CNS store, declared once.

A store is one Zarr v3 group per dataset split, ``CACHE/<dataset>-<split>.zarr``. This module is the single
source of truth for what it holds; the writer, the reader, the validator, the pipeline stages and the
trainer all read these declarations (``data_cache/SCHEMA.md`` is the prose version of the same table).

Shapes are written with symbolic dimensions that are resolved when a store is created:

====  ==========================================================================
F     frames (a nuScenes LiDAR sweep with its 6 cameras; a ScanNet scene)
P     points, all frames concatenated (ragged per frame through ``points/offsets``)
I     images, all frames concatenated (ragged per frame through ``images/offsets``)
K     point-pixel pairs, all frames concatenated (ragged through ``pairs/offsets``)
H, W  the training resolution (nuScenes 224x416, ScanNet 240x320)
C     per-point input features (``cns.point_features`` names them)
L     classes (``cns.class_names``)
E     text-embedding width (512 for CLIP ViT-B/16)
D     SAM feature channels after the fixed projection (64)
h, w  SAM feature grid with the padding cropped (64x36 for a 16:9 image)
S     SAM image-embedding channels before projection (256)
Dc    dense CLIP feature channels after the fixed projection (64)
hc,wc CLIP ViT patch grid of the training image (H/16 x W/16: 14x26 for nuScenes, 15x20 for ScanNet)
====  ==========================================================================

Ragged data are flat values plus ``offsets`` [F+1] (zarr 3 has no ragged arrays): frame ``f`` owns
``values[offsets[f]:offsets[f+1]]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

SCHEMA_VERSION = 1
IGNORE_INDEX = 255
NO_MASK = -1
STORE_SUFFIX = ".zarr"
ROOT_ATTR = "cns"
DONE_DIR = "_done"
FAILED_DIR = "_failed"
PARTS_DIR = "_parts"
LOCKS_DIR = "_locks"

#: Stages in dependency order. A stage writes only the arrays whose ``stage`` names it.
STAGE_ORDER = ("correspond", "maskclip", "sam", "refine")
STAGE_REQUIRES = {
    "correspond": (),
    "maskclip": ("correspond",),
    "sam": ("correspond",),
    "refine": ("maskclip", "sam"),
}

#: Which ragged axis each per-item dimension indexes, and the offsets array that splits it into frames.
RAGGED_AXES = {"P": "points/offsets", "I": "images/offsets", "K": "pairs/offsets"}

#: What a store can hold (``cns.modalities``). Every store has images; a 2D-only dataset (nuImages) has no
#: points, and then no array of the points modality exists at all (not even an empty one).
MODALITIES = ("points", "images")
#: The groups (and symbolic dimensions) that belong to the points modality: points and pixel-point pairs.
POINT_GROUPS = ("points", "pairs")
POINT_DIMS = ("P", "K")


@dataclass(frozen=True)
class ArraySpec:
    """One array of the store.

    ``shape`` and ``chunks``/``shards`` use the symbolic dimensions of the module docstring; a chunk or
    shard entry may be an int (fixed length) or a dimension name (the full extent). ``stage`` is the
    stage that writes it (``"plan"``: written by the runner when the store is created). ``optional``
    arrays exist only when the dataset provides them (``when`` names the capability).
    """

    name: str
    dtype: str
    shape: tuple
    dimension_names: tuple
    chunks: tuple
    shards: tuple | None
    fill_value: object
    stage: str
    doc: str
    when: str | None = None
    value_range: tuple | None = None
    codec: str = "shuffle"  # a key of CODECS


    @property
    def modality(self) -> str | None:
        """``"points"`` for an array that exists only in a store with points (``points/*``, ``pairs/*`` and
        anything indexed by P or K); ``None`` for the rest, which every store may hold."""
        if self.name.split("/")[0] in POINT_GROUPS or any(d in POINT_DIMS for d in self.shape):
            return "points"
        return None

    @property
    def ragged_axis(self) -> str | None:
        first = self.shape[0] if self.shape else None
        return first if first in RAGGED_AXES else None

    def resolve(self, dims: Mapping[str, int]) -> dict:
        """Concrete ``shape``/``chunks``/``shards`` for a store with the given dimension sizes."""

        def size(entry):
            return int(dims[entry]) if isinstance(entry, str) else int(entry)

        shape = tuple(size(d) for d in self.shape)
        chunks = tuple(max(1, min(size(c), s) if s else size(c)) for c, s in zip(self.chunks, shape))
        shards = None
        if self.shards is not None:
            shards = []
            for sh, c, s in zip(self.shards, chunks, shape):
                n = size(sh)
                # a shard must hold a whole number of chunks; never larger than needed for the array
                n = max(c, (min(n, max(s, c)) + c - 1) // c * c)
                shards.append(n)
            shards = tuple(shards)
            if shards == chunks:
                shards = None
        return {"shape": shape, "chunks": chunks, "shards": shards}


#: Compressors by name (zarr v3 codecs, built by :func:`data_cache.store.compressors`, which appends a crc32c
#: checksum to each: zarr verifies it on every read). Blosc's byte shuffle
#: groups the bytes of multi-byte numbers (xyz, pair indices, SAM features) so zstd finds their redundancy;
#: bit shuffle suits 8-bit images. Measured on the real nuScenes fixture: points/xyz 60 -> 51 KB per image,
#: images/rgb 212 -> 189 KB, pairs 25 -> 13 KB against plain zstd.
CODECS = {
    "shuffle": {"blosc": {"cname": "zstd", "clevel": 5, "shuffle": "shuffle"}},
    "bitshuffle": {"blosc": {"cname": "zstd", "clevel": 5, "shuffle": "bitshuffle"}},
    "default": None,  # zarr's default, zstd (strings; scaled 8-bit values in float32, which shuffling hurts)
}

POINT_CHUNK = 1 << 16
POINT_SHARD = 1 << 20
IMAGE_SHARD = 16

ARRAYS: tuple[ArraySpec, ...] = (
    # -- frames -------------------------------------------------------------------------------
    ArraySpec("frames/token", "str", ("F",), ("frame",), (4096,), None, "", "plan",
              "dataset token of the frame (nuScenes sample_data token of the LiDAR sweep; ScanNet scene id)",
              codec="default"),
    # -- points -------------------------------------------------------------------------------
    ArraySpec("points/offsets", "int64", ("F+1",), ("frame_edge",), (4096,), None, 0, "plan",
              "frame f owns points[offsets[f]:offsets[f+1]]"),
    ArraySpec("points/xyz", "float32", ("P", 3), ("point", "xyz"), (POINT_CHUNK, 3), (POINT_SHARD, 3), 0.0,
              "correspond", "coordinates in metres, LiDAR sensor frame (nuScenes) or scene frame (ScanNet)"),
    ArraySpec("points/feat", "float32", ("P", "C"), ("point", "feature"), (POINT_CHUNK, "C"), (POINT_SHARD, "C"),
              0.0, "correspond", "per-point input features named by cns.point_features (intensity; rgb/255)",
              codec="default"),
    ArraySpec("points/gt", "uint8", ("P",), ("point",), (POINT_CHUNK,), (POINT_SHARD,), IGNORE_INDEX,
              "correspond", "ground-truth class index, 255 = unlabelled (evaluation only)", when="point_gt",
              value_range=(0, "L-1|255")),
    # -- images -------------------------------------------------------------------------------
    ArraySpec("images/offsets", "int64", ("F+1",), ("frame_edge",), (4096,), None, 0, "plan",
              "frame f owns images[offsets[f]:offsets[f+1]]"),
    ArraySpec("images/frame", "int32", ("I",), ("image",), (4096,), None, -1, "plan",
              "frame index of each image"),
    ArraySpec("images/name", "str", ("I",), ("image",), (4096,), None, "", "plan",
              "camera channel (nuScenes) or posed-frame id (ScanNet) of each image", codec="default"),
    ArraySpec("images/rgb", "uint8", ("I", "H", "W", 3), ("image", "y", "x", "rgb"), (1, "H", "W", 3),
              (IMAGE_SHARD, "H", "W", 3), 0, "correspond", "colour image resized to the training resolution",
              codec="bitshuffle"),
    ArraySpec("images/gt", "uint8", ("I", "H", "W"), ("image", "y", "x"), (1, "H", "W"), (IMAGE_SHARD, "H", "W"),
              IGNORE_INDEX, "correspond", "2D ground truth at the training resolution (nearest), 255 = unlabelled",
              when="image_gt", value_range=(0, "L-1|255")),
    ArraySpec("images/intrinsics", "float32", ("I", 3, 3), ("image", "row", "col"), (4096, 3, 3), None, 0.0,
              "correspond", "camera matrix K at the training resolution"),
    # -- pairs --------------------------------------------------------------------------------
    ArraySpec("pairs/offsets", "int64", ("F+1",), ("frame_edge",), (4096,), None, 0, "correspond",
              "frame f owns pairs[offsets[f]:offsets[f+1]]"),
    ArraySpec("pairs/point", "int32", ("K",), ("pair",), (POINT_CHUNK,), (POINT_SHARD,), -1, "correspond",
              "index of the paired point within its frame's points"),
    ArraySpec("pairs/image", "int32", ("K",), ("pair",), (POINT_CHUNK,), (POINT_SHARD,), -1, "correspond",
              "global index of the paired image"),
    ArraySpec("pairs/uv", "uint16", ("K", 2), ("pair", "uv"), (POINT_CHUNK, 2), (POINT_SHARD, 2), 0, "correspond",
              "pixel (column, row) at the training resolution"),
    ArraySpec("pairs/depth", "float16", ("K",), ("pair",), (POINT_CHUNK,), (POINT_SHARD,), 0.0, "correspond",
              "depth of the point in the camera frame, metres"),
    # -- CLIP (maskclip stage) ----------------------------------------------------------------
    ArraySpec("clip/text_embed", "float32", ("L", "E"), ("class", "embed"), ("L", "E"), None, 0.0, "maskclip",
              "L2-normalised class text embeddings averaged over the prompt templates (Eq. 1, t_l)"),
    ArraySpec("clip/label", "uint8", ("I", "H", "W"), ("image", "y", "x"), (1, "H", "W"), (IMAGE_SHARD, "H", "W"),
              IGNORE_INDEX, "maskclip", "MaskCLIP dense pseudo-label (Eq. 1)", value_range=(0, "L-1|255")),
    ArraySpec("clip/confidence", "uint8", ("I", "H", "W"), ("image", "y", "x"), (1, "H", "W"),
              (IMAGE_SHARD, "H", "W"), 0, "maskclip", "softmax probability of the label, scaled to 0..255"),
    ArraySpec("clip/feat", "float16", ("I", "Dc", "hc", "wc"), ("image", "channel", "y", "x"), (1, "Dc", "hc", "wc"),
              (IMAGE_SHARD, "Dc", "hc", "wc"), 0.0, "maskclip",
              "dense CLIP features of Eq. 1 (MaskCLIP value path after ln_post and the visual projection, "
              "L2-normalised: the vectors whose dot product with clip/text_embed gives clip/label), minus "
              "clip/proj_mean, projected to Dc channels by clip/proj (phi_f(c_i) of Eq. 7's CLIP rows). "
              "Grid = the ViT patch grid at the training resolution, no padding: cell (i, j) is the 16x16 "
              "patch of pixels [16i, 16i+16) x [16j, 16j+16), centred at ((i+0.5) H/hc, (j+0.5) W/wc) in "
              "continuous pixel coordinates -- the grid spans the whole image exactly like sam/feat's, and "
              "clip/label is its bilinear upsampling with the same convention (align_corners=False)"),
    ArraySpec("clip/proj", "float32", ("E", "Dc"), ("embed", "channel"), ("E", "Dc"), None, 0.0, "maskclip",
              "fixed PCA projection of the dense CLIP features (fitted once per dataset, like sam/proj)"),
    ArraySpec("clip/proj_mean", "float32", ("E",), ("embed",), ("E",), None, 0.0, "maskclip",
              "mean subtracted before clip/proj; clip/feat @ clip/proj.T + clip/proj_mean gives the features "
              "back (exactly when Dc = E)"),
    # -- SAM (sam stage) ----------------------------------------------------------------------
    ArraySpec("sam/mask_id", "int32", ("I", "H", "W"), ("image", "y", "x"), (1, "H", "W"), (IMAGE_SHARD, "H", "W"),
              NO_MASK, "sam", "SAM automatic-mask id per pixel, -1 = no mask; smaller masks win overlaps"),
    ArraySpec("sam/feat", "float16", ("I", "D", "h", "w"), ("image", "channel", "y", "x"), (1, "D", "h", "w"),
              (IMAGE_SHARD, "D", "h", "w"), 0.0, "sam",
              "SAM image embedding, padding cropped, projected to D channels by sam/proj (frozen phi_f of Eq. 7)"),
    ArraySpec("sam/proj", "float32", ("S", "D"), ("embed", "channel"), ("S", "D"), None, 0.0, "sam",
              "fixed PCA projection of the SAM embedding (fitted once per dataset)"),
    ArraySpec("sam/proj_mean", "float32", ("S",), ("embed",), ("S",), None, 0.0, "sam",
              "mean subtracted before sam/proj"),
    # -- refine stage -------------------------------------------------------------------------
    ArraySpec("clip/label_refined", "uint8", ("I", "H", "W"), ("image", "y", "x"), (1, "H", "W"),
              (IMAGE_SHARD, "H", "W"), IGNORE_INDEX, "refine", "CLIP label after SAM max-voting (Eq. 4)",
              value_range=(0, "L-1|255")),
)

ARRAYS_BY_NAME: dict[str, ArraySpec] = {a.name: a for a in ARRAYS}


def arrays_of_stage(stage: str) -> tuple[ArraySpec, ...]:
    return tuple(a for a in ARRAYS if a.stage == stage)


def array_in_store(sp: ArraySpec, modalities, capabilities) -> bool:
    """Whether a store with these ``modalities`` and ``capabilities`` holds ``sp`` once its stage has run."""
    return (sp.modality is None or sp.modality in modalities) and (sp.when is None or sp.when in capabilities)


def spec(name: str) -> ArraySpec:
    try:
        return ARRAYS_BY_NAME[name]
    except KeyError:
        raise KeyError(f"'{name}' is not an array of the cache schema (data_cache/schema.py)") from None


@dataclass
class RootAttrs:
    """The ``cns`` attribute of a store's root group."""

    dataset: str
    split: str
    class_names: list
    image_size: list  # [H, W] of the training resolution
    point_features: list
    capabilities: list  # e.g. ["point_gt", "image_gt"]
    modalities: list = field(default_factory=lambda: list(MODALITIES))  # ["images"]: a store without points
    image_gt_source: str | None = None  # which 2D ground truth the store has (see SCHEMA.md)
    dataset_config: dict = field(default_factory=dict)
    shard_size: int = 8
    num_frames: int = 0
    schema_version: int = SCHEMA_VERSION
    ignore_index: int = IGNORE_INDEX
    stages: dict = field(default_factory=dict)  # name -> {"version", "config", "checkpoint_sha256"}
    # The teacher of the 2D labels is part of the maskclip stage's fingerprint: stages["maskclip"]["config"]
    # ["teacher"] = {"name", "options", "label_free"} (see TEACHER_DOC, teacher_of)

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: Mapping) -> "RootAttrs":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


#: How a store records the teacher of its 2D labels (``clip/label``), for ``SCHEMA.md`` and the printers.
TEACHER_DOC = """The maskclip stage's fingerprint holds ``config.teacher`` = ``{"name", "options", "label_free"}``:
``name`` is the dense CLIP teacher (``maskclip`` -- the paper's --, ``sclip``, ``clearclip``, ``naclip``) or
``import`` (labels from an external segmenter; ``options.model`` names it, ``options.sha256`` fingerprints the
folder's content, ``options.features`` says whether ``clip/feat`` was imported -- when false, ``clip/feat``,
``clip/proj`` and ``clip/proj_mean`` are absent and the trainer leaves CLIP out of the latent term);
``options`` are the teacher's options (``naclip_sigma``, ``pamr``); ``label_free`` is true when no human
segmentation label went into the teacher (CLIP's variants), false for an imported segmenter trained with
human labels or one that does not say (no ``teacher.json``), and for a simulated teacher (made from the
ground truth). A store written before the record existed has MaskCLIP's labels."""


def teacher_of(stages: Mapping) -> dict | None:
    """The teacher record of a store's ``cns.stages`` (see :data:`TEACHER_DOC`); None before the maskclip stage."""
    fp = (stages or {}).get("maskclip")
    if not fp:
        return None
    config = fp.get("config") or {}
    if config.get("simulated") is True:
        return {"name": "simulated", "options": {"simulator": config.get("simulator")}, "label_free": False}
    return config.get("teacher") or {"name": "maskclip", "options": {}, "label_free": True}


def teacher_line(teacher: Mapping | None) -> str | None:
    """``teacher: naclip (sigma 5, PAMR; label-free)``, or None without a teacher."""
    if not teacher:
        return None
    opts = teacher.get("options") or {}
    name = teacher["name"]
    if name == "import":
        name = f"import of {opts.get('model') or 'an unnamed segmenter'}"
    details = [f"sigma {opts['naclip_sigma']:g}"] if "naclip_sigma" in opts else []
    details += ["PAMR"] if opts.get("pamr") else []
    details += ["no clip/feat"] if opts.get("features") is False else []
    free = "label-free" if teacher.get("label_free") else "NOT label-free"
    shown = ", ".join(details)
    return f"teacher: {name} ({shown + '; ' if shown else ''}{free})"


def absent_arrays(stages: Mapping) -> tuple[str, ...]:
    """Arrays of a complete stage that its recorded configuration does not write (an import without features)."""
    teacher = teacher_of(stages) or {}
    if teacher.get("name") == "import" and (teacher.get("options") or {}).get("features") is False:
        return ("clip/feat", "clip/proj", "clip/proj_mean")
    return ()


def dims_for(attrs: RootAttrs, num_points: int, num_images: int, num_pairs: int = 0,
             text_dim: int = 512, sam_dim: int = 64, sam_grid=(0, 0), sam_embed_dim: int = 256,
             clip_dim: int | None = None, clip_grid=None, clip_patch: int = 16) -> dict:
    """Resolve the symbolic dimensions for a store (``clip_dim``: min(64, ``text_dim``) unless given;
    ``clip_grid``: the ``clip_patch`` grid of the training resolution unless given)."""
    h, w = attrs.image_size
    clip_grid = clip_grid or (h // clip_patch, w // clip_patch)
    return {
        "F": attrs.num_frames, "F+1": attrs.num_frames + 1, "P": num_points, "I": num_images, "K": num_pairs,
        "H": h, "W": w, "C": max(1, len(attrs.point_features)), "L": len(attrs.class_names), "E": text_dim,
        "D": sam_dim, "h": sam_grid[0], "w": sam_grid[1], "S": sam_embed_dim,
        "Dc": clip_dim if clip_dim is not None else min(64, text_dim), "hc": clip_grid[0], "wc": clip_grid[1],
    }


def markdown_table() -> str:
    """The array table of ``SCHEMA.md`` (``python -m data_cache.schema`` prints it; a test keeps them equal)."""

    def fmt(t):
        return "none" if t is None else "[" + ", ".join(str(x) for x in t) + "]"

    rows = ["| array | dtype | shape | dimension_names | chunks | shards | fill | codec | written by | meaning |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for a in ARRAYS:
        when = f" (only with `{a.when}`)" if a.when else ""
        rows.append(f"| `{a.name}` | {a.dtype} | {fmt(a.shape)} | {fmt(a.dimension_names)} | {fmt(a.chunks)} | "
                    f"{fmt(a.shards)} | {a.fill_value!r} | {a.codec} | {a.stage} | {a.doc}{when} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
