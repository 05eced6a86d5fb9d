"""The CNS cache: one Zarr v3 store per (dataset, split), described by :mod:`data_cache.schema` (SCHEMA.md).

Public names: :class:`Store` (open / read a store), :func:`open_store`, :func:`validate_store`, the errors
(:class:`UserError`, the root of every user error, and :class:`CacheError`), and :data:`SCHEMA_VERSION`.
"""
from .exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "Store": "data_cache.store", "open_store": "data_cache.store", "CacheError": "data_cache.store",
    "validate_store": "data_cache.validate", "UserError": "data_cache.errors", "SCHEMA_VERSION": "data_cache.schema",
})
