"""``cns-cli``: the command-line entry point (thin: parsing here, work in pipeline/, train/, data_cache/)."""
from __future__ import annotations

import logging
import sys

import click

from data_cache.errors import CnsGroup
from pipeline.options import parse_key_values


def _print_versions(ctx, _param, value) -> None:
    if not value or ctx.resilient_parsing:
        return
    from pipeline.environment import version_lines
    click.echo("\n".join(version_lines()))
    ctx.exit()


@click.group(cls=CnsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_versions,
              help="Versions of the project, torch (CUDA build), spconv, open_clip, SAM, zarr, dask; GPU seen.")
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def main(verbose: bool) -> None:
    """Label-free scene understanding with vision foundation models (CNS).

    \b
    cns-cli labels     precompute CLIP/SAM pseudo-labels and correspondences into a Zarr cache
    cns-cli cache      status / validate a cache store
    cns-cli train      co-train the 2D and 3D networks from cache stores
    cns-cli eval       mIoU tables of a run and the baselines
    cns-cli predict    label new data with a trained run (per-point .npy/.ply, per-image PNGs)
    cns-cli inspect    statistics, pictures and an HTML report of a store (and a run)
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


@main.command()
@click.option("--dataset", required=True, help="nuscenes | nuimages | scannet | synthetic | folder")
@click.option("--data-root", type=click.Path(), default=None, help="Dataset root (not needed for synthetic).")
@click.option("--split", default=None, help="Split (nuScenes: train/val/test/mini_train/...; 'all').")
@click.option("--cache", "cache", default="data_cache/stores", show_default=True, help="Directory of stores: writes CACHE/<dataset>-<split>.zarr.")
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
@click.option("--sam-model", default=None,
              help="vit_h | vit_l | vit_b (SAM); sam2.1_hiera_tiny | sam2.1_hiera_small | sam2.1_hiera_base_plus | "
                   "sam2.1_hiera_large (SAM 2.1, pip install -e '.[sam2]'); hq_vit_b | hq_vit_l | hq_vit_h (HQ-SAM, "
                   "pip install -e '.[hq]'). Default vit_h.")
@click.option("--sam-points-per-side", type=int, default=None, help="SAM point grid per side (default 32).")
@click.option("--stage-option", "stage_options", multiple=True, metavar="STAGE.KEY=VALUE",
              help="Any other stage option, e.g. sam.pred_iou_thresh=0.8.")
@click.option("--test-tiny-models", is_flag=True,
              help="TEST/BENCH ONLY: tiny random-initialised CLIP and SAM instead of real weights.")
@click.option("--simulate", "simulate", default=None, metavar="CONFIG",
              help="BENCHMARK ONLY: simulated CLIP and SAM made from the ground truth with the knobs of CONFIG "
                   "(a YAML file, or a shipped name, e.g. default); the store is marked simulated.")
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
    for item, value in parse_key_values(stage_options, "--stage-option").items():
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
    if simulate:
        from pipeline.simulate import simulated_stage_options
        per_stage.update(simulated_stage_options(simulate))
        click.secho(f"SIMULATED foundation models ({simulate}): maskclip and sam write labels made from the ground "
                    f"truth by a controlled corruption, not by CLIP/SAM; the store is marked simulated",
                    fg="yellow", err=True)
    summary = run_labels(dataset, cache, stages, data_root=data_root, split=split,
                         dataset_options=parse_key_values(dataset_options), stage_options=per_stage,
                         workers=workers, threads_per_worker=threads_per_worker, scheduler=scheduler,
                         shard_size=shard_size, overwrite=overwrite, device=device, progress=not no_progress,
                         lease_timeout=lease_timeout)
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
    """Done/total shards per stage (and the chunk files the done shards imply that are missing)."""
    from data_cache.validate import format_status
    click.echo(format_status(store))


@cache.command("validate")
@click.argument("store", type=click.Path(exists=True))
@click.option("--no-checkpoint-hash", is_flag=True, help="Do not re-hash checkpoints found at recorded paths.")
@click.option("--deep", is_flag=True, help="Also read and decode every chunk (checksums catch changed bytes).")
def cache_validate(store, no_checkpoint_hash, deep):
    """Check chunk files, shapes, offsets, value ranges and fingerprints; name every missing or damaged chunk
    and the first bad frame. Exit 0: valid; 1: the store fails a check; 2: not a readable store."""
    from data_cache.validate import validate_store
    report = validate_store(store, check_checkpoints=not no_checkpoint_hash, deep=deep)
    if report.simulated:
        click.secho(report.simulated, fg="yellow")
    if report.ok:
        click.echo(f"OK: {report.path} ({len(report.checked)} arrays checked{', every chunk decoded' if deep else ''})")
        return
    for err in report.errors:
        click.secho(f"ERROR: {err}", fg="red", err=True)
    sys.exit(1)


from train.commands import eval as eval_command, train as train_command  # noqa: E402  (verbs defined with the trainer)

from inspection.commands import inspect_group  # noqa: E402
from train.predict import predict as predict_command  # noqa: E402  (the verb's body lives in train/predict.py)

main.add_command(train_command)
main.add_command(eval_command)
main.add_command(inspect_group)
main.add_command(predict_command)

if __name__ == "__main__":
    main()
