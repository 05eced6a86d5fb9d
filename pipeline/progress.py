"""What a label run shows while it runs: one tqdm bar per stage, counting that stage's frames, and its one-off steps.

Each stage's bar is named after the stage and counts the frames of the shards this run has to do (``correspond
3/6 frames``), advancing per frame as a worker finishes it (workers send ``cns-progress`` events through the dask
scheduler; in this process the stage calls back directly), so a long shard does not freeze the bar. The bar's
postfix names the step running now: ``prepare (text embeddings, projection fit)``, ``finalize (pairs commit)``,
``waiting for job ...`` (shards leased by another job), ``done``.
"""
from __future__ import annotations

import threading

TOPIC = "cns-progress"

#: the one-off step of each stage's ``prepare`` / ``finalize`` as the bar names it
PREPARE_STEP = {"maskclip": "prepare (text embeddings, projection fit)", "sam": "prepare (projection fit)",
                "correspond": "prepare",
                "refine": "prepare"}
FINALIZE_STEP = {"correspond": "finalize (pairs commit)"}

_LOCAL = threading.local()  # the in-process callback (``--workers 0``)


def set_local_callback(callback) -> None:
    _LOCAL.callback = callback


def frame_reporter(stage: str, shard: int):
    """A callable(n) a shard calls per finished frame: a dask event in a worker, the driver's callback in this
    process, or None when nobody listens."""
    try:
        from distributed import get_worker
        worker = get_worker()
    except (ImportError, ValueError):
        callback = getattr(_LOCAL, "callback", None)
        if callback is None:
            return None
        return lambda n=1: callback({"stage": stage, "shard": shard, "frames": n})
    return lambda n=1: worker.log_event(TOPIC, {"stage": stage, "shard": shard, "frames": n})


class StageBars:
    """One bar per stage (``totals``: stage -> frames to do); frames counted once per (stage, shard)."""

    def __init__(self, totals: dict[str, int], enabled: bool = True):
        self.bars = {}
        self._seen: dict[tuple, int] = {}
        self._lock = threading.Lock()
        if not enabled:
            return
        from tqdm.auto import tqdm
        width = max((len(s) for s in totals), default=0)
        for position, (stage, total) in enumerate(totals.items()):
            self.bars[stage] = tqdm(total=total, unit="frame", desc=stage.ljust(width), position=position,
                                    dynamic_ncols=True, leave=True)

    def step(self, stage: str, text: str) -> None:
        if stage in self.bars:
            self.bars[stage].set_postfix_str(text)

    def frame_event(self, event) -> None:
        """A ``cns-progress`` event (``(time, msg)`` from dask, or the message itself)."""
        msg = event[1] if isinstance(event, tuple) else event
        with self._lock:
            key = (msg["stage"], msg["shard"])
            self._seen[key] = self._seen.get(key, 0) + int(msg["frames"])
            if msg["stage"] in self.bars:
                self.bars[msg["stage"]].update(int(msg["frames"]))

    def shard_finished(self, stage: str, shard: int, frames: int) -> None:
        """Top the bar up to the shard's ``frames`` (a stage may report fewer frame events than frames)."""
        with self._lock:
            rest = frames - self._seen.get((stage, shard), 0)
            self._seen[(stage, shard)] = frames
            if rest > 0 and stage in self.bars:
                self.bars[stage].update(rest)

    def write(self, line: str) -> None:
        if self.bars:
            from tqdm.auto import tqdm
            tqdm.write(line)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
