"""``cns-cli inspect summary|frame|report`` (registered in ``cli.py`` with ``main.add_command``).

Bad inputs (not a store, another schema version, an unknown frame or image, a directory that is not a
training run) end with one line on stderr and exit code 2, before anything is written.
"""
from __future__ import annotations

import json

import click

from . import InspectError


class InputError(click.ClickException):
    """One line (``Error: ...``) and exit code 2."""

    exit_code = 2


def _guard(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except InspectError as e:
        raise InputError(str(e)) from None


def _view(path):
    from .frames import StoreView
    return _guard(StoreView, path)


@click.group("inspect")
def inspect_group():
    """Statistics, pictures and an HTML report of a cache store (and of a training run on it)."""


@inspect_group.command("summary")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="print the statistics as JSON")
@click.option("--max-frames", type=click.IntRange(min=1), default=None,
              help="statistics over at most N frames spread evenly (default: every frame)")
def summary_cmd(store, as_json, max_frames):
    """Counts, stage progress, pair coverage, SAM statistics, class histograms and pseudo-label mIoU."""
    from .summary import format_summary, summarize
    result = summarize(_view(store), max_frames=max_frames)
    if as_json:
        click.echo(json.dumps({k: v for k, v in result.items()}, indent=1))
    else:
        click.echo(format_summary(result))
