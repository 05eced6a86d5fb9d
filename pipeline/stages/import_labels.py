"""``maskclip.dense=import``: the 2D labels of any external segmenter, read from a folder.

Layout of ``maskclip.import_dir`` (DIR)::

    DIR/teacher.json                          optional: {"model": "SAM 3", "trained_with_human_labels": true}
    DIR/<frame token>/<image name>.png     uint8 class ids of the store's class list, 255 = no label
    DIR/<frame token>/<image name>.conf.png   optional: uint8 confidence (0..255)
    DIR/<frame token>/<image name>.feat.npy   optional: dense features [E, h, w] in CLIP's embedding space

``<frame token>`` is ``frames/token``, ``<image name>`` is ``images/name`` (nuScenes: the camera channel). Label
and confidence PNGs may have any size whose aspect ratio is within :data:`RATIO_TOLERANCE` of the training
resolution's; they are resized to it with nearest-neighbour sampling. Without a confidence PNG a labelled
pixel gets 255 and an unlabelled one 0. Feature files are all present or all absent: each grid is resized
bilinearly to the CLIP patch grid (hc x wc), L2-normalised per cell and projected like ``clip/feat`` (a PCA
to Dc channels fitted on ``pca_sample_images`` images, ``clip/proj``/``clip/proj_mean``); without them
``clip/feat`` (and its projection) is not written and the trainer leaves CLIP out of the latent term.

``clip/text_embed`` still comes from CLIP's text tower (the given CLIP weights, or ``tiny``): the trainer's
heads and open-vocabulary evaluation need it. The fingerprint holds the folder's content sha256 (not its
path), the teacher's name from ``teacher.json`` and ``label_free`` = not ``trained_with_human_labels``
(false without ``teacher.json``: an import is not assumed label-free).

Every problem of the folder -- a missing image, a size of another aspect ratio, an id outside the class list,
a feature file of the wrong width -- is a :class:`pipeline.datasets.base.DatasetError` naming the file.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from data_cache.schema import IGNORE_INDEX

from ..datasets.base import DatasetError
from .base import ShardContext, ensure_projection, image_groups
from .maskclip import TEACHER_STAGES, MaskCLIPStage

#: how far (relative) an imported PNG's aspect ratio may differ from the training resolution's (nuScenes
#: 1600x900 images against the 416x224 training resolution differ by 4.4 %)
RATIO_TOLERANCE = 0.10
TEACHER_FILE = "teacher.json"
#: MaskCLIP's options that mean nothing for an import
_CLIP_ONLY = ("naclip_sigma", "pamr", "key_smoothing", "prompt_denoising", "logit_scale", "bf16")


def folder_sha256(folder: Path) -> str:
    """sha256 over the folder's files (relative path and content, sorted by path)."""
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class ImportFolder:
    """The files of an import folder for one store (paths, checks, reads)."""

    def __init__(self, path):
        self.root = Path(path)
        if not self.root.is_dir():
            raise DatasetError("maskclip.import_dir is not a folder", file=self.root)
        self.teacher = self._read_teacher()

    def _read_teacher(self) -> dict:
        p = self.root / TEACHER_FILE
        if not p.is_file():
            return {}
        try:
            t = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise DatasetError(f"not JSON ({e})", file=p) from None
        if not isinstance(t, dict) or not isinstance(t.get("trained_with_human_labels", False), bool):
            raise DatasetError('expected {"model": NAME, "trained_with_human_labels": true|false}', file=p)
        return t

    def path(self, token: str, name: str, kind: str = "") -> Path:
        """``DIR/<token>/<name>.png`` (kind ``""``), ``.conf.png`` or ``.feat.npy``."""
        return self.root / str(token) / f"{name}{kind or '.png'}"

    def has_features(self, token: str, name: str) -> bool:
        return self.path(token, name, ".feat.npy").is_file()

    def check_image(self, token: str, name: str, image_hw) -> None:
        """The label PNG (and a confidence PNG) exist with the training resolution's aspect ratio."""
        from PIL import Image
        for kind in ("", ".conf.png"):
            p = self.path(token, name, kind)
            if not p.is_file():
                if kind:
                    continue
                raise DatasetError(f"no imported label for image '{name}' of frame {token}", file=p)
            with Image.open(p) as im:
                w, h = im.size
            want = image_hw[1] / image_hw[0]
            if abs((w / h) / want - 1.0) > RATIO_TOLERANCE:
                raise DatasetError(f"size {w}x{h} has aspect ratio {w / h:.3f}; the training resolution "
                                   f"{image_hw[1]}x{image_hw[0]} has {want:.3f}", file=p)

    def read_png(self, token: str, name: str, kind: str, image_hw) -> np.ndarray | None:
        """A label or confidence PNG resized (nearest) to ``image_hw`` as uint8 [H, W]; None if an optional
        confidence PNG is absent."""
        from PIL import Image
        p = self.path(token, name, kind)
        if kind and not p.is_file():
            return None
        with Image.open(p) as im:
            if im.mode not in ("L", "P"):
                raise DatasetError(f"mode {im.mode}: expected a single-channel uint8 PNG (L or P)", file=p)
            im = im.resize((int(image_hw[1]), int(image_hw[0])), Image.NEAREST)
            return np.asarray(im, dtype=np.uint8)

    def read_label(self, token: str, name: str, image_hw, num_classes: int) -> np.ndarray:
        label = self.read_png(token, name, "", image_hw)
        bad = (label >= num_classes) & (label != IGNORE_INDEX)
        if bad.any():
            raise DatasetError(f"class id {int(label[bad][0])} is outside the store's {num_classes} classes "
                               f"(0..{num_classes - 1}, 255 = none)", file=self.path(token, name))
        return label

    def read_features(self, token: str, name: str, width: int, grid_hw) -> np.ndarray:
        """[E, hc, wc] float32: the feature grid resized bilinearly to ``grid_hw``, L2-normalised per cell."""
        import torch
        import torch.nn.functional as F
        p = self.path(token, name, ".feat.npy")
        if not p.is_file():
            raise DatasetError("feature files are all present or all absent; this one is missing", file=p)
        f = np.load(p)
        if f.ndim != 3 or f.shape[0] != width:
            raise DatasetError(f"features of shape {f.shape}: expected [{width}, h, w] ({width} = CLIP's "
                               f"embedding width E)", file=p)
        t = F.interpolate(torch.from_numpy(f.astype(np.float32))[None], size=tuple(grid_hw), mode="bilinear",
                          align_corners=False)[0]
        return F.normalize(t, dim=0).numpy()


class _TextEncoder:
    """CLIP's text tower for ``clip/text_embed`` (``model`` and ``tokenizer``, what ``write_text_embeddings`` uses)."""

    def __init__(self, stage, device: str):
        from ..models.maskclip import build_maskclip
        c = stage.config
        self.model, self.tokenizer, _ = build_maskclip(c["model"], c["pretrained"], c["checkpoint"], None,
                                                       c["tiny"], c["random_init"], device=device)


@TEACHER_STAGES.register("import")
class ImportedLabelsStage(MaskCLIPStage):
    """The ``maskclip`` stage with ``dense=import``: writes the folder's labels instead of CLIP's."""

    defaults = {**{k: v for k, v in MaskCLIPStage.defaults.items() if k not in _CLIP_ONLY}, "import_dir": None}
    teacher_keys = ("dense", "import_dir")
    uses_gpu = False

    def __init__(self, **config):
        super(MaskCLIPStage, self).__init__(**config)
        if not self.config["import_dir"]:
            raise DatasetError("maskclip.dense=import needs --stage-option maskclip.import_dir=DIR")
        self.folder = ImportFolder(self.config["import_dir"])
        self._sha = None

    def folder_sha256(self) -> str:
        if self._sha is None:
            self._sha = folder_sha256(self.folder.root)
        return self._sha

    def has_features(self) -> bool:
        """Whether the folder holds feature files (then every image must have one)."""
        return any(self.folder.root.rglob("*.feat.npy"))

    def teacher_record(self) -> dict:
        t = self.folder.teacher
        return {"name": "import", "label_free": not t.get("trained_with_human_labels", True),
                "options": {"model": t.get("model"), "sha256": self.folder_sha256(),
                            "features": self.has_features()}}

    def written_arrays(self) -> tuple[str, ...]:
        feat = ("clip/feat", "clip/proj", "clip/proj_mean")
        return tuple(a for a in self.arrays if self.has_features() or a not in feat)

    def build_model(self, device: str):
        self.weights_source()  # the text tower's weights; fail early with the message on how to get them
        return None

    # -- driver ----------------------------------------------------------------------------------------
    def prepare(self, store, adapter) -> None:
        self.prepare_arrays(store, self.written_arrays())
        self.check_folder(store)
        self.write_text_embeddings(store, lambda: _TextEncoder(self, "cpu"))
        if not self.has_features():
            print(f"note: {self.folder.root} holds no *.feat.npy: clip/feat is not written, and the trainer "
                  f"leaves CLIP out of the latent term (loss.latent_target clip / sam+clip)")
            return
        dims = store.dims()
        tokens, names, frame_of = self._image_keys(store)

        def read_rows(rows):
            return [self.folder.read_features(tokens[frame_of[r]], names[r], dims["E"], (dims["hc"], dims["wc"]))
                    for r in rows]

        ensure_projection(self, store, "clip/proj", "clip/proj_mean", lambda feats: np.stack(feats), read_rows)

    @staticmethod
    def _image_keys(store):
        tokens = [str(t) for t in store.array("frames/token")[:]]
        names = [str(n) for n in store.array("images/name")[:]]
        return tokens, names, np.asarray(store.array("images/frame")[:])

    def check_folder(self, store) -> None:
        """Every image of the store has its label PNG (any confidence PNG) at the right aspect ratio, and a
        feature file when the folder has any; the first problem is raised naming the file."""
        tokens, names, frame_of = self._image_keys(store)
        features = self.has_features()
        for row, name in enumerate(names):
            token = tokens[frame_of[row]]
            self.folder.check_image(token, name, store.attrs.image_size)
            if features and not self.folder.has_features(token, name):
                raise DatasetError("feature files are all present or all absent; this one is missing",
                                   file=self.folder.path(token, name, ".feat.npy"))

    # -- worker ----------------------------------------------------------------------------------------
    def process_shard(self, ctx: ShardContext) -> dict:
        from ..models.pca import project
        store = ctx.store
        hw = tuple(store.attrs.image_size)
        num_classes = len(store.attrs.class_names)
        names = store.array("images/name")
        features = self.has_features()
        if features:
            dims = store.dims()
            proj, mean = store.array("clip/proj")[:], store.array("clip/proj_mean")[:]
        stats = {"images": 0}
        for group in image_groups(ctx, 1):
            for frame, token, a, b in group:
                with ctx.frame(frame, token):
                    labels, confs, feats = [], [], []
                    for row in range(a, b):
                        name = str(names[row])
                        label = self.folder.read_label(token, name, hw, num_classes)
                        conf = self.folder.read_png(token, name, ".conf.png", hw)
                        labels.append(label)
                        confs.append(conf if conf is not None else np.where(label == IGNORE_INDEX, 0, 255)
                                     .astype(np.uint8))
                        if features:
                            f = self.folder.read_features(token, name, dims["E"], (dims["hc"], dims["wc"]))
                            feats.append(project(f[None], proj, mean).astype(np.float16)[0])
                    if b > a:
                        store.write_rows("clip/label", a, np.stack(labels))
                        store.write_rows("clip/confidence", a, np.stack(confs))
                        if features:
                            store.write_rows("clip/feat", a, np.stack(feats))
                    stats["images"] += b - a
        return stats


__all__ = ["ImportFolder", "ImportedLabelsStage", "RATIO_TOLERANCE", "folder_sha256"]
