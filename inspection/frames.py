"""Read-only access to a store for inspection, through :mod:`data_cache` only.

A frame's data of a stage are read only when the stage's done marker covers the frame's work shard (or the
stage is complete), so a store that a labelling job is still writing, or one that lacks later stages, shows
what exists and nothing half-written. Metadata are never taken from the consolidated copy (a running stage
may have created arrays since it was written). Until the ``correspond`` stage has finished every shard, the
pairs of its done shards are read from their part files (``_parts/correspond``). A store without points
(``cns.modalities == ["images"]``, nuImages) has no ``points/*`` or ``pairs/*`` array at all: its frames own
no points and no pairs, and only their images are read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_cache import schema
from data_cache.integrity import require_complete_chunks
from data_cache.store import CacheError, Store

from . import InspectError

#: arrays read per image, the stage whose done marker guards them
IMAGE_ARRAYS = ("images/rgb", "images/gt", "clip/label", "clip/confidence", "clip/label_refined", "sam/mask_id")


class StoreView:
    """A store opened for inspection: frame lookup, per-stage done frames, per-frame reads."""

    def __init__(self, path):
        path = Path(path)
        if not path.exists():
            raise InspectError(f"{path} does not exist")
        try:
            self.store = Store(path, consolidated=False)
            raw = self.store.raw_attrs
        except CacheError as e:
            raise InspectError(str(e)) from None
        version = raw.get("schema_version")
        if version != schema.SCHEMA_VERSION:
            which = "newer" if isinstance(version, int) and version > schema.SCHEMA_VERSION else "another"
            raise InspectError(f"{path} has cache schema version {version} ({which} than this cns-cli reads: "
                               f"{schema.SCHEMA_VERSION}); use the cns-cli that wrote it or rebuild the store")
        try:
            require_complete_chunks(self.store)  # a lost chunk would read back as the fill value: refuse
        except CacheError as e:
            raise InspectError(str(e)) from None
        try:
            self.attrs = self.store.attrs
            self.tokens = np.asarray(self.store.array("frames/token")[:]).astype(str)
            self.has_points = "points" in self.attrs.modalities  # a 2D-only store (nuImages) has no points/pairs
            self.image_off = self.store.offsets("images")
            # without points every frame owns none (no points/offsets array exists)
            self.point_off = (self.store.offsets("points") if self.has_points
                              else np.zeros(len(self.image_off), np.int64))
            self.image_names = np.asarray(self.store.array("images/name")[:]).astype(str)
        except (CacheError, TypeError, KeyError) as e:
            raise InspectError(f"{path}: the store was not planned completely ({e})") from None
        self.path = path
        self.num_frames = len(self.image_off) - 1
        self.class_names = list(self.attrs.class_names)
        self.shards = [tuple(s) for s in raw.get("shards") or [[0, self.num_frames]]]
        self._done: dict[str, np.ndarray] = {}
        self._parts: dict[int, dict] = {}

    # -- what is readable ---------------------------------------------------------------------------
    def done_frames(self, stage: str) -> np.ndarray:
        """Boolean [F]: the frames whose work shard of ``stage`` is marked done."""
        if stage not in self._done:
            mask = np.zeros(self.num_frames, bool)
            if self.store.stage_complete(stage):
                mask[:] = True
            else:
                for s in self.store.done_shards(stage):
                    if s < len(self.shards):
                        a, b = self.shards[s]
                        mask[a:b] = True
            self._done[stage] = mask
        return self._done[stage]

    def readable(self, name: str, frame: int) -> bool:
        """Whether array ``name`` exists and holds finished data for ``frame``."""
        return name in self.store and bool(self.done_frames(schema.spec(name).stage)[frame])

    def stage_rows(self) -> list[dict]:
        """Done/total shards, completeness, failed frames and readable frames per stage."""
        from data_cache.validate import stage_status
        rows = stage_status(self.store)
        for row in rows:
            row["total"] = row["total"] or len(self.shards)
            if row["complete"]:
                row["done"] = row["total"]
            row["frames_done"] = int(self.done_frames(row["stage"]).sum())
        return rows

    # -- lookup -------------------------------------------------------------------------------------
    def resolve_frame(self, key) -> int:
        """A frame token, or a frame index ``0..F-1``."""
        key = str(key)
        hits = np.flatnonzero(self.tokens == key)
        if len(hits):
            return int(hits[0])
        if key.lstrip("-").isdigit():
            index = int(key)
            if 0 <= index < self.num_frames:
                return index
            raise InspectError(f"frame index {index} out of range: {self.path} has {self.num_frames} frames "
                               f"(0..{self.num_frames - 1})")
        from pipeline.datasets.base import frame_alias
        alias = frame_alias(self.attrs.dataset, self.attrs.dataset_config, key)  # nuScenes: a sample token
        hits = np.flatnonzero(self.tokens == alias) if alias else hits
        if len(hits):
            return int(hits[0])
        raise InspectError(f"no frame with token '{key}' in {self.path} (give a token of frames/token or an "
                           f"index 0..{self.num_frames - 1})")

    def num_images(self, frame: int) -> int:
        return int(self.image_off[frame + 1] - self.image_off[frame])

    def names_of(self, frame: int) -> list[str]:
        return list(self.image_names[self.image_off[frame]:self.image_off[frame + 1]])

    def resolve_image(self, frame: int, key) -> int:
        """An image of ``frame``: its index ``0..n-1`` within the frame, or its name (e.g. CAM_FRONT)."""
        n, names = self.num_images(frame), self.names_of(frame)
        key = str(key)
        if key in names:
            return names.index(key)
        if key.lstrip("-").isdigit() and 0 <= int(key) < n:
            return int(key)
        raise InspectError(f"image {key} out of range: frame {frame} ({self.tokens[frame]}) has {n} images "
                           f"(0..{n - 1}: {', '.join(names)})")

    # -- reads --------------------------------------------------------------------------------------
    def frame(self, index: int) -> "Frame":
        return Frame(self, index)

    def _pairs(self, f: int) -> dict | None:
        if not self.has_points or not self.done_frames("correspond")[f]:
            return None
        if self.store.stage_complete("correspond") and "pairs/offsets" in self.store:
            off = self.store.offsets("pairs")
            k0, k1 = int(off[f]), int(off[f + 1])
            read = {n: np.asarray(self.store.array(f"pairs/{n}")[k0:k1]) for n in ("point", "image", "uv", "depth")}
        else:  # the stage is still running: its done shards' pairs are in their part files
            s = next(i for i, (a, b) in enumerate(self.shards) if a <= f < b)
            if s not in self._parts:
                try:
                    self._parts[s] = self.store.read_part("correspond", s)
                except FileNotFoundError:
                    return None
            part = self._parts[s]
            start = np.concatenate([[0], np.cumsum(part["counts"])])
            j = f - self.shards[s][0]
            k0, k1 = int(start[j]), int(start[j + 1])
            read = {n: part[f"pairs__{n}"][k0:k1] for n in ("point", "image", "uv", "depth")}
        return {"point": read["point"].astype(np.int64), "image": read["image"].astype(np.int64) - self.image_off[f],
                "uv": read["uv"].astype(np.int64), "depth": read["depth"].astype(np.float32)}


@dataclass
class Frame:
    """One frame of a :class:`StoreView`; arrays are read on first use, ``None`` where not (yet) written."""

    view: StoreView
    index: int
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def token(self) -> str:
        return str(self.view.tokens[self.index])

    @property
    def num_points(self) -> int:
        return int(self.view.point_off[self.index + 1] - self.view.point_off[self.index])

    @property
    def num_images(self) -> int:
        return self.view.num_images(self.index)

    @property
    def image_names(self) -> list[str]:
        return self.view.names_of(self.index)

    def points(self, name: str) -> np.ndarray | None:
        """``points/xyz``, ``points/feat`` or ``points/gt`` of the frame."""
        key = ("points", name)
        if key not in self._cache:
            v = self.view
            p0, p1 = int(v.point_off[self.index]), int(v.point_off[self.index + 1])
            self._cache[key] = np.asarray(v.store.array(name)[p0:p1]) if v.readable(name, self.index) else None
        return self._cache[key]

    def images(self, name: str, local=None) -> np.ndarray | None:
        """Rows of a per-image array for the frame's images ``local`` (all by default)."""
        v = self.view
        if not v.readable(name, self.index):
            return None
        i0 = int(v.image_off[self.index])
        rows = np.arange(self.num_images) if local is None else np.atleast_1d(np.asarray(local))
        key = ("images", name, tuple(rows.tolist()))
        if key not in self._cache:
            arr = v.store.array(name)
            if len(rows) and np.all(np.diff(rows) == 1):
                self._cache[key] = np.asarray(arr[i0 + int(rows[0]):i0 + int(rows[-1]) + 1])
            else:
                self._cache[key] = np.stack([np.asarray(arr[i0 + int(r)]) for r in rows]) if len(rows) else None
        return self._cache[key]

    @property
    def pairs(self) -> dict | None:
        """``point`` (within the frame), ``image`` (within the frame), ``uv`` (column, row), ``depth``."""
        if "pairs" not in self._cache:
            self._cache["pairs"] = self.view._pairs(self.index)
        return self._cache["pairs"]

    def image_pairs(self, k: int) -> dict | None:
        """The pairs of the frame's image ``k``."""
        p = self.pairs
        if p is None:
            return None
        sel = p["image"] == k
        return {n: a[sel] for n, a in p.items()}
