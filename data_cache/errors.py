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
    LabelRunError(UserError, RuntimeError)     pipeline.runner       a label run that cannot go on as asked
    OptionError(UserError, ValueError)         here                  a bad stage, model or generator option value
    UnknownNameError(UserError, KeyError)      here                  an unknown registry entry, checkpoint, model
    UnknownOptionError(OptionError, TypeError) here                  an option name a stage or model does not take
"""
from __future__ import annotations

from contextlib import contextmanager

import click

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error the user can fix; its message is one line naming the file/array/frame/field at fault."""

    exit_code = EXIT_USER_ERROR


class OptionError(UserError, ValueError):
    """A bad option value (a stage, model or generator option given on the command line or in a config)."""


class UnknownNameError(UserError, KeyError):
    """An unknown name (a registry entry, a checkpoint, an architecture); prints as its message, not as
    ``KeyError``'s quoted repr."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def one_line(error: BaseException) -> str:
    """The error's message as one line. A :class:`UserError` raised in a torch DataLoader worker comes back
    re-raised with the worker's traceback in its message (``Caught X in DataLoader worker ...``): the line
    is the original message at the end of that traceback."""
    message = str(error)
    marker = f"{type(error).__name__}: "
    if "\nOriginal Traceback" in message and marker in message:
        message = message.rsplit(marker, 1)[1]
    return message.strip().splitlines()[0] if message.strip() else type(error).__name__


class UnknownOptionError(OptionError, TypeError):
    """An option name the stage or model does not take (a ``TypeError`` too, like an unknown keyword argument)."""


class UserFacingError(click.ClickException):
    """A :class:`UserError` as click prints it: ``Error: <one line>`` on stderr, exit code 2."""

    exit_code = EXIT_USER_ERROR


@contextmanager
def user_errors_as_one_line():
    """The one conversion: a :class:`UserError` raised inside becomes :class:`UserFacingError`; any other
    exception is a programming error and propagates with its traceback."""
    try:
        yield
    except UserError as e:
        raise UserFacingError(one_line(e)) from None


class CnsGroup(click.Group):
    """``cns-cli``'s group: every verb and sub-verb it invokes turns a user error into one line, exit code 2."""

    def invoke(self, ctx):
        with user_errors_as_one_line():
            return super().invoke(ctx)


class CnsCommand(click.Command):
    """A verb that does the same when invoked on its own (``torchrun -m train.commands train``, a test that
    invokes the command object itself)."""

    def invoke(self, ctx):
        with user_errors_as_one_line():
            return super().invoke(ctx)
