"""Does a store hold every chunk its done markers promise, and does each chunk decode?

A done marker (``_done/<stage>/<shard>.json``, ``_done/<stage>/_complete.json``) promises data. Since every
chunk is stored (``data_cache.store`` writes chunks of fill values too) and ends with a crc32c checksum, the
promise can be checked against the files:

* :func:`implied_blocks` -- per array, the *storage blocks* the done work implies: a zarr shard file of a
  sharded array (``images/rgb``: 16 images), a chunk file otherwise, with its key under the array's folder as
  zarr's chunk key encoding spells it (``c/0/0/0/0``), the rows and frames it holds and the work shards that
  wrote them. Rows of a per-point or per-image array (``P``/``I`` first dimension) are implied by each done
  shard of its stage; every other array (frame-level arrays, ``pairs/*``, projections, text embeddings) by
  its stage's ``_complete`` marker (the ``plan`` for the frame-level arrays written when the store is created).
* :func:`missing_blocks` -- those of them absent from a directory listing (no chunk is read);
* :func:`undecodable_blocks` -- those that zarr cannot read back (checksum mismatch, truncated file);
* :func:`read_guard` -- around a reader's zarr reads: a chunk that fails to decode becomes one line naming
  the array, the chunk and the frames (a :class:`~data_cache.store.CacheError`), anything else propagates;
* :func:`require_complete_chunks` -- readers (trainer, eval, inspect) refuse a store with a missing chunk,
  whose rows would read back as the fill value;
* :func:`undo_shards_missing_data` -- ``cns-cli labels`` redoes the shards whose chunks are missing.
"""
from __future__ import annotations

import itertools
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from . import schema
from .store import CacheError, Store, labels_command

PLAN = "plan"
#: what zarr raises when a chunk does not decode: ValueError for a crc32c mismatch, RuntimeError from
#: blosc/zstd, OSError from a truncated or unreadable file. :func:`read_guard` converts one only after
#: re-reading the chunks one by one finds the chunk at fault; otherwise the error propagates unchanged.
DECODE_ERRORS = (ValueError, RuntimeError, OSError)
#: ragged axes whose rows each done work shard writes (``K``, the pairs, are committed when correspond completes)
PER_SHARD_AXES = {"P": "points", "I": "images"}
AXIS_OFFSETS = {"P": "points", "I": "images", "K": "pairs"}


@dataclass(frozen=True)
class Block:
    """One storage block (a zarr shard file or an unsharded chunk file) of an array."""

    array: str
    key: str                    # path under the array's folder, e.g. "c/3/0/0/0"
    region: tuple               # the block's index region (slices), clipped to the array
    frames: tuple | None        # (first, stop) frames whose rows it holds; None: not a per-frame array
    stage: str                  # the stage that writes the array ("plan": written when the store is created)
    shards: tuple               # the done work shards whose rows it holds (empty: implied by _complete)

    @property
    def rows(self) -> tuple[int, int]:
        return self.region[0].start, self.region[0].stop

    def describe(self) -> str:
        a, b = self.rows
        where = f"rows {a}-{b - 1}"
        if self.frames is not None:
            f0, f1 = self.frames
            where += f", frame {f0}" if f1 - f0 == 1 else f", frames {f0}-{f1 - 1}"
        return f"{self.array} chunk {self.key} ({where})"


def _frames_of_rows(offsets: np.ndarray | None, num_frames: int, a: int, b: int) -> tuple | None:
    """Frames whose rows meet ``a:b``: by ``offsets`` for a ragged array, the rows themselves for a per-frame one."""
    if offsets is None:
        return (min(a, num_frames - 1), min(b, num_frames)) if num_frames else None
    f0 = int(np.searchsorted(offsets, a, side="right")) - 1
    f1 = int(np.searchsorted(offsets, b, side="left"))
    return max(f0, 0), max(f1, f0 + 1)


def _array_blocks(store: Store, sp: schema.ArraySpec, arr, wanted: dict, offsets, num_frames: int) -> list[Block]:
    """The blocks of ``arr`` that hold the row ranges ``wanted`` ({work shard or None: (start, stop)})."""
    shape = tuple(arr.shape)
    if not shape or 0 in shape:
        return []
    block = tuple(arr.shards or arr.chunks)
    owners: dict[int, set] = {}
    for shard, (a, b) in wanted.items():
        for i in range(int(a) // block[0], (int(b) - 1) // block[0] + 1 if b > a else int(a) // block[0]):
            owners.setdefault(i, set()).update(() if shard is None else (shard,))
    rest = [range(-(-n // c)) for n, c in zip(shape[1:], block[1:])]
    encode = arr.metadata.chunk_key_encoding.encode_chunk_key
    out = []
    for i in sorted(owners):
        a, b = i * block[0], min((i + 1) * block[0], shape[0])
        frames = _frames_of_rows(offsets, num_frames, a, b) if (offsets is not None or sp.shape[0] in ("F", "F+1")) \
            else None
        for tail in itertools.product(*rest):
            coords = (i,) + tail
            region = tuple(slice(c * n, min((c + 1) * n, s)) for c, n, s in zip(coords, block, shape))
            out.append(Block(sp.name, encode(coords), region, frames, sp.stage, tuple(sorted(owners[i]))))
    return out


def implied_blocks(store: Store, stages: Iterable[str] | None = None) -> Iterator[Block]:
    """Every storage block that the store's done markers imply, array by array (of ``stages`` only when given).

    An array of the schema that the store lacks yields nothing (``cache validate`` names a missing array)."""
    attrs = store.attrs
    work_shards = store.raw_attrs.get("shards", [])
    wanted_stages = None if stages is None else set(stages)
    offsets: dict[str, np.ndarray] = {}
    for sp in schema.ARRAYS:
        if wanted_stages is not None and sp.stage not in wanted_stages:
            continue
        if not schema.array_in_store(sp, attrs.modalities, attrs.capabilities):
            continue
        per_shard = sp.stage != PLAN and sp.ragged_axis in PER_SHARD_AXES
        if sp.stage == PLAN:  # a store written by other tools than the runner may lack the plan's marker
            complete = store.is_done(PLAN, "_complete") or any(store.stage_complete(s) for s in schema.STAGE_ORDER)
        else:
            complete = store.stage_complete(sp.stage)
        done = (list(range(len(work_shards))) if complete else store.done_shards(sp.stage)) if per_shard else []
        if not (complete or done) or sp.name not in store:
            continue
        arr = store.array(sp.name)
        axis = AXIS_OFFSETS.get(sp.ragged_axis)
        if axis is not None and axis not in offsets:
            offsets[axis] = store.offsets(axis)
        off = offsets.get(axis)
        if per_shard and work_shards:
            wanted = {s: (int(off[work_shards[s][0]]), int(off[work_shards[s][1]])) for s in done
                      if s < len(work_shards)}
        else:
            wanted = {None: (0, int(arr.shape[0]))}
        yield from _array_blocks(store, sp, arr, wanted, off, attrs.num_frames)


def _files_under(folder) -> set[str]:
    """Relative paths (with '/') of the files below ``folder``: one directory listing, nothing read."""
    out = set()
    for dirpath, _, files in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        for name in files:
            out.add(name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}")
    return out


def missing_blocks(store: Store, stages: Iterable[str] | None = None) -> list[Block]:
    """The implied blocks whose file is absent (a directory listing per array; no chunk is read)."""
    listed: dict[str, set] = {}
    out = []
    for blk in implied_blocks(store, stages):
        if blk.array not in listed:
            listed[blk.array] = _files_under(store.path / blk.array)
        if blk.key not in listed[blk.array]:
            out.append(blk)
    return out


def _decode_error(store: Store, blk: Block) -> str | None:
    try:
        store.array(blk.array)[blk.region]
    except DECODE_ERRORS as e:
        return f"{type(e).__name__}: {e}"
    return None


def undecodable_blocks(store: Store, stages: Iterable[str] | None = None,
                       blocks: Iterable[Block] | None = None) -> list[tuple[Block, str]]:
    """The implied blocks (or ``blocks``) that zarr cannot read back, each with zarr's error: reads every chunk."""
    out = []
    for blk in (implied_blocks(store, stages) if blocks is None else blocks):
        err = _decode_error(store, blk)
        if err is not None:
            out.append((blk, err))
    return out


def _meets(a: tuple | None, b: tuple | None) -> bool:
    return a is None or b is None or (a[0] < b[1] and b[0] < a[1])


@contextmanager
def read_guard(store: Store, array: str | None = None, rows: tuple | None = None, frames: tuple | None = None):
    """Around zarr reads of ``store``: a chunk that fails to decode becomes one line naming the array, the chunk
    and its frames (a :class:`CacheError`); any other error propagates unchanged.

    The blocks re-read to find the chunk at fault are those of ``array`` (all arrays when None) that meet
    ``rows`` [start, stop) of that array or ``frames`` [first, stop) (everything when neither is given). When
    none of them fails, the original error was not a damaged chunk and is re-raised as it was.
    """
    try:
        yield
    except DECODE_ERRORS as e:
        candidates = (blk for blk in implied_blocks(store) if (array is None or blk.array == array)
                      and (rows is None or _meets(blk.rows, rows)) and (frames is None or _meets(blk.frames, frames)))
        for blk in candidates:
            err = _decode_error(store, blk)
            if err is not None:
                raise CacheError(f"{store.path}: {blk.describe()} cannot be decoded ({err.splitlines()[0]}); the "
                                 f"store is damaged: `cns-cli cache validate --deep {store.path}` lists every such "
                                 f"chunk") from e
        raise


def missing_summary(store: Store, missing: list[Block], limit: int = 3) -> str:
    """One line naming the first ``limit`` missing blocks and how many there are in all."""
    more = f" and {len(missing) - limit} more" if len(missing) > limit else ""
    return f"{len(missing)} chunk file(s) missing: {'; '.join(b.describe() for b in missing[:limit])}{more}"


def require_complete_chunks(store: Store) -> None:
    """Refuse (one line) a store whose done work implies a chunk file that is absent: a reader would get the
    fill value (zero coordinates, black images, label 255) in its place."""
    missing = missing_blocks(store)
    if not missing:
        return
    stages = [s for s in schema.STAGE_ORDER if any(b.stage == s for b in missing)]
    fix = (f"rewrite them with {labels_command(store.path, store.raw_attrs, stages=','.join(stages))}" if stages
           else "the frame-level arrays cannot be redone: write the store again")
    raise CacheError(f"{store.path}: {missing_summary(store, missing)}; the store has lost data: "
                     f"`cns-cli cache validate {store.path}` lists them; {fix}")


def undo_shards_missing_data(store: Store, stages: Iterable[str]) -> list[str]:
    """Take back the done markers of work that lost a chunk file, so that the run redoes it; returns one line
    per stage saying which shards are redone and why.

    A per-image or per-point array's block names the done work shards whose rows it holds: only their markers
    go (the stage's ``_complete`` marker stays: no stage's finalize step reads those rows, and correspond's
    pairs, committed from part files that are gone by then, are rewritten bit for bit by the shards).
    A block of an array implied by a stage's ``_complete`` (``pairs/*``, projections, text embeddings) redoes
    the whole stage: every marker of it goes and so does the fit key of its projection and text embeddings.
    A frame-level array of the plan cannot be redone: that is an error naming it.
    """
    missing = missing_blocks(store, set(stages) | {PLAN})
    lines = []
    for stage in schema.STAGE_ORDER:
        lost = [b for b in missing if b.stage == stage]
        if not lost:
            continue
        whole = [b for b in lost if not b.shards]
        if whole:
            store.clear_stage(stage)
            for sp in schema.arrays_of_stage(stage):
                if sp.name in store and "fit_key" in store.array(sp.name).attrs:
                    del store.array(sp.name).attrs["fit_key"]
            lines.append(f"redoing every shard of stage '{stage}': {missing_summary(store, whole)}")
            continue
        shards = sorted({s for b in lost for s in b.shards})
        for s in shards:
            store.undo_done(stage, s)
        lines.append(f"redoing stage '{stage}' shard(s) {', '.join(map(str, shards))}: "
                     f"{missing_summary(store, lost)}")
    plan_lost = [b for b in missing if b.stage == PLAN]
    if plan_lost:
        raise CacheError(f"{store.path}: {missing_summary(store, plan_lost)}; these frame-level arrays are written "
                         f"when the store is planned and cannot be redone: delete the store and run labels again")
    return lines
