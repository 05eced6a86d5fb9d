"""The root of every error that is the user's to fix.

``UserError`` covers bad input (a dataset file, an option), a bad or incompatible store, a bad training
configuration and missing or wrong weights. ``cns-cli`` catches it in one place (``cli.py``) and prints its
message as one line with exit code 2; any other exception is a programming error and keeps its traceback.

The project's error classes derive from it and keep their historical built-in base (``RuntimeError`` or
``ValueError``) so that existing ``except`` clauses still hold::

    CacheError(UserError, RuntimeError)        data_cache.store      a store is missing, malformed, incompatible
    DatasetError(UserError, RuntimeError)      pipeline.datasets     bad input: names the frame and the file
    WeightsError(UserError, RuntimeError)      pipeline.models       no usable weights / wrong checkpoint
    ConfigError(UserError, ValueError)         train.config          a bad training configuration key or value
    SimulationConfigError(UserError, ValueError) pipeline.simulate   a bad simulator configuration
    InspectError(UserError, ValueError)        inspection            a bad inspect input
    TeacherError(UserError, ValueError)        pipeline.models.dense a bad 2D teacher choice or option
"""
from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error the user can fix; its message is one line naming the file/array/frame/field at fault."""

    exit_code = EXIT_USER_ERROR
