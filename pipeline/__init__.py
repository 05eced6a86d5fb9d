"""The offline label stages (paper section 3.1): dataset adapters, the stages, the runner that writes stores.

Public names: :func:`run_labels` (what ``cns-cli labels`` runs), the registries :data:`DATASETS` and
:data:`STAGES` with :func:`build_adapter` and :func:`build_stage`, and :class:`Registry` for a new kind.
"""
from data_cache.exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "run_labels": "pipeline.runner", "DATASETS": "pipeline.datasets", "build_adapter": "pipeline.datasets",
    "STAGES": "pipeline.stages", "build_stage": "pipeline.stages", "Registry": "pipeline.registry",
})
