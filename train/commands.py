"""``cns-cli train`` and ``cns-cli eval`` (registered in ``cli.py`` with ``main.add_command``).

Both resolve and check the configuration (keys, value types, the ablation) before importing torch or opening
a store, so a typo costs a fraction of a second and writes nothing to ``--out``. Their user errors are
:class:`data_cache.errors.UserError` subclasses, printed as one line with exit code 2 by ``cli.py``.

Also runnable without the top-level CLI, e.g. under torchrun:
``torchrun --nproc_per_node 2 -m train.commands train --cache STORE --config nuscenes --out RUN``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from data_cache.errors import CnsCommand, CnsGroup

from .config import ConfigError, available_configs, dump_config, load_config, parse_overrides, store_like


def _require_complete_chunks(paths) -> None:
    """Refuse, before torch loads, a store whose done work lost a chunk file (a directory listing per store)."""
    from data_cache.integrity import require_complete_chunks
    from data_cache.store import Store
    for path in paths:
        require_complete_chunks(Store(path))


@click.command("train", cls=CnsCommand, context_settings={"show_default": True})
@click.option("--cache", "caches", multiple=True, required=True, type=click.Path(exists=True, file_okay=False),
              help="one cache store, CACHE/<dataset>-<split>.zarr (repeat for several)")
@click.option("--config", "config_file", default=None,
              help=f"YAML file or name in train/configs ({', '.join(available_configs())})")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="run directory")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint")
@click.option("--init-from", "init_from", default=None, type=click.Path(exists=True, dir_okay=False),
              help="start this new run from another run's checkpoint (weights, optimizer, epoch) with its own "
                   "configuration, e.g. a shared stage-1 run for several stage-2 ablations")
@click.option("--seed", type=int, default=None, help="seed (a CPU run with one seed is repeatable)")
@click.option("--eval-cache", "eval_caches", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="store(s) evaluated during training (default: the val store beside each training store, "
                   "<dataset>-val.zarr, when it exists; else the training stores)")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available)")
@click.option("--no-pretrained-2d", is_flag=True, help="train the 2D backbone from scratch")
@click.option("--stop-after-epochs", type=int, default=None, hidden=True,
              help="stop after this many epochs of the schedule (the schedule length is unchanged)")
@click.argument("overrides", nargs=-1)
def train(caches, config_file, out, resume, init_from, seed, eval_caches, device, no_pretrained_2d,
          stop_after_epochs, overrides):
    """Co-train the 2D and 3D networks on cached pseudo-labels (paper section 3.2).

    OVERRIDES are key=value pairs, e.g. schedule.epochs=10 ablation=no_cross_training
    """
    ov = parse_overrides(overrides)
    if seed is not None:
        ov["seed"] = seed
    if no_pretrained_2d:
        ov["model.pretrained_2d"] = False
    run_cfg = Path(out) / "config.yaml"
    if resume and config_file is None and run_cfg.exists():
        config_file = str(run_cfg)
    cfg = load_config(config_file, ov, like=store_like(caches))  # before torch: a bad key or value is refused at once
    if init_from and resume:
        raise ConfigError("--init-from starts a new run; --resume continues one (its config.yaml already "
                          "records the parent)")
    _require_complete_chunks(caches + eval_caches)
    from .engine import Trainer, cleanup_distributed
    trainer = Trainer(cfg, list(caches), out, eval_paths=list(eval_caches) or None, device=device,
                      resume=resume, init_from=init_from)
    last = trainer.ckpt_dir / "last.pth"
    if trainer.rank == 0:
        note = "" if trainer.eval_held_out else " -- the training stores themselves: no val store found"
        click.echo(f"evaluating on {trainer.eval_label}{note}", err=True)
        if resume:
            click.echo(f"resuming {out} at epoch {trainer.start_epoch + 1} of {cfg['schedule']['epochs']}"
                       + (f" (from {last})" if trainer.start_epoch else " (no checkpoint yet: from the start)"),
                       err=True)
    try:
        results = trainer.train(stop_after_epochs=stop_after_epochs)
        if trainer.rank == 0:
            if results:
                from .evaluate import format_tables
                click.echo(format_tables(results[-1]))
            click.echo(f"run directory: {out}  checkpoint: {last}")
    finally:
        cleanup_distributed()


@click.command("eval", cls=CnsCommand, context_settings={"show_default": True})
@click.option("--cache", "caches", multiple=True, required=True, type=click.Path(exists=True, file_okay=False),
              help="one cache store to evaluate on, CACHE/<dataset>-<split>.zarr (repeat for several)")
@click.option("--run", "run_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="a training run (its config.yaml and checkpoints/last.pth); without it: baselines only")
@click.option("--checkpoint", default=None, type=click.Path(exists=True, dir_okay=False),
              help="a checkpoint other than RUN/checkpoints/last.pth")
@click.option("--config", "config_file", default=None, help="configuration when evaluating without --run")
@click.option("--classes", default=None,
              help="comma-separated class names: open-vocabulary evaluation, re-embedded with CLIP's text tower")
@click.option("--clip-model", default=None,
              help="open_clip model for --classes (default: the one the store's labels were made with)")
@click.option("--clip-pretrained", default=None, help="open_clip weights tag for --classes (default: the store's)")
@click.option("--clip-checkpoint", default=None,
              help="local CLIP checkpoint for --classes (default: the registry's file in checkpoints/)")
@click.option("--post-refine/--no-post-refine", default=None,
              help="SAM max-voting of the predictions (default: the run's eval.post_refine)")
@click.option("--export", "export_dir", default=None, type=click.Path(file_okay=False),
              help="write per-point .bin and per-image PNG predictions here")
@click.option("--out", "out_json", default=None, type=click.Path(dir_okay=False),
              help="metrics JSON (default RUN/eval/metrics.json)")
@click.option("--device", default=None)
@click.argument("overrides", nargs=-1)
def eval_cmd(caches, run_dir, checkpoint, config_file, classes, clip_model, clip_pretrained, clip_checkpoint,
             post_refine, export_dir, out_json, device, overrides):
    """mIoU of the trained networks and of the label-only baselines, with the paper's numbers for reference."""
    ov = parse_overrides(overrides)  # the configuration first: a bad key or value is refused before torch loads
    if run_dir is not None:
        state_path = Path(checkpoint or Path(run_dir) / "checkpoints" / "last.pth")
        cfg = load_config(Path(run_dir) / "config.yaml", ov)
    else:
        state_path = Path(checkpoint) if checkpoint else None
        cfg = load_config(config_file, ov, like=store_like(caches))
    if state_path is not None and not state_path.exists():
        raise ConfigError(f"no checkpoint at {state_path}")
    if classes and state_path is None:
        raise click.UsageError("--classes needs a trained run (--run or --checkpoint)")
    _require_complete_chunks(caches)
    import torch

    from data_cache.store import Store
    from .engine import check_stores
    from .evaluate import evaluate, format_tables, open_vocabulary_embeddings, store_text_tower, write_result
    from .models import load_trained_model
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = check_stores(list(caches), cfg, for_training=False)
    if classes and any(Store(c).simulated_stages() for c in caches):
        raise click.UsageError("--classes needs a store of real CLIP labels: this store's are simulated from the "
                               "ground truth (a benchmark store), there is no CLIP text space to embed in")
    model = None
    if state_path is not None:
        model, _ = load_trained_model(cfg, state_path, info, device)
    eval_classes, text_embed = None, None
    if classes:
        eval_classes = [c.strip() for c in classes.split(",") if c.strip()]
        tower = store_text_tower(caches[0])
        overrides_given = {k: v for k, v in (("model", clip_model), ("pretrained", clip_pretrained),
                                             ("checkpoint", clip_checkpoint)) if v is not None}
        clip_cfg = {"model": "ViT-B-16", **tower, **overrides_given}
        if overrides_given:
            clip_cfg["tiny"] = False  # a tower named on the command line is a real one
        if clip_cfg.get("tiny") and not overrides_given:
            click.secho("WARNING: the store's labels come from the tiny random test CLIP; so do these embeddings",
                        fg="yellow", err=True)
        text_embed = open_vocabulary_embeddings(eval_classes, clip_cfg, device)  # WeightsError: one line
    result = evaluate(model, list(caches), cfg, device, with_baselines=True, eval_classes=eval_classes,
                      text_embed=text_embed, export_dir=export_dir, post_refine=post_refine)
    click.echo(format_tables(result))
    target = Path(out_json) if out_json else (Path(run_dir) / "eval" / "metrics.json" if run_dir else None)
    if target is None and export_dir:
        target = Path(export_dir) / "metrics.json"
    if target is not None:
        write_result(result, target)
        dump_config(cfg, target.with_name("config.yaml"))  # the resolved config next to every output
        click.echo(f"metrics written to {target}")


eval = eval_cmd  # noqa: A001  (the lead registers ``train.commands.eval``)


@click.group(cls=CnsGroup)
def _main():
    """Standalone entry (torchrun -m train.commands ...)."""


_main.add_command(train)
_main.add_command(eval_cmd)

if __name__ == "__main__":
    sys.exit(_main())
