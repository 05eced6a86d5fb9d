"""The ``refine`` stage: SAM max-voting of the CLIP labels (paper Eq. 4).

Reads ``clip/label`` and ``sam/mask_id``, writes ``clip/label_refined`` [I, H, W] uint8: every pixel inside a
SAM mask takes the majority CLIP label of its mask (``ignore`` votes do not count, ties go to the lowest
class index, a mask without valid votes keeps its labels); pixels outside every mask keep their label. The
vote is :func:`pipeline.refine.sam_max_vote` — one ``bincount`` over (mask id x class) for a whole batch of
images, the same code the trainer uses.

Config keys: ``batch_size`` (images per vote; not part of the fingerprint).
"""
from __future__ import annotations

import time

import numpy as np

from data_cache.schema import IGNORE_INDEX, IMAGE_SHARD

from .base import STAGES, ShardContext, Stage, image_groups, run_group



@STAGES.register("refine")
class RefineStage(Stage):
    name = "refine"
    version = 1
    defaults = {"batch_size": 64}
    runtime_keys = ("batch_size",)
    arrays = ("clip/label_refined",)

    def prepare(self, store, adapter) -> None:
        store.ensure_arrays(self.arrays)

    def process_shard(self, ctx: ShardContext) -> dict:
        import torch

        from ..refine import sam_max_vote
        store = ctx.store
        num_classes = len(store.attrs.class_names)
        labels_arr, ids_arr = store.array("clip/label"), store.array("sam/mask_id")
        stats = {"images": 0, "changed_pixels": 0, "vote_s": 0.0, "read_s": 0.0, "write_s": 0.0}
        bs = max(1, int(self.config["batch_size"]))

        def work(a: int, b: int) -> None:
            t0 = time.perf_counter()
            with ctx.timed("read_s"):
                labels = torch.from_numpy(np.ascontiguousarray(labels_arr[a:b]))
                ids = torch.from_numpy(np.ascontiguousarray(ids_arr[a:b]))
            t1 = time.perf_counter()
            with ctx.timed("vote_s"):
                out = torch.cat([sam_max_vote(labels[i:i + bs], ids[i:i + bs], num_classes, IGNORE_INDEX)
                                 for i in range(0, len(labels), bs)])
            t2 = time.perf_counter()
            with ctx.timed("write_s"):
                store.write_rows("clip/label_refined", a, out.numpy())
            stats["images"] += b - a
            stats["changed_pixels"] += int((out != labels).sum())
            stats["read_s"] += t1 - t0
            stats["vote_s"] += t2 - t1
            stats["write_s"] += time.perf_counter() - t2

        for group in image_groups(ctx, max(bs, IMAGE_SHARD)):
            run_group(ctx, group, work)
        return stats
