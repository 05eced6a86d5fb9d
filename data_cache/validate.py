"""Store validation (``cns-cli cache validate``) and status (``cns-cli cache status``).

Validation checks, in order, and stops at the first problem of each kind with the frame it concerns:
the root attributes and schema version; the modalities (a store without points holds no ``points/*`` or
``pairs/*`` array); that every array of every complete stage exists with the schema's dtype, shape and
dimension names; the offsets (start at 0, non-decreasing, end at the array length);
per frame, the values: finite coordinates, labels in ``0..L-1`` or 255, pairs pointing inside their frame's
points and images and inside the image, mask ids >= -1, finite SAM and CLIP features; and the fingerprints
(every complete stage has one; a recorded checkpoint that still exists at its path must hash to the recorded
sha256).

Before the values, the chunks: every chunk file that the done markers imply must exist (a directory listing,
:func:`data_cache.integrity.missing_blocks`); each missing one is named with its array, chunk key and frames.
With ``deep=True`` every implied chunk is also read and decoded (each ends with a crc32c checksum, so a
changed byte is found) and each one that fails is named the same way.

A store that cannot be opened at all (no store, a damaged root ``zarr.json``) raises
:class:`~data_cache.store.CacheError` (a user error); a store that opens but fails a check gives a report
with errors (``cns-cli cache validate`` exits 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import schema
from .integrity import DECODE_ERRORS, missing_blocks, undecodable_blocks
from .store import Store, labels_command, sha256_file


@dataclass
class ValidationReport:
    path: Path
    errors: list = field(default_factory=list)
    checked: list = field(default_factory=list)
    simulated: str | None = None  # simulated_note() of the store

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, message: str, frame: int | None = None, token: str | None = None) -> None:
        where = f"frame {frame} ({token}): " if frame is not None else ""
        self.errors.append(where + message)


def stage_status(store: Store) -> list[dict]:
    """One row per stage: shards done/total, complete, failed frames, and ``simulated`` (the simulator's
    name/version/seed when the stage's outputs were simulated from the ground truth, else None) and
    ``from_simulated`` (the simulated stages it read, for a real stage run on simulated inputs)."""
    num_shards = len(store.raw_attrs.get("shards", []))
    simulated, derived = store.simulated_stages(), store.stages_from_simulated()
    rows = []
    for stage in schema.STAGE_ORDER:
        failures = store.failures(stage)
        rows.append({"stage": stage, "done": len(store.done_shards(stage)), "total": num_shards,
                     "complete": store.stage_complete(stage),
                     "failed_frames": sum(len(v) for v in failures.values()),
                     "simulated": simulated.get(stage), "from_simulated": derived.get(stage, [])})
    return rows


def simulated_note(store: Store) -> str | None:
    """One line saying that a store holds simulated foundation-model outputs (None for a real store)."""
    simulated = store.simulated_stages()
    if not simulated:
        return None
    tools = sorted({f"{v['simulator']} v{v['version']}, seed {v['seed']}" for v in simulated.values()})
    return (f"SIMULATED foundation models ({'; '.join(tools)}): {', '.join(simulated)} made from the ground truth "
            f"by a controlled corruption, not by CLIP/SAM -- a benchmark store")


def validate_store(path, check_checkpoints: bool = True, deep: bool = False) -> ValidationReport:
    """Check the store at ``path`` (``deep``: also decode every chunk); raises CacheError when it cannot be opened."""
    report = ValidationReport(Path(path))
    store = Store(path, mode="r", consolidated=False)
    attrs = store.attrs
    report.simulated = simulated_note(store)
    if attrs.schema_version != schema.SCHEMA_VERSION:
        report.error(f"schema_version {attrs.schema_version}, this code reads {schema.SCHEMA_VERSION}")
        return report
    if attrs.ignore_index != schema.IGNORE_INDEX:
        report.error(f"ignore_index {attrs.ignore_index}, expected {schema.IGNORE_INDEX}")
    complete = [s for s in schema.STAGE_ORDER if store.stage_complete(s)]
    if not complete:
        report.error(f"no stage is complete: run {labels_command(store.path, store.raw_attrs, stages='correspond')}")
        return report
    dims = store.dims()
    _check_arrays(store, complete, dims, report)
    if report.errors:
        return report
    _check_chunks(store, report, deep)
    if report.errors:
        return report
    _check_offsets(store, complete, dims, report)
    if report.errors:
        return report
    _check_frames(store, complete, report)
    _check_fingerprints(store, complete, report, check_checkpoints)
    return report


def _expected_arrays(store: Store, complete) -> list[schema.ArraySpec]:
    attrs = store.attrs
    absent = schema.absent_arrays(store.raw_attrs.get("stages", {}))  # e.g. clip/feat of an import without features
    return [a for a in schema.ARRAYS if (a.stage == "plan" or a.stage in complete) and a.name not in absent
            and schema.array_in_store(a, attrs.modalities, attrs.capabilities)]


def _check_modalities(store: Store, report) -> None:
    """``cns.modalities`` is known, has images, and the store holds no array of a modality it lacks."""
    modalities = list(store.attrs.modalities)
    unknown = sorted(set(modalities) - set(schema.MODALITIES))
    if unknown or "images" not in modalities:
        report.error(f"modalities {modalities}: expected ['points', 'images'] or ['images']")
        return
    for sp in schema.ARRAYS:
        if sp.modality is not None and sp.modality not in modalities and sp.name in store:
            report.error(f"array '{sp.name}' exists, but the store's modalities {modalities} have no "
                         f"'{sp.modality}'")


def _check_arrays(store: Store, complete, dims, report) -> None:
    _check_modalities(store, report)
    for sp in _expected_arrays(store, complete):
        if sp.name not in store:
            report.error(f"array '{sp.name}' of complete stage '{sp.stage}' is missing")
            continue
        arr = store.array(sp.name)
        try:
            want_shape = sp.resolve(dims)["shape"]
        except KeyError as e:
            report.error(f"array '{sp.name}': dimension {e} not recorded in the store")
            continue
        if tuple(arr.shape) != want_shape:
            report.error(f"array '{sp.name}' has shape {tuple(arr.shape)}, schema says {want_shape}")
        if sp.dtype != "str" and np.dtype(arr.dtype) != np.dtype(sp.dtype):
            report.error(f"array '{sp.name}' has dtype {arr.dtype}, schema says {sp.dtype}")
        names = tuple(arr.metadata.dimension_names or ())
        if names != sp.dimension_names:
            report.error(f"array '{sp.name}' has dimension names {names}, schema says {sp.dimension_names}")
        report.checked.append(sp.name)


def _check_chunks(store: Store, report, deep: bool) -> None:
    """Every chunk file the done markers imply exists (and, ``deep``, decodes); names each one that does not."""
    try:
        for blk in missing_blocks(store):
            report.error(f"{blk.describe()} is missing (file {store.path / blk.array / blk.key})")
        if deep:
            for blk, err in undecodable_blocks(store):
                report.error(f"{blk.describe()} cannot be decoded: {err.splitlines()[0]}")
    except DECODE_ERRORS as e:  # an offsets array itself does not decode: the rows of the others are unknown
        report.error(f"the offsets arrays cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}); "
                     f"the store's frame-level arrays are damaged: write the store again")


def _check_offsets(store: Store, complete, dims, report) -> None:
    has_points = "points" in store.attrs.modalities
    axes = {}
    if "correspond" in complete:
        axes = {"points": "points/xyz", "images": "images/rgb", "pairs": "pairs/point"} if has_points else \
            {"images": "images/rgb"}
    for axis, values in axes.items():
        off = store.offsets(axis)
        if len(off) != dims["F"] + 1:
            report.error(f"{axis}/offsets has {len(off)} entries for {dims['F']} frames")
        elif off[0] != 0:
            report.error(f"{axis}/offsets starts at {off[0]}, not 0")
        elif (np.diff(off) < 0).any():
            f = int(np.flatnonzero(np.diff(off) < 0)[0])
            report.error(f"{axis}/offsets decrease", frame=f)
        elif off[-1] != store.array(values).shape[0]:
            report.error(f"{axis}/offsets end at {off[-1]} but {values} has {store.array(values).shape[0]} rows")
    frame_of_image = store.array("images/frame")[:]
    image_off = store.offsets("images")
    expected = np.repeat(np.arange(len(image_off) - 1), np.diff(image_off))
    if len(frame_of_image) != len(expected) or (frame_of_image != expected).any():
        report.error("images/frame disagrees with images/offsets")


#: per-image feature arrays whose values must be finite
FEATURE_ARRAYS = ("sam/feat", "clip/feat")


def _labels_ok(values: np.ndarray, num_classes: int) -> bool:
    return bool(((values < num_classes) | (values == schema.IGNORE_INDEX)).all())


def _check_frames(store: Store, complete, report) -> None:
    attrs = store.attrs
    num_classes = len(attrs.class_names)
    h, w = attrs.image_size
    tokens = store.array("frames/token")[:]
    has_points = "points" in attrs.modalities
    image_off = store.offsets("images")
    point_off = store.offsets("points") if has_points else None
    pair_off = store.offsets("pairs") if "correspond" in complete and has_points else None
    image_label_arrays = [n for n in ("images/gt", "clip/label", "clip/label_refined") if n in store
                          and (schema.spec(n).stage in complete or n == "images/gt")]
    for f in range(attrs.num_frames):
        token = str(tokens[f])
        i0, i1 = int(image_off[f]), int(image_off[f + 1])
        if pair_off is not None:
            p0, p1 = int(point_off[f]), int(point_off[f + 1])
            xyz = store.array("points/xyz")[p0:p1]
            if not np.isfinite(xyz).all():
                return report.error("points/xyz has NaN/inf values", f, token)
            if "points/gt" in store and not _labels_ok(store.array("points/gt")[p0:p1], num_classes):
                return report.error(f"points/gt has values outside 0..{num_classes - 1} and 255", f, token)
            k0, k1 = int(pair_off[f]), int(pair_off[f + 1])
            if k1 == k0:
                return report.error("frame has no pairs (no point visible in any image)", f, token)
            pt = store.array("pairs/point")[k0:k1]
            im = store.array("pairs/image")[k0:k1]
            uv = store.array("pairs/uv")[k0:k1]
            if pt.min() < 0 or pt.max() >= p1 - p0:
                return report.error(f"pairs/point outside the frame's {p1 - p0} points", f, token)
            if im.min() < i0 or im.max() >= i1:
                return report.error(f"pairs/image outside the frame's images {i0}..{i1 - 1}", f, token)
            if uv[:, 0].max() >= w or uv[:, 1].max() >= h:
                return report.error(f"pairs/uv outside the {w}x{h} image", f, token)
        for name in image_label_arrays:
            if not _labels_ok(store.array(name)[i0:i1], num_classes):
                return report.error(f"{name} has values outside 0..{num_classes - 1} and 255", f, token)
        if "sam" in complete:
            ids = store.array("sam/mask_id")[i0:i1]
            if ids.min() < schema.NO_MASK:
                return report.error(f"sam/mask_id below {schema.NO_MASK}", f, token)
        for name in FEATURE_ARRAYS:
            if schema.spec(name).stage not in complete or name not in store:  # e.g. an import without clip/feat
                continue
            if not np.isfinite(store.array(name)[i0:i1]).all():
                return report.error(f"{name} has NaN/inf values", f, token)


def _check_fingerprints(store: Store, complete, report, check_checkpoints: bool) -> None:
    recorded = store.raw_attrs.get("stages", {})
    for stage in complete:
        fp = recorded.get(stage)
        if fp is None:
            report.error(f"complete stage '{stage}' has no fingerprint in the root attributes")
            continue
        for key in ("version", "config", "checkpoint_sha256"):
            if key not in fp:
                report.error(f"fingerprint of '{stage}' lacks '{key}'")
        ckpt = (fp.get("config") or {}).get("checkpoint")
        if ckpt and not fp.get("checkpoint_sha256"):
            report.error(f"stage '{stage}' used checkpoint {ckpt} but recorded no sha256")
        elif check_checkpoints and ckpt and Path(ckpt).exists() and sha256_file(ckpt) != fp["checkpoint_sha256"]:
            report.error(f"checkpoint {ckpt} of stage '{stage}' no longer matches its recorded sha256")


def format_status(path) -> str:
    """``cns-cli cache status``: the store's header, one line per stage, and a warning line naming the chunk
    files that done shards imply but that are missing (a directory listing; nothing is read)."""
    from .integrity import missing_summary
    store = Store(path)
    attrs = store.attrs
    lines = [f"{store.path}: {attrs.dataset}/{attrs.split}, {attrs.num_frames} frames, {len(attrs.class_names)} "
             f"classes, images {attrs.image_size[0]}x{attrs.image_size[1]}"]
    note = simulated_note(store)
    if note:
        lines.append(note)
    for row in stage_status(store):
        state = "complete" if row["complete"] else ("partial" if row["done"] else "not run")
        extra = f", {row['failed_frames']} failed frame(s)" if row["failed_frames"] else ""
        if row["simulated"]:
            extra += f"  [simulated: {row['simulated']['simulator']} v{row['simulated']['version']}]"
        elif row["from_simulated"]:
            extra += f"  [on simulated {', '.join(row['from_simulated'])}]"
        lines.append(f"  {row['stage']:<11} {row['done']}/{row['total']} shards  {state}{extra}")
    missing = missing_blocks(store)
    if missing:
        lines.append(f"WARNING: {missing_summary(store, missing)}; `cns-cli cache validate {store.path}` lists "
                     f"them and rerunning labels rewrites them")
    return "\n".join(lines)
