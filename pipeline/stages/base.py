"""The stage interface every label stage implements (reader -> model -> writer per shard).

Lifecycle, driven by :mod:`pipeline.runner`:

1. ``Stage(**config)`` — cheap; anywhere (driver and workers).
2. ``bind(attrs)`` — the store's root attributes (dataset, class names), for a stage whose output depends
   on them beyond its configuration; then ``fingerprint()`` — version, configuration and checkpoint sha256;
   stored in the store's ``cns.stages`` and compared on every rerun (a difference is refused, naming the
   field).
3. ``prepare(store, adapter)`` — once, on the driver, before any shard runs: create the stage's arrays,
   write global arrays (text embeddings, a fitted projection).
4. ``build_model(device)`` — once per worker process (the runner caches the result), never per task.
5. ``process_shard(ctx)`` — one work shard (a contiguous frame range); reads its inputs from the store and
   writes its outputs with ``store.write_rows``; wraps each frame in ``ctx.frame(i)`` so that a failing
   frame is recorded and the shard is not marked done; returns per-shard statistics.
6. ``finalize(store, map_tasks)`` — once, after every shard is done (e.g. the pairs commit); ``map_tasks(fn,
   jobs)`` runs ``fn`` over ``jobs`` as tasks of the cluster (in this process without one).
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from data_cache.errors import OptionError, UnknownOptionError
from data_cache.schema import STAGE_REQUIRES
from data_cache.store import CacheError, sha256_file  # noqa: F401  (re-exported for the stages)

from ..registry import Registry

STAGES = Registry("stage")

# Models live once per worker process, keyed by stage fingerprint and device (built on first use).
_MODELS: dict = {}
_MODELS_LOCK = threading.Lock()
_MODEL_USE_LOCKS: dict = {}


@dataclass(frozen=True)
class Shard:
    index: int
    frame_start: int
    frame_stop: int

    @property
    def frames(self) -> range:
        return range(self.frame_start, self.frame_stop)


@dataclass
class ShardContext:
    store: object
    shard: Shard
    adapter: object
    model: object
    device: str = "cpu"
    progress: object = None  # callable(n_frames) or None
    failures: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def frame(self, index: int, token: str | None = None):
        """Run one frame's work; an exception is recorded (frame, file, error) and does not propagate."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 — every frame error is reported, none stops the shard's others
            self.failures.append({
                "frame": int(index), "token": token, "error": f"{type(e).__name__}: {e}",
                "file": getattr(e, "file", None), "traceback": traceback.format_exc(limit=6),
            })
        finally:
            if self.progress is not None:
                self.progress(1)

    @contextlib.contextmanager
    def timed(self, key: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0


class Stage:
    name: str = ""
    version: int = 1
    defaults: dict = {}  # every configuration key the stage takes, with its default
    runtime_keys: tuple = ()  # keys that change speed, never the output: left out of the fingerprint
    reads_dataset: bool = False  # True for a stage that reads the dataset itself (gets the adapter in its context)
    uses_gpu: bool = False  # True for a model stage: on a cluster whose workers offer a "GPU" resource it takes one

    def __init__(self, **config):
        unknown = set(config) - set(self.defaults)
        if unknown:
            raise UnknownOptionError(f"unknown {self.name} option(s) {sorted(unknown)} "
                              f"(known: {', '.join(sorted(self.defaults)) or 'none'})")
        self.config = {**self.defaults, **config}
        self.store_attrs = None  # the store's RootAttrs once bound

    @classmethod
    def for_config(cls, config: dict):
        """The class to build for ``config`` (a stage with variants picks one by an option; default: itself)."""
        return cls

    def bind(self, attrs) -> None:
        """Bind the stage to a store's root attributes (the runner does, before ``fingerprint``; ``prepare``
        does again); a stage whose output depends on them (e.g. the class names) records that in
        ``fingerprint_config``."""
        self.store_attrs = attrs

    @property
    def requires(self) -> tuple[str, ...]:
        return STAGE_REQUIRES[self.name]

    def checkpoint_sha256(self) -> str | None:
        return None

    def fingerprint(self) -> dict:
        return {"version": self.version, "config": self.fingerprint_config(),
                "checkpoint_sha256": self.checkpoint_sha256()}

    def fingerprint_config(self) -> dict:
        """The configuration that determines the stage's output (without ``runtime_keys``)."""
        return {k: v for k, v in self.config.items() if k not in self.runtime_keys}

    def prepare(self, store, adapter) -> None:
        pass

    def build_model(self, device: str):
        return None

    def _model_key(self, device: str) -> tuple:
        return (self.name, json.dumps(self.fingerprint(), sort_keys=True, default=str), device)

    def get_model(self, device: str):
        """This process's model for the stage (``build_model`` runs once per process and fingerprint)."""
        key = self._model_key(device)
        with _MODELS_LOCK:
            if key not in _MODELS:
                _MODELS[key] = self.build_model(device)
                _MODEL_USE_LOCKS[key] = threading.Lock() if _MODELS[key] is not None else None
            return _MODELS[key]

    def model_in_use(self, device: str):
        """A lock a shard holds while it uses this process's model: the models are shared by the threads of
        a worker, and some are stateful (SAM's predictor keeps the image it was last given), so two tasks of
        one process must not run one model at once. A stage without a model gets a no-op context."""
        self.get_model(device)
        return _MODEL_USE_LOCKS.get(self._model_key(device)) or contextlib.nullcontext()

    def process_shard(self, ctx: ShardContext) -> dict:
        raise NotImplementedError

    def finalize(self, store, map_tasks=None) -> None:
        pass


class ClusterMap:
    """``map_tasks(fn, jobs)``: ``[fn(job) for job in jobs]``, as tasks on the dask cluster when called from inside
    a dask task (the calling task secedes from its worker's thread pool while it waits), else in this process.
    ``map_tasks.slots()``: how many such tasks run at once (the cluster's worker threads; 1 in this process)."""

    @staticmethod
    def _in_task() -> bool:
        try:
            from distributed import get_worker
            get_worker()
            return True
        except (ImportError, ValueError):
            return False

    def __call__(self, fn, jobs) -> list:
        if not self._in_task():
            return [fn(job) for job in jobs]
        from distributed import worker_client
        with worker_client() as client:
            return client.gather(client.map(fn, jobs, pure=False))

    def slots(self) -> int:
        if not self._in_task():
            return 1
        from distributed import get_client
        return max(1, sum(get_client().nthreads().values()))


map_tasks = ClusterMap()


_SHA_CACHE: dict = {}


def cached_sha256(path: str) -> str:
    """sha256 of a checkpoint file, computed once per (path, size, mtime) in this process."""
    import os
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


# -- shared by the model stages ----------------------------------------------------------------------------
def image_groups(ctx: ShardContext, max_images: int) -> list[list[tuple[int, str | None, int, int]]]:
    """The shard's frames in consecutive groups of at most ``max_images`` images (a frame is never split).

    Each entry is ``(frame, token, first_row, stop_row)``; a group's rows are contiguous.
    """
    store = ctx.store
    off = store.offsets("images")
    f0, f1 = ctx.shard.frame_start, ctx.shard.frame_stop
    tokens = [str(t) for t in store.array("frames/token")[f0:f1]] if "frames/token" in store else [None] * (f1 - f0)
    groups, cur, n = [], [], 0
    for j, f in enumerate(ctx.shard.frames):
        a, b = int(off[f]), int(off[f + 1])
        if cur and n + (b - a) > max_images:
            groups.append(cur)
            cur, n = [], 0
        cur.append((f, tokens[j], a, b))
        n += b - a
    if cur:
        groups.append(cur)
    return groups


def run_group(ctx: ShardContext, group, work) -> bool:
    """Run ``work(first_row, stop_row)`` on a group's rows; a failure is recorded for each of its frames.

    Batching images across frames means one error cannot be pinned to a frame: every frame of the group
    is reported failed with it (the shard is then not marked done, and a rerun redoes it).
    """
    a0, b0 = group[0][2], group[-1][3]
    err = None
    try:
        if b0 > a0:
            work(a0, b0)
    except Exception as e:  # noqa: BLE001 — recorded per frame below
        err = e
    for f, token, _, _ in group:
        with ctx.frame(f, token):
            if err is not None:
                raise err
    return err is None


# -- the fixed feature projection (sam/proj, clip/proj) -------------------------------------------------------
PAPER_FEAT_DIM = 64  # D of Eq. 7


def sample_rows(n_images: int, n: int) -> np.ndarray:
    """``n`` image rows spread evenly over ``n_images`` (first and last included), unique and sorted."""
    n = max(1, min(int(n), n_images))
    return np.unique(np.linspace(0, n_images - 1, n).round().astype(np.int64))


def ensure_projection(stage: Stage, store, proj_name: str, mean_name: str, encode, read_rows=None) -> None:
    """Fit, copy or keep the store's fixed PCA projection ``proj_name`` [S, D] with its mean ``mean_name`` [S].

    * kept when an earlier run with this very stage fingerprint fitted or copied it (resume; nothing is
      encoded);
    * copied from the store at ``stage.config["proj_store"]`` when given (e.g. the train split's for the val
      split);
    * else fitted (:func:`pipeline.models.pca.fit_pca`, D = ``stage.feat_dim()``) on the features of
      ``pca_sample_images`` images spread evenly over the store, ``encode(uint8 images [B] of [H, W, 3]) ->
      float [B, S, h, w]`` run on ``batch_size`` images at a time. The images are the rows of
      ``images/rgb``, or what ``read_rows(rows)`` returns (e.g. the frames' source images).

    How it was obtained is recorded in the projection array's attributes (``fit_key``, and
    ``fitted_on_rows`` or ``copied_from``). Both arrays must exist.
    """
    from ..models.pca import fit_pca
    fit_key = json.dumps(stage.fingerprint(), sort_keys=True, default=str)
    proj = store.array(proj_name)
    if proj.attrs.get("fit_key") == fit_key:
        return
    c = stage.config
    if c["proj_store"]:
        from data_cache.store import Store
        src = Store(c["proj_store"], mode="r")
        p, m = src.array(proj_name)[:], src.array(mean_name)[:]
        if p.shape != proj.shape or m.shape != store.array(mean_name).shape:
            raise OptionError(f"{proj_name} of {src.path} (option proj_store) is {p.shape}, this store needs "
                              f"{proj.shape}")
        how = {"copied_from": str(src.path)}
    else:
        rgb = store.array("images/rgb")
        if rgb.shape[0] == 0:
            raise CacheError(f"{store.path} has no images to fit {proj_name} on")
        rows = sample_rows(rgb.shape[0], c["pca_sample_images"])
        images = read_rows(rows) if read_rows is not None else np.stack([rgb[int(r)] for r in rows])
        if not any(np.asarray(im).any() for im in images):
            raise CacheError(f"{store.path}: images/rgb is empty where sampled; run the correspond stage first")
        bs = max(1, int(c["batch_size"]))
        samples = []
        for i in range(0, len(images), bs):
            e = np.asarray(encode(images[i:i + bs]), dtype=np.float32)
            samples.append(e.transpose(0, 2, 3, 1).reshape(-1, e.shape[1]))
        p, m = fit_pca(np.concatenate(samples), stage.feat_dim())
        how = {"fitted_on_rows": rows.tolist()}
    proj[:] = p
    store.array(mean_name)[:] = m
    proj.attrs.update({"fit_key": fit_key, **how})


def build_stage(name: str, **config) -> Stage:
    """The stage ``name`` with ``config``; options carrying ``simulate`` select the simulated foundation model
    of that name instead (:mod:`pipeline.simulate`: a benchmark component, never picked otherwise)."""
    if config.get("simulate") is not None:
        from ..simulate.stages import SIMULATED_STAGES
        return SIMULATED_STAGES.get(name)(**config)
    from . import load_builtin  # noqa: F401  (registers the built-in stages)
    return STAGES.get(name).for_config(config)(**config)
