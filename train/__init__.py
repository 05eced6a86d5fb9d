"""The CNS co-trainer (paper section 3.2): data from cache stores, 2D/3D networks, Eq. 5-7, evaluation.

Training never imports open_clip or segment-anything: text embeddings come from ``clip/text_embed`` and
SAM features from ``sam/feat``. ``train.commands`` holds the ``cns-cli train`` / ``cns-cli eval`` commands.

Public names: :func:`load_config` / :func:`available_configs` (the shipped YAML files in ``train/configs``),
:class:`Trainer`, :func:`load_trained_model`, :func:`evaluate` with :func:`format_tables`, :class:`ConfigError`.
"""
from data_cache.exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "load_config": "train.config", "available_configs": "train.config", "ConfigError": "train.config",
    "Trainer": "train.engine", "load_trained_model": "train.models", "evaluate": "train.evaluate",
    "format_tables": "train.evaluate",
})
