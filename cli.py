"""``cns-cli``: the command-line entry point (thin: parsing here, work in pipeline/, train/, data_cache/)."""
from __future__ import annotations

import json
import logging
import sys

import click

from data_cache.errors import UserError


class UserFacingError(click.ClickException):
    """A :class:`UserError` as click prints it: ``Error: <one line>`` on stderr, exit code 2."""

    exit_code = UserError.exit_code


class CnsGroup(click.Group):
    """The one place where a user's error becomes one line and exit code 2 for every verb (and sub-verb);
    any other exception is a programming error and keeps its traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            raise UserFacingError(str(e)) from None


def _parse_options(pairs) -> dict:
    out = {}
    for item in pairs:
        if "=" not in item:
            raise click.BadParameter(f"'{item}' is not key=value", param_hint="--dataset-option")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@click.group(cls=CnsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def main(verbose: bool) -> None:
    """Label-free scene understanding with vision foundation models (CNS).

    \b
    cns-cli labels     precompute CLIP/SAM pseudo-labels and correspondences into a Zarr cache
    cns-cli cache      status / validate a cache store
    cns-cli train      co-train the 2D and 3D networks from cache stores
    cns-cli eval       mIoU tables of a run and the baselines
    cns-cli inspect    statistics, pictures and an HTML report of a store (and a run)
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


@main.command()
@click.option("--dataset", required=True, help="nuscenes | nuimages | scannet | synthetic")
@click.option("--data-root", type=click.Path(), default=None, help="Dataset root (not needed for synthetic).")
@click.option("--split", default=None, help="Split (nuScenes: train/val/test/mini_train/...; 'all').")
@click.option("--cache", "cache", default="data_cache/stores", show_default=True, help="Directory of the stores.")
@click.option("--stages", default="correspond,maskclip,sam,refine", show_default=True,
              help="Comma list of correspond,maskclip,sam,refine.")
@click.option("--workers", type=int, default=1, show_default=True,
              help="dask LocalCluster worker processes (0 = run in this process).")
@click.option("--threads-per-worker", type=int, default=None, help="Threads per worker (torch threads match).")
@click.option("--scheduler", default=None, help="Address of an existing dask scheduler (tcp://host:port).")
@click.option("--shard-size", type=int, default=None, help="Frames per work shard.")
@click.option("--overwrite", is_flag=True, help="Redo the given stages (and those depending on them).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
@click.option("--dataset-option", "dataset_options", multiple=True, metavar="KEY=VALUE",
              help="Adapter option, e.g. kind=indoor num_scenes=8 (synthetic) or version=v1.0-mini.")
@click.option("--clip-checkpoint", type=click.Path(), default=None, help="CLIP weights (OpenAI or open_clip).")
@click.option("--clip-pretrained", default=None, help="open_clip pretrained tag, e.g. openai (downloads).")
@click.option("--clip-model", default=None, help="open_clip architecture (default ViT-B-16).")
@click.option("--sam-checkpoint", type=click.Path(), default=None, help="SAM weights (.pth).")
@click.option("--sam-model", default=None, help="vit_h | vit_l | vit_b")
@click.option("--sam-points-per-side", type=int, default=None, help="SAM point grid per side (default 32).")
@click.option("--stage-option", "stage_options", multiple=True, metavar="STAGE.KEY=VALUE",
              help="Any other stage option, e.g. sam.pred_iou_thresh=0.8.")
@click.option("--test-tiny-models", is_flag=True,
              help="TEST/BENCH ONLY: tiny random-initialised CLIP and SAM instead of real weights.")
@click.option("--simulate", "simulate", default=None, metavar="CONFIG",
              help="BENCHMARK ONLY: simulated CLIP and SAM made from the ground truth with the knobs of CONFIG "
                   "(a YAML file, or a name in configs/simulate, e.g. default); the store is marked simulated.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--lease-timeout", type=float, default=180.0, show_default=True,
              help="Seconds without a heartbeat after which another job's shard lease is stale and taken over.")
def labels(dataset, data_root, split, cache, stages, workers, threads_per_worker, scheduler, shard_size, overwrite,
           device, dataset_options, clip_checkpoint, clip_pretrained, clip_model, sam_checkpoint, sam_model,
           sam_points_per_side, stage_options, test_tiny_models, simulate, no_progress, lease_timeout):
    """Run the label stages into CACHE/<dataset>-<split>.zarr (resumable)."""
    from pipeline.runner import run_labels
    per_stage = {"maskclip": {}, "sam": {}}
    for key, value in (("checkpoint", clip_checkpoint), ("pretrained", clip_pretrained), ("model", clip_model)):
        if value is not None:
            per_stage["maskclip"][key] = value
    for key, value in (("checkpoint", sam_checkpoint), ("model_type", sam_model),
                       ("points_per_side", sam_points_per_side)):
        if value is not None:
            per_stage["sam"][key] = value
    for item, value in _parse_options(stage_options).items():
        stage, _, key = item.partition(".")
        if not key:
            raise click.BadParameter(f"'{item}' must be STAGE.KEY", param_hint="--stage-option")
        per_stage.setdefault(stage, {})[key] = value
    if simulate and (test_tiny_models or per_stage["maskclip"] or per_stage["sam"]):
        raise click.UsageError("--simulate replaces CLIP and SAM: it cannot be combined with --test-tiny-models, "
                               "the --clip-*/--sam-* options or --stage-option maskclip.*/sam.*")
    if test_tiny_models:
        click.secho("WARNING: --test-tiny-models: random-initialised tiny CLIP/SAM; the labels are meaningless",
                    fg="yellow", err=True)
        per_stage["maskclip"]["tiny"] = True
        per_stage["sam"]["tiny"] = True
    try:
        if simulate:
            from pipeline.simulate import simulated_stage_options
            per_stage.update(simulated_stage_options(simulate))
            click.secho(f"SIMULATED foundation models ({simulate}): maskclip and sam write labels made from the ground "
                        f"truth by a controlled corruption, not by CLIP/SAM; the store is marked simulated",
                        fg="yellow", err=True)
        summary = run_labels(dataset, cache, stages, data_root=data_root, split=split,
                             dataset_options=_parse_options(dataset_options), stage_options=per_stage,
                             workers=workers, threads_per_worker=threads_per_worker, scheduler=scheduler,
                             shard_size=shard_size, overwrite=overwrite, device=device, progress=not no_progress,
                             lease_timeout=lease_timeout)
    except (RuntimeError, KeyError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e.args[0] if isinstance(e, KeyError) and e.args else e)) from None
    click.echo(f"\nstore: {summary.store}")
    click.echo(summary.table())
    for event in summary.worker_events:
        click.secho(f"dask worker {event['worker']} {event['what']}: {event['cause']}", fg="yellow", err=True)
    failed = summary.failed_frames
    if failed:
        click.secho(f"\n{len(failed)} frame(s) failed; their shards are not marked done (rerun to retry):",
                    fg="red", err=True)
        for f in failed:
            click.echo(f"  [{f['stage']}] frame {f['frame']} ({f['token']}): {f['error']}"
                       + (f"  file: {f['file']}" if f.get("file") and f["file"] not in f["error"] else ""), err=True)
        sys.exit(1)


@main.group()
def cache():
    """Inspect the state of a cache store."""


@cache.command("status")
@click.argument("store", type=click.Path(exists=True))
def cache_status(store):
    """Done/total shards per stage."""
    from data_cache.store import CacheError, Store
    from data_cache.validate import simulated_note, stage_status
    try:
        st = Store(store)
    except CacheError as e:
        raise click.ClickException(str(e)) from None
    attrs = st.attrs
    click.echo(f"{st.path}: {attrs.dataset}/{attrs.split}, {attrs.num_frames} frames, {len(attrs.class_names)} "
               f"classes, images {attrs.image_size[0]}x{attrs.image_size[1]}")
    note = simulated_note(st)
    if note:
        click.secho(note, fg="yellow")
    for row in stage_status(st):
        state = "complete" if row["complete"] else ("partial" if row["done"] else "not run")
        extra = f", {row['failed_frames']} failed frame(s)" if row["failed_frames"] else ""
        if row["simulated"]:
            extra += f"  [simulated: {row['simulated']['simulator']} v{row['simulated']['version']}]"
        elif row["from_simulated"]:
            extra += f"  [on simulated {', '.join(row['from_simulated'])}]"
        click.echo(f"  {row['stage']:<11} {row['done']}/{row['total']} shards  {state}{extra}")


@cache.command("validate")
@click.argument("store", type=click.Path(exists=True))
@click.option("--no-checkpoint-hash", is_flag=True, help="Do not re-hash checkpoints found at recorded paths.")
def cache_validate(store, no_checkpoint_hash):
    """Check shapes, offsets, value ranges and fingerprints; name the first bad frame."""
    from data_cache.validate import validate_store
    report = validate_store(store, check_checkpoints=not no_checkpoint_hash)
    if report.simulated:
        click.secho(report.simulated, fg="yellow")
    if report.ok:
        click.echo(f"OK: {report.path} ({len(report.checked)} arrays checked)")
        return
    for err in report.errors:
        click.secho(f"ERROR: {err}", fg="red", err=True)
    sys.exit(1)


from train.commands import eval as eval_command, train as train_command  # noqa: E402  (verbs defined with the trainer)

from inspection.commands import inspect_group  # noqa: E402

main.add_command(train_command)
main.add_command(eval_command)
main.add_command(inspect_group)

if __name__ == "__main__":
    main()
