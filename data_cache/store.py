"""Opening, creating and writing CNS stores.

Writers follow three rules (``SCHEMA.md`` explains why):

1. A shard of frames is the unit of work and has exactly one writer task. Its rows of a ragged array
   may share a zarr shard with the neighbouring work shard; :func:`write_rows` serialises the writes to
   such boundary zarr shards with a file lock (released by the OS when a process dies, so a SIGKILL never
   leaves a stale lock) and writes whole zarr shards without a lock.
2. A stage writes ``_done/<stage>/<shard>.json`` only after the shard's data are written; readers and
   resume trust only those markers.
3. A frame that fails is recorded in ``_failed/<stage>/<shard>.json``; its shard is not marked done.

Every chunk is stored, even one holding only the fill value (zarr skips those by default), and every chunk
ends with a crc32c checksum: a missing chunk file is lost data (``data_cache.integrity`` lists them) and a
changed byte fails to decode instead of reading back as other numbers.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import zarr
from filelock import FileLock

from . import schema
from .schema import RootAttrs
from .errors import UserError

# every chunk is written, even one of fill values only: then a chunk file that the done shards imply and
# that is absent is lost data, never "all fill" (data_cache.integrity relies on it)
zarr.config.set({"array.write_empty_chunks": True})

class CacheError(UserError, RuntimeError):
    """A store is missing, malformed or incompatible with what is asked of it."""


def store_path(cache_dir: str | os.PathLike, dataset: str, split: str) -> Path:
    return Path(cache_dir) / f"{dataset}-{split}{schema.STORE_SUFFIX}"


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    _fsync_path(str(path))


def _fsync_path(path: str) -> None:
    """fsync a file or a directory (its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_json(path: Path, payload: Mapping) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def compressors(name: str):
    """The zarr bytes-to-bytes codecs for a codec name of :data:`data_cache.schema.CODECS`, ending with a
    crc32c checksum of the compressed chunk (zarr checks it on every read: a flipped byte raises)."""
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
    spec = schema.CODECS[name]
    first = ZstdCodec(level=0) if spec is None else BloscCodec(**spec["blosc"])  # None: zarr's default, zstd
    return [first, Crc32cCodec()]


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", block: int = 1 << 22) -> str:
    """Hex digest of a file, read in blocks (checkpoint fingerprints and download checks)."""
    import hashlib
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class Store:
    """A CNS cache store on a local (or shared, POSIX-locking) file system."""

    def __init__(self, path: str | os.PathLike, mode: str = "r", consolidated: bool | None = None):
        """``consolidated=False`` makes a reader ignore consolidated metadata: a stage running now (after an
        earlier run consolidated the store) may have added arrays that the consolidated copy does not list."""
        self.path = Path(path)
        root_meta = self.path / "zarr.json"
        if mode == "r" and not root_meta.exists():
            raise CacheError(f"{self.path} is not a CNS store (no zarr.json); write one with `cns-cli labels`")
        if root_meta.exists():
            _check_metadata(root_meta)
        if mode != "r" and self.path.exists() and self.path not in _WRITABLE and not _writable(self.path):
            raise CacheError(f"{self.path} is read-only (no write permission on it or its folders): this command "
                             f"writes to the store; make it writable or write a copy elsewhere")
        # writers never trust consolidated metadata: a later stage may have added arrays since
        self.group = zarr.open_group(str(self.path), mode="r" if mode == "r" else "a", zarr_format=3,
                                     use_consolidated=False if mode != "r" else consolidated)
        self.mode = mode
        if schema.ROOT_ATTR not in self.group.attrs and mode == "r":
            raise CacheError(f"{self.path} is a Zarr group but has no '{schema.ROOT_ATTR}' attributes")

    # -- creation ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, attrs: RootAttrs) -> "Store":
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            zarr.open_group(str(path), mode="w-", zarr_format=3, attributes={schema.ROOT_ATTR: attrs.to_json()})
        except PermissionError as e:
            raise CacheError(f"cannot create {path}: {e.strerror} ({e.filename}); choose a writable --cache "
                             f"directory") from None
        return cls(path, mode="a")

    @property
    def attrs(self) -> RootAttrs:
        return RootAttrs.from_json(self.raw_attrs)

    @property
    def raw_attrs(self) -> dict:
        """The root ``cns`` attributes as on disk now (another process may have changed them)."""
        if self.mode == "r":
            return dict(self.group.attrs[schema.ROOT_ATTR])
        return self._reread_attrs()

    def update_attrs(self, **changes) -> None:
        """Merge ``changes`` into the root ``cns`` attributes (several stages' workers may do this at once)."""
        with self._lock("root", 0):
            cur = self._reread_attrs()
            cur.update(changes)
            self.group.attrs[schema.ROOT_ATTR] = cur

    def _reread_attrs(self) -> dict:
        meta = json.loads((self.path / "zarr.json").read_text())
        return dict(meta.get("attributes", {}).get(schema.ROOT_ATTR, {}))

    def dims(self) -> dict:
        return dict(self.raw_attrs.get("dims", {}))

    def set_dims(self, **dims) -> None:
        with self._lock("root-dims", 0):
            cur = dict(self._reread_attrs().get("dims", {}))
            cur.update({k: int(v) for k, v in dims.items()})
            self.update_attrs(dims=cur)

    def create_array(self, name: str, dims: Mapping[str, int] | None = None, overwrite: bool = False):
        """Create the schema array ``name`` with dimensions resolved from the store's ``dims``."""
        sp = schema.spec(name)
        all_dims = {**self.dims(), **(dims or {})}
        missing = [d for d in list(sp.shape) + list(sp.chunks) + list(sp.shards or ())
                   if isinstance(d, str) and d not in all_dims]
        if missing:
            raise CacheError(f"cannot create {name}: dimension(s) {missing} unknown in {self.path}")
        res = sp.resolve(all_dims)
        kwargs = dict(shape=res["shape"], chunks=res["chunks"], dimension_names=sp.dimension_names,
                      fill_value=sp.fill_value, overwrite=overwrite)
        if sp.dtype == "str":
            kwargs["dtype"] = str
        else:
            kwargs["dtype"] = sp.dtype
            if res["shards"] is not None:
                kwargs["shards"] = res["shards"]
        codec = compressors(sp.codec)
        if codec is not None:
            kwargs["compressors"] = codec
        return self.group.create_array(name, **kwargs)

    def ensure_arrays(self, names) -> None:
        """Create each array unless the store holds it with the shape the current dims give (resume-safe)."""
        dims = self.dims()
        for name in names:
            if name in self and tuple(self.array(name).shape) == schema.spec(name).resolve(dims)["shape"]:
                continue
            self.create_array(name, overwrite=name in self)

    # -- access -----------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        try:
            self.group[name]
            return True
        except KeyError:
            return False

    def array(self, name: str):
        try:
            return self.group[name]
        except KeyError:
            raise CacheError(f"{self.path} has no array '{name}' (written by the "
                             f"'{schema.spec(name).stage}' stage)") from None
        except json.JSONDecodeError:
            _check_metadata(self.path / name / "zarr.json")
            raise

    def offsets(self, axis: str) -> np.ndarray:
        """``points``/``images``/``pairs`` offsets [F+1]."""
        return np.asarray(self.array(f"{axis}/offsets")[:], dtype=np.int64)

    # -- writing ----------------------------------------------------------------------------------
    def write_rows(self, name: str, start: int, values: np.ndarray) -> None:
        """Write ``values`` into rows ``start:start+len(values)`` of array ``name``.

        Zarr shards that the range covers only partly may also be written by the neighbouring work
        shard; those writes take a per-(array, zarr shard) file lock. Fully covered shards need none.
        """
        arr = self.array(name)
        n = len(values)
        if n == 0:
            return
        stop = start + n
        if start < 0 or stop > arr.shape[0]:
            raise CacheError(f"{name}: rows {start}:{stop} outside the array's {arr.shape[0]} rows")
        block = (arr.shards or arr.chunks)[0]
        first_full = -(-start // block) * block
        last_full = stop // block * block
        pieces = []
        if first_full >= last_full:  # the range never covers a whole zarr shard
            pieces.append((start, stop, True))
        else:
            if start < first_full:
                pieces.append((start, first_full, True))
            pieces.append((first_full, last_full, False))
            if last_full < stop:
                pieces.append((last_full, stop, True))
        for a, b, shared in pieces:
            chunk = values[a - start:b - start]
            if not shared:
                arr[a:b] = chunk
                continue
            # one lock per zarr shard the piece touches (a piece spans at most two when it is the whole range)
            locks = [self._lock(name, s) for s in range(a // block, (b - 1) // block + 1)]
            for lock in locks:
                lock.acquire()
            try:
                arr[a:b] = chunk
            finally:
                for lock in reversed(locks):
                    lock.release()

    def _lock(self, name: str, zshard: int) -> FileLock:
        p = self.path / schema.LOCKS_DIR / name.replace("/", "__") / f"{zshard}.lock"
        p.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(p))

    # -- done markers, failures, parts -----------------------------------------------------------
    def _marker(self, kind: str, stage: str, shard: int | str) -> Path:
        name = f"{shard:05d}.json" if isinstance(shard, int) else f"{shard}.json"
        return self.path / kind / stage / name

    def mark_done(self, stage: str, shard: int | str, stats: Mapping) -> None:
        _atomic_write_json(self._marker(schema.DONE_DIR, stage, shard), stats)
        failed = self._marker(schema.FAILED_DIR, stage, shard)
        if failed.exists():
            failed.unlink()

    def undo_done(self, stage: str, shard: int | str) -> None:
        """Take back a done marker (its data turned out lost): the next run redoes the shard."""
        self._marker(schema.DONE_DIR, stage, shard).unlink(missing_ok=True)

    def is_done(self, stage: str, shard: int | str) -> bool:
        return self._marker(schema.DONE_DIR, stage, shard).exists()

    def done_info(self, stage: str, shard: int | str) -> dict | None:
        p = self._marker(schema.DONE_DIR, stage, shard)
        return json.loads(p.read_text()) if p.exists() else None

    def done_shards(self, stage: str) -> list[int]:
        d = self.path / schema.DONE_DIR / stage
        if not d.exists():
            return []
        return sorted(int(p.stem) for p in d.glob("[0-9]*.json"))

    def stage_complete(self, stage: str) -> bool:
        return self.is_done(stage, "_complete")

    def simulated_stages(self) -> dict[str, dict]:
        """The stages whose recorded fingerprint says they were *simulated* from the ground truth
        (``pipeline.simulate``: a benchmark component, not real CLIP/SAM outputs), each with its ``simulator``,
        ``version`` and ``seed``. Empty for a store of real foundation-model outputs."""
        out = {}
        for stage, fp in self.raw_attrs.get("stages", {}).items():
            config = (fp or {}).get("config") or {}
            if config.get("simulated") is True:
                out[stage] = {"simulator": config.get("simulator"), "version": config.get("simulator_version"),
                              "seed": config.get("seed")}
        return out

    def stages_from_simulated(self) -> dict[str, list[str]]:
        """Stages run on this store (with a recorded fingerprint) that are not simulated themselves but read,
        directly or not, a simulated stage's outputs, with those stages: ``{"refine": ["maskclip", "sam"]}``."""
        recorded = self.raw_attrs.get("stages", {})
        simulated = set(self.simulated_stages())
        tainted: dict[str, set] = {s: {s} for s in simulated}
        out = {}
        for stage in schema.STAGE_ORDER:
            if stage in simulated:
                continue
            inputs = set().union(*(tainted.get(r, set()) for r in schema.STAGE_REQUIRES[stage]))
            if inputs:
                tainted[stage] = inputs
                if stage in recorded:
                    out[stage] = sorted(inputs, key=schema.STAGE_ORDER.index)
        return out

    def clear_stage(self, stage: str) -> None:
        import shutil
        for kind in (schema.DONE_DIR, schema.FAILED_DIR, schema.PARTS_DIR):
            shutil.rmtree(self.path / kind / stage, ignore_errors=True)

    def record_failure(self, stage: str, shard: int, failures: list[dict]) -> None:
        _atomic_write_json(self._marker(schema.FAILED_DIR, stage, shard), {"failures": failures})

    def failures(self, stage: str | None = None) -> dict:
        root = self.path / schema.FAILED_DIR
        out = {}
        for p in sorted(root.glob(f"{stage or '*'}/*.json")):
            out[(p.parent.name, p.stem)] = json.loads(p.read_text())["failures"]
        return out

    def part_path(self, stage: str, shard: int) -> Path:
        return self.path / schema.PARTS_DIR / stage / f"{shard:05d}.npz"

    def write_part(self, stage: str, shard: int, **arrays: np.ndarray) -> None:
        """Save a shard's intermediate arrays atomically (used where a total size is unknown beforehand)."""
        p = self.part_path(stage, shard)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)

    def read_part(self, stage: str, shard: int, *keys: str) -> dict:
        """A shard's part arrays (only ``keys`` when given: the others are not read)."""
        with np.load(self.part_path(stage, shard)) as z:
            return {k: z[k] for k in (keys or z.files)}

    def map_part(self, stage: str, shard: int, *keys: str) -> dict:
        """A shard's part arrays ``keys``, memory-mapped read-only: a slice reads only its own bytes.

        :meth:`write_part` stores each array uncompressed (``np.savez``), so its ``.npy`` bytes lie whole in the
        file: the array is mapped at the offset the zip's local header gives.
        """
        import struct
        import zipfile
        path = self.part_path(stage, shard)
        out = {}
        with zipfile.ZipFile(path) as z, open(path, "rb") as f:
            for key in keys:
                try:
                    info = z.getinfo(f"{key}.npy")
                except KeyError:
                    raise CacheError(f"{path} has no array '{key}'") from None
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CacheError(f"{path}: '{key}' is compressed; part files are written uncompressed")
                f.seek(info.header_offset)
                header = f.read(30)  # the zip local file header; its name and extra field follow
                if header[:4] != b"PK\x03\x04":
                    raise CacheError(f"{path}: no zip local header for '{key}' at byte {info.header_offset}")
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                member_start = info.header_offset + 30 + name_len + extra_len
                f.seek(member_start)
                fmt = np.lib.format
                version = fmt.read_magic(f)
                read_header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise CacheError(f"{path}: '{key}' has .npy format version {version}, which cannot be mapped")
                shape, fortran, dtype = read_header(f)
                if dtype.hasobject:
                    raise CacheError(f"{path}: '{key}' holds Python objects, which cannot be mapped")
                size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if f.tell() + size > member_start + info.file_size:
                    raise CacheError(f"{path}: '{key}' is shorter than its header's shape {shape}")
                if size == 0:
                    out[key] = np.zeros(shape, dtype)
                else:
                    out[key] = np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                                         order="F" if fortran else "C")
        return out

    def remove_parts(self, stage: str) -> None:
        """Delete a stage's part files (once what they were committed into is durable), then ``_parts/`` when
        no stage has any left."""
        import shutil
        root = self.path / schema.PARTS_DIR
        shutil.rmtree(root / stage, ignore_errors=True)
        try:
            root.rmdir()
        except OSError:  # absent, or another stage's parts remain
            pass

    def sync(self, names, threads: int = 16) -> None:
        """fsync every file and directory of the arrays ``names``: their data survive a power loss.

        The fsyncs run on ``threads`` threads: a file system commits concurrent fsyncs together (ext4 here: 172
        freshly written 300 KB files took 0.14-0.68 s one after another, 0.007-0.056 s from 16 threads).
        """
        from concurrent.futures import ThreadPoolExecutor
        paths = []
        for name in names:
            for dirpath, _, files in os.walk(self.path / name):
                paths.extend(os.path.join(dirpath, fn) for fn in files)
                paths.append(dirpath)
        with ThreadPoolExecutor(max(1, min(threads, len(paths)))) as pool:
            list(pool.map(_fsync_path, paths))

    def consolidate(self) -> None:
        """Consolidate the metadata so readers open the store with one read."""
        import warnings
        with warnings.catch_warnings():
            # the bookkeeping folders (_done, _parts, _locks) are not zarr nodes, and zarr says so
            warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
            warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
            zarr.consolidate_metadata(str(self.path), zarr_format=3)


def _check_metadata(path: Path) -> None:
    """A zarr metadata file that does not parse (truncated, overwritten) is one line naming it."""
    try:
        json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path} is damaged ({type(e).__name__}: {e}); the store's metadata cannot be read: "
                         f"restore the file from a copy or write the store again") from None


#: stores found writable by this process (each task opens its store: the probe runs once per process)
_WRITABLE: set = set()


def _writable(path: Path) -> bool:
    """Whether this process may create and delete files in the store's folders (``os.access`` says yes to root
    for any folder, so a probe file is created and removed in the store's root and its ``_done`` folder)."""
    for folder in (path, path / schema.DONE_DIR):
        if not folder.is_dir():
            continue
        try:
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        except PermissionError:
            return False
        os.close(fd)
        os.unlink(probe)
    _WRITABLE.add(path)
    return True


def labels_command(store_dir: str | os.PathLike, attrs: Mapping, stages: str | None = None,
                   overwrite: bool = False) -> str:
    """The ``cns-cli labels`` command that writes (or continues) the store at ``store_dir``, copy-pasteable:
    its dataset, split, data root, cache directory and the ``--dataset-option`` values it was planned with
    (``attrs``: the root ``cns`` attributes)."""
    import shlex
    path = Path(store_dir)
    words = ["cns-cli", "labels", "--dataset", attrs.get("dataset", "?"), "--split", attrs.get("split", "?"),
             "--cache", str(path.parent)]
    root = (attrs.get("dataset_config") or {}).get("root")
    if root:
        words += ["--data-root", str(root)]
    for key, value in sorted((attrs.get("dataset_options") or {}).items()):
        words += ["--dataset-option", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    if stages:
        words += ["--stages", stages]
    if overwrite:
        words.append("--overwrite")
    return shlex.join(words)


def open_store(path: str | os.PathLike, mode: str = "r") -> Store:
    return Store(path, mode=mode)


def iter_frame_ranges(offsets: np.ndarray, frames: Iterable[int]):
    for f in frames:
        yield f, int(offsets[f]), int(offsets[f + 1])
