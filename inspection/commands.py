"""``cns-cli inspect summary|frame|report`` (registered in ``cli.py`` with ``main.add_command``).

Bad inputs (not a store, another schema version, an unknown frame or image, a directory that is not a
training run, a store with a missing chunk file) are :class:`InspectError`/``CacheError`` (user errors):
``cli.py`` prints one line and exits 2, before anything is written. A chunk that fails to decode while a
command reads is one line naming the array, the chunk and the frames
(:func:`data_cache.integrity.read_guard`).
"""
from __future__ import annotations

import json
from contextlib import contextmanager

import click

from . import InspectError


def _view(path):
    from .frames import StoreView
    return StoreView(path)


@contextmanager
def _reading(view):
    """Around a command's reads of the store: a damaged chunk becomes one line naming it."""
    from data_cache.integrity import read_guard
    with read_guard(view.store):
        yield


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
    view = _view(store)
    with _reading(view):
        result = summarize(view, max_frames=max_frames)
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        click.echo(format_summary(result))


def _run_view(path):
    from .run import RunView
    return None if path is None else RunView(path)


@inspect_group.command("frame")
@click.argument("store")
@click.argument("frame")
@click.option("--image", "image", default=None, help="one image of the frame: index within the frame or name "
                                                     "(e.g. CAM_FRONT); default: every image")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="directory for the PNGs")
@click.option("--run", "run_dir", default=None, help="a training run: add its 2D/3D predictions")
@click.option("--scale", type=click.IntRange(1, 8), default=2, show_default=True,
              help="picture pixels per training pixel")
@click.option("--device", default="cpu", show_default=True, help="device for the run's networks")
def frame_cmd(store, frame, image, out_dir, run_dir, scale, device):
    """PNGs of one frame (TOKEN or INDEX): labels, SAM masks, projected points, bird's-eye view, legend."""
    from .pictures import write_frame
    view = _view(store)
    index = view.resolve_frame(frame)
    if not view.done_frames("correspond")[index]:
        raise InspectError(f"frame {index} ({view.tokens[index]}) has no data yet: its correspond shard is not done")
    images = [view.resolve_image(index, image)] if image is not None else list(range(view.num_images(index)))
    run = _run_view(run_dir)
    predictor = run.predictor(view, device) if run is not None else None
    with _reading(view):
        written, notes = write_frame(view, index, images, out_dir, scale, predictor)
    click.echo(f"frame {index} ({view.tokens[index]}): {len(written)} files in {out_dir}")
    for note in notes:
        click.echo(f"  note: {note}")


@inspect_group.command("report")
@click.argument("store")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="directory for report.html")
@click.option("--frames", "num_frames", type=click.IntRange(min=0), default=4, show_default=True,
              help="frames in the gallery (spread evenly over the ingested frames)")
@click.option("--images-per-frame", type=click.IntRange(min=1), default=1, show_default=True,
              help="images shown per gallery frame")
@click.option("--run", "run_dir", default=None, help="a training run: its evaluation, curves and predictions")
@click.option("--max-frames", type=click.IntRange(min=1), default=None,
              help="summary statistics over at most N frames spread evenly (default: every frame)")
@click.option("--max-points", type=click.IntRange(min=100), default=20000, show_default=True,
              help="points per interactive 3D view (a random subset)")
@click.option("--device", default="cpu", show_default=True, help="device for the run's networks")
def report_cmd(store, out_dir, num_frames, images_per_frame, run_dir, max_frames, max_points, device):
    """One self-contained HTML page (open it from disk, offline): tables, charts, a gallery, 3D views."""
    from .report import build_report
    view = _view(store)
    run = _run_view(run_dir)
    predictor = None
    if run is not None and run.checkpoint.exists():
        predictor = run.predictor(view, device)
    elif run is not None:
        click.echo(f"note: {run.checkpoint} does not exist yet: the report shows no predictions", err=True)
    with _reading(view):
        path = build_report(view, out_dir, num_frames, images_per_frame, run, predictor, max_frames, max_points)
    click.echo(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB)")
