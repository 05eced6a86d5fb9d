"""The ``correspond`` stage: ingest a dataset's frames and write the pixel-point correspondences.

Per frame it writes the points (``points/xyz``, ``points/feat``, ``points/gt``), the images at the training
resolution (``images/rgb``, ``images/gt``, ``images/intrinsics``) and the pairs: every point a camera sees
(depth > ``min_depth``, inside the image, and where the dataset has depth maps, confirmed by the depth map
within ``occlusion_tolerance``) with its pixel at the training resolution. The number of pairs is known
only after projection, so a shard saves its pairs as a part file; ``finalize`` commits the parts in frame
order into ``pairs/*`` once every shard is done -- one task per contiguous run of zarr shards of the pairs
arrays (two runs per worker thread), in parallel on the dask cluster -- and fsyncs them; the runner then
writes the stage's ``_complete`` marker and deletes the parts.

In a store without points (``cns.modalities == ["images"]``, a 2D-only dataset such as nuImages) it writes
the images only: no points, no pairs, no part files.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from data_cache import schema

from ..datasets.base import DatasetError
from ..projection import project_points, scale_intrinsics, uv_to_training_pixels
from .base import STAGES, ShardContext, Stage, map_tasks as cluster_map

PAIR_ARRAYS = ("pairs/point", "pairs/image", "pairs/uv", "pairs/depth")


def resize_rgb(rgb: np.ndarray, size_hw) -> np.ndarray:
    if rgb.shape[:2] == tuple(size_hw):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size_hw[1], size_hw[0]), Image.BILINEAR))


def resize_labels(labels: np.ndarray, size_hw) -> np.ndarray:
    if labels.shape[:2] == tuple(size_hw):
        return labels
    return np.asarray(Image.fromarray(labels).resize((size_hw[1], size_hw[0]), Image.NEAREST))


@STAGES.register("correspond")
class CorrespondStage(Stage):
    name = "correspond"
    version = 1
    reads_dataset = True

    def fingerprint_config(self) -> dict:
        return {}  # everything that shapes the output is the dataset's configuration, fingerprinted at plan time

    def prepare(self, store, adapter) -> None:
        attrs = store.attrs
        store.ensure_arrays([sp.name for sp in schema.arrays_of_stage(self.name) if not sp.name.startswith("pairs/")
                             and schema.array_in_store(sp, attrs.modalities, attrs.capabilities)])

    def process_shard(self, ctx: ShardContext) -> dict:
        store, adapter = ctx.store, ctx.adapter
        attrs = store.attrs
        if "points" not in attrs.modalities:
            return self._process_images_only(ctx)
        size_hw = tuple(attrs.image_size)
        point_off = store.offsets("points")
        image_off = store.offsets("images")
        tokens = store.array("frames/token")[ctx.shard.frame_start:ctx.shard.frame_stop]
        has_point_gt = "points/gt" in store
        has_image_gt = "images/gt" in store
        pairs = {k: [] for k in PAIR_ARRAYS}
        counts = np.zeros(len(ctx.shard.frames), dtype=np.int64)
        stats = {"frames": 0, "points": 0, "images": 0, "pairs": 0}
        for j, f in enumerate(ctx.shard.frames):
            token = str(tokens[j])
            with ctx.frame(f, token):
                with ctx.timed("load_s"):
                    frame = adapter.load(f)
                self._check_plan(frame, token, point_off, image_off, f)
                with ctx.timed("project_s"):
                    frame_pairs = self._pairs(frame, adapter, size_hw, int(image_off[f]))
                if len(frame_pairs["pairs/point"]) == 0:
                    raise DatasetError("no point of the frame is visible in any of its images", token,
                                       frame.points_file)
                with ctx.timed("write_s"):
                    self._write_frame(store, frame, size_hw, int(point_off[f]), int(image_off[f]),
                                      has_point_gt, has_image_gt)
                for k in PAIR_ARRAYS:
                    pairs[k].append(frame_pairs[k])
                counts[j] = len(frame_pairs["pairs/point"])
                stats["frames"] += 1
                stats["points"] += len(frame.xyz)
                stats["images"] += len(frame.images)
                stats["pairs"] += int(counts[j])
        if not ctx.failures:
            empty = {"pairs/point": np.zeros(0, np.int32), "pairs/image": np.zeros(0, np.int32),
                     "pairs/uv": np.zeros((0, 2), np.uint16), "pairs/depth": np.zeros(0, np.float16)}
            part = {k.replace("/", "__"): (np.concatenate(v) if v else empty[k]) for k, v in pairs.items()}
            store.write_part(self.name, ctx.shard.index, counts=counts, **part)
        return stats

    def _process_images_only(self, ctx: ShardContext) -> dict:
        """A shard of a store without points: each frame's images at the training resolution, nothing else."""
        store = ctx.store
        size_hw = tuple(store.attrs.image_size)
        image_off = store.offsets("images")
        tokens = store.array("frames/token")[ctx.shard.frame_start:ctx.shard.frame_stop]
        has_image_gt = "images/gt" in store
        stats = {"frames": 0, "images": 0}
        for j, f in enumerate(ctx.shard.frames):
            token = str(tokens[j])
            with ctx.frame(f, token):
                with ctx.timed("load_s"):
                    frame = ctx.adapter.load(f)
                planned = int(image_off[f + 1] - image_off[f])
                if len(frame.images) != planned:
                    raise DatasetError(f"frame has {len(frame.images)} images but {planned} were planned", token,
                                       frame.images[0].file if frame.images else None)
                with ctx.timed("write_s"):
                    self._write_images(store, frame, size_hw, int(image_off[f]), has_image_gt)
                stats["frames"] += 1
                stats["images"] += len(frame.images)
        return stats

    @staticmethod
    def _check_plan(frame, token, point_off, image_off, f):
        planned_points = int(point_off[f + 1] - point_off[f])
        if len(frame.xyz) != planned_points:
            raise DatasetError(f"point file holds {len(frame.xyz)} points but {planned_points} were planned "
                               f"(file changed or truncated since the store was created)", token, frame.points_file)
        planned_images = int(image_off[f + 1] - image_off[f])
        if len(frame.images) != planned_images:
            raise DatasetError(f"frame has {len(frame.images)} images but {planned_images} were planned", token,
                               frame.points_file)

    @staticmethod
    def _pairs(frame, adapter, size_hw, first_image: int) -> dict:
        out = {k: [] for k in PAIR_ARRAYS}
        for i, im in enumerate(frame.images):
            native_hw = im.rgb.shape[:2]
            idx, uv, z = project_points(frame.xyz, im.points_to_camera, im.intrinsics, native_hw, adapter.min_depth,
                                        depth=im.depth, depth_intrinsics=im.depth_intrinsics,
                                        tolerance=adapter.occlusion_tolerance)
            out["pairs/point"].append(idx.astype(np.int32))
            out["pairs/image"].append(np.full(len(idx), first_image + i, dtype=np.int32))
            out["pairs/uv"].append(uv_to_training_pixels(uv, native_hw, size_hw))
            out["pairs/depth"].append(z.astype(np.float16))
        return {k: np.concatenate(v) for k, v in out.items()}

    @staticmethod
    def _write_frame(store, frame, size_hw, p0, i0, has_point_gt, has_image_gt):
        store.write_rows("points/xyz", p0, frame.xyz.astype(np.float32))
        feat = frame.feat.astype(np.float32)
        store.write_rows("points/feat", p0, feat.reshape(len(feat), -1))
        if has_point_gt:
            gt = frame.gt if frame.gt is not None else np.full(len(frame.xyz), schema.IGNORE_INDEX, np.uint8)
            store.write_rows("points/gt", p0, gt.astype(np.uint8))
        CorrespondStage._write_images(store, frame, size_hw, i0, has_image_gt)

    @staticmethod
    def _write_images(store, frame, size_hw, i0, has_image_gt):
        rgb = np.stack([resize_rgb(im.rgb, size_hw) for im in frame.images])
        store.write_rows("images/rgb", i0, rgb)
        ks = np.stack([scale_intrinsics(im.intrinsics, im.rgb.shape[:2], size_hw) for im in frame.images])
        store.write_rows("images/intrinsics", i0, ks.astype(np.float32))
        if has_image_gt:
            gts = np.stack([resize_labels(im.gt, size_hw) if im.gt is not None
                            else np.full(size_hw, schema.IGNORE_INDEX, np.uint8) for im in frame.images])
            store.write_rows("images/gt", i0, gts.astype(np.uint8))

    def finalize(self, store, map_tasks=cluster_map) -> None:
        """Commit the shards' pairs, in frame order, into ``pairs/*``.

        ``pairs/offsets`` comes from the parts' per-frame counts alone; then the zarr shards of the pairs arrays
        are cut into contiguous runs, two per task slot of ``map_tasks`` (the dask cluster's worker threads from
        the runner; in this process outside a dask task), and one task per run (:func:`commit_pairs_blocks`)
        writes each of its zarr shards of every pairs array whole, from the memory-mapped slices of the parts
        that overlap it: one writer per zarr shard, no lock. Finally the arrays are fsynced. Run again after a
        crash, it rewrites everything from the parts.
        """
        if "points" not in store.attrs.modalities:
            return  # a store without points has no pairs
        num_shards = len(store.raw_attrs["shards"])
        counts = [store.read_part(self.name, s, "counts")["counts"] for s in range(num_shards)]
        offsets = np.zeros(sum(len(c) for c in counts) + 1, dtype=np.int64)
        np.cumsum(np.concatenate(counts), out=offsets[1:])
        total = int(offsets[-1])
        store.set_dims(K=total)
        store.create_array("pairs/offsets", overwrite=True)[:] = offsets
        arrays = [store.create_array(name, overwrite=True) for name in PAIR_ARRAYS]
        blocks = {(a.shards or a.chunks)[0] for a in arrays}
        if len(blocks) != 1:
            raise ValueError(f"the pairs arrays have different zarr shard lengths {sorted(blocks)}")
        block = blocks.pop()
        part_start = np.concatenate([[0], np.cumsum([int(c.sum()) for c in counts])]).tolist()
        zarr_shards = -(-total // block)
        tasks = min(zarr_shards, 2 * map_tasks.slots())
        edges = [round(i * zarr_shards / tasks) * block for i in range(tasks)] + [total]
        jobs = [(str(store.path), a, min(b, total), block, part_start) for a, b in zip(edges, edges[1:]) if a < b]
        map_tasks(commit_pairs_blocks, jobs)
        store.sync(("pairs/offsets",) + PAIR_ARRAYS)  # durable before the runner deletes the parts


def commit_pairs_blocks(job) -> int:
    """Write rows ``start:stop`` of every pairs array, one zarr shard (``block`` rows) at a time, from the parts.

    ``job`` = ``(store_dir, start, stop, block, part_start)``: ``start`` is a multiple of ``block``; work shard
    ``s`` owns the committed rows ``part_start[s]:part_start[s+1]``. The store is opened once; each part is
    memory-mapped, so only the rows a zarr shard takes from it are read; one buffer per array holds a zarr
    shard while it is written. Returns the number of rows written.
    """
    import zarr

    from data_cache.store import Store
    store_dir, start, stop, block, part_start = job
    store = Store(store_dir, mode="a")
    with zarr.config.set({"array.write_empty_chunks": True}):  # no pairs chunk is all fill: skip zarr's check
        arrays = {k: store.array(k) for k in PAIR_ARRAYS}
    buffers = {k: np.empty((min(block, stop - start),) + a.shape[1:], a.dtype) for k, a in arrays.items()}
    parts: dict = {}
    s = int(np.searchsorted(part_start, start, side="right")) - 1
    for a in range(start, stop, block):
        b = min(a + block, stop)
        filled = a
        while filled < b:
            while part_start[s + 1] <= filled:  # parts with no pairs own no rows
                s += 1
            if s not in parts:
                parts = {s: store.map_part(CorrespondStage.name, s, *(k.replace("/", "__") for k in PAIR_ARRAYS))}
            n = min(b, part_start[s + 1]) - filled
            for k in PAIR_ARRAYS:
                piece = parts[s][k.replace("/", "__")][filled - part_start[s]:filled - part_start[s] + n]
                if len(piece) != n:
                    raise ValueError(f"part {s} of {store_dir} holds {len(piece) + filled - part_start[s]} pairs "
                                     f"in {k}, its counts say {part_start[s + 1] - part_start[s]}")
                buffers[k][filled - a:filled - a + n] = piece
            filled += n
        for k, arr in arrays.items():
            arr[a:b] = buffers[k][:b - a]
    return stop - start
