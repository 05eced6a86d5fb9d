"""Inspect a CNS cache store: statistics, pictures and a static HTML report (``cns-cli inspect``).

========== ==========================================================================================
frames     read-only access to a store through :mod:`data_cache` (only the shards marked done)
summary    statistics of a store as plain dicts (counts, pairs, SAM, class histograms, mIoU against GT)
palettes   the class colours people know (nuScenes-lidarseg from the devkit, ScanNet's benchmark palette)
render     pictures of a frame (label maps, SAM boundaries, projected points, bird's-eye view, charts)
run        a training run: its metrics, evaluation tables and its networks' predictions on a frame
report     one self-contained HTML page with all of the above
commands   the click commands (registered in ``cli.py``)
========== ==========================================================================================

Public names: :class:`StoreView` (a store's frames and their arrays), :class:`RunView` (a run's metrics and,
through ``RunView(run).predictor(view).predict(frame)``, its networks' predictions), :func:`summarize`,
:func:`build_report` and :class:`InspectError`.
"""
from data_cache.errors import UserError
from data_cache.exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "StoreView": "inspection.frames", "RunView": "inspection.run", "summarize": "inspection.summary",
    "build_report": "inspection.report", "InspectError": "inspection",
})


class InspectError(UserError, ValueError):
    """A bad input (not a store, a newer schema, an unknown frame, ...): one line, nothing written."""
