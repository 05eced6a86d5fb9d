"""The controlled-noise benchmark of CNS: the paper's Table 2 rows on simulated pseudo-labels (issue 10).

Synthetic street and indoor scenes have exact ground truth; the simulated foundation models
(pipeline/simulate, pipeline/simulate/configs/default.yaml) corrupt it into MaskCLIP-like labels and SAM-like masks
and features. The real refine stage, trainer and evaluation then run on those stores, with a train store
and a val store made of different scenes, and every row is scored on the val store.

* The first row is the **oracle**: the same networks and schedule trained on the ground truth. Its val mIoU
  must reach ``--oracle-gate`` (50 %) in 2D and in 3D on every dataset before any noisy row means anything;
  the benchmark stops, writes what it has and exits with status 1 when it misses (``--ignore-gate`` trains
  the other rows anyway and marks the table as not evidence).
* Rows that differ only in stage 2 share one stage-1 run (``--init-from``, the ``stage1-*`` directories):
  a stage-1 run is keyed by the resolved configuration without its stage-2 keys. Rows whose presets resolve
  to the same configuration are one run, trained once (indoor's 'Image numbers 8' is Ours: its rooms are
  8 images a step); the table says so.
* 'Baseline' and 'w/o CNS' train nothing: they are the raw and the SAM-refined simulated CLIP labels
  (3D: projected to the points; a point no camera sees counts as a miss). 'Post-Refine' is the full
  method's networks with SAM max-voting of their predictions.
* The quick run (``make bench-cns``) has the Baseline, w/o CNS, Base+CLIP, Ours, w/o CLIP and w/o Refine rows,
  one seed, street and indoor; ``--full`` (``make bench-cns FULL=1``) has every row of Table 2 plus Ours with
  ``labels.switch=frame``, over 3 seeds. Results: ``bench/results/cns_ablation_quick.{json,md}`` and
  ``bench/results/cns_ablation.{json,md}``; trained runs, stores and per-row results under ``--work``, where a
  rerun skips what is done (each row's ``result.json``) and resumes what is not.

    python bench/bench_cns.py [--full] [--device cpu|cuda] [--work runs/bench_cns] [--seeds N]

The CPU study regime (train/configs/bench_*_cpu.yaml) is a choice for 2 cores, not the paper's: small
from-scratch networks (unet_small, spunet_small), small images, AdamW, class-balanced cross-entropy, objects in
their class's colour (``class_colours``) and streets with the rare classes made more frequent (``rare_boost``);
docs/benchmark.md says why.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from perf import machine  # noqa: E402  (the machine block of bench/results/perf.json)

from data_cache.store import store_path  # noqa: E402  (where `cns-cli labels` writes a dataset's split)

#: The paper's Table 2 (ScanNet val, label-free 2D / 3D mIoU), printed next to the measured rows.
PAPER_TABLE2 = {
    "Baseline": (17.3, 14.2), "w/o CNS": (24.5, 19.4), "Base+CLIP": (20.4, 23.8), "Base+CLIP+LSC": (22.5, 28.7),
    "w/o Refine": (23.7, 30.6), "Post-Refine": (28.1, 33.2), "w/o CT": (27.7, 31.0), "w/o SCT": (24.7, 30.6),
    "w/o CLIP": (4.7, 5.1), "w 2D": (6.9, 8.8), "w 3D": (4.8, 6.4), "LSC: CLIP": (27.3, 32.4),
    "LSC: SAM+CLIP": (27.8, 32.5), "LSC: None": (27.1, 32.0), "Image numbers 8": (27.9, 33.0),
    "Image numbers 16": (28.4, 33.5), "Image numbers 32": (28.3, 33.3), "Ours": (28.4, 33.5),
}

#: Keys that act in stage 2 only (or at evaluation): runs equal in everything else share stage 1.
STAGE2_KEYS = (("labels", "stage2_sources"), ("labels", "cross_training"), ("labels", "switch"),
               ("labels", "switch_gate"), ("labels", "gate_confidence"), ("eval", "post_refine"))


@dataclass(frozen=True)
class Row:
    """One table row: ``ablation`` (a preset of train/config.py) to train, or ``baseline`` (the evaluation
    rows ``clip`` / ``wo_cns``) that trains nothing; ``post_refine``: the trained row's networks scored after
    SAM max-voting of their predictions."""
    name: str
    ablation: str | None = None
    baseline: str | None = None
    post_refine: bool = False
    quick: bool = False
    kinds: tuple = ("street", "indoor")
    full: bool = True  # one of --full's rows (False: a study's row, run only when --rows names it)


ROWS = (
    Row("Oracle (ground truth)", ablation="oracle", quick=True),
    Row("Baseline", baseline="clip", quick=True),
    Row("w/o CNS", baseline="wo_cns", quick=True),
    Row("Base+CLIP", ablation="base_clip", quick=True),
    Row("Base+CLIP+LSC", ablation="base_clip_lsc"),
    Row("w/o Refine", ablation="no_refine", quick=True),
    Row("Post-Refine", ablation="none", post_refine=True),
    Row("w/o CT", ablation="no_cross_training"),
    Row("w/o SCT", ablation="no_self_cross_training"),
    Row("w/o CLIP", ablation="no_clip_stage2", quick=True),
    Row("w 2D", ablation="pred2d_only"),
    Row("w 3D", ablation="pred3d_only"),
    Row("LSC: CLIP", ablation="latent_clip"),
    Row("LSC: SAM+CLIP", ablation="latent_sam_clip"),
    Row("LSC: None", ablation="latent_none"),
    Row("Image numbers 8", ablation="images_8", kinds=("indoor",)),
    Row("Image numbers 16", ablation="images_16", kinds=("indoor",)),
    Row("Image numbers 32", ablation="images_32", kinds=("indoor",)),
    Row("Ours", ablation="none", quick=True),
    Row("Ours, switch per frame", ablation="switch_frame"),
    # the rooms study (issue 26): Ours with a point's first pair as its 3D target, against Ours with every pair
    Row("Ours, first pair", ablation="first_pair", kinds=("indoor",), full=False),
    # stage-2 gates (labels.switch_gate, issue 26 point 6): a network's prediction drawn only where confident /
    # where it agrees with the SAM-refined CLIP label; study rows, run when --rows names them
    Row("Ours, gate confidence", ablation="gate_confidence", full=False),
    Row("Ours, gate agree SAM", ablation="gate_agree_sam", full=False),
)
#: The row that trains each ablation preset (Post-Refine reads Ours' run, it trains none of its own).
ROW_OF_PRESET = {r.ablation: r for r in ROWS if r.ablation and not r.post_refine}


@dataclass
class DatasetSpec:
    """A benchmark dataset: how its simulated train and val stores are made, and its training config."""
    kind: str
    config: str
    train_scenes: int
    val_scenes: int
    options: dict = field(default_factory=dict)
    full_options: dict = field(default_factory=dict)  # --full: store options on top (own stores and runs)
    stores_of: str | None = None  # another dataset's key whose stores this one trains on (its own runs)


# class_colours=1: every object wears its class's colour. The from-scratch CPU 2D network learns its training
# scenes and does not carry them over to others when classes share palettes (the 2D oracle at 21-40 % on val,
# 52-66 % on its training scenes; with half the objects class-coloured 36 % in rooms): the pretrained features
# the paper's networks start from are what makes classes separable by appearance (docs/benchmark.md).
DATASETS = {
    "street": DatasetSpec("street", "bench_street_cpu", 16, 4, {"rare_boost": 4, "class_colours": 1}),
    # rooms fused at one point per 5 cm cube (the generator's default is 3 cm): a third of the points and pairs,
    # about half the step time, an oracle within 0.2 points in the former 120x160 / 5 cm regime
    # (docs/benchmark.md); --full: rooms of 32 images, for the 'Image numbers 32' row
    "indoor": DatasetSpec("indoor", "bench_indoor_cpu", 16, 4,
                          {"frames_per_room": 16, "point_spacing": 0.05, "class_colours": 1}, {"frames_per_room": 32}),
}
# the rooms study (issue 26, `make bench-rooms16`): the indoor stores at the paper's ScanNet image number (16 a
# step: every image of a 16-frame room) with every pixel-point pair a 3D term (bench_rooms16_cpu.yaml); its runs
# in <work>/rooms16/, the stores read from <work>/indoor/cache
DATASETS["rooms16"] = dataclasses.replace(DATASETS["indoor"], config="bench_rooms16_cpu", stores_of="indoor")


def dataset_root(work: Path, kind: str, full: bool = False) -> Path:
    """A dataset's directory under ``--work``: its stores in ``cache/``, its runs in ``seed<k>/``; ``--full``
    runs of a dataset with ``full_options`` have their own (other stores)."""
    return work / (f"{kind}-full" if full and DATASETS[kind].full_options else kind)


def run_labels(spec: DatasetSpec, split: str, scenes: int, cache: Path, simulate: str) -> Path:
    """The simulated label stages via ``cns-cli labels`` (it resumes a partly written store)."""
    store = store_path(cache, "synthetic", split)
    opts = {"kind": spec.kind, "num_scenes": scenes, "cache_size": scenes, **spec.options}
    cmd = [str(Path(sys.executable).with_name("cns-cli")), "labels", "--dataset", "synthetic", "--cache", str(cache),
           "--split", split, "--workers", "0", "--simulate", simulate]
    for k, v in opts.items():
        cmd += ["--dataset-option", f"{k}={v}"]
    print(f"[stores] {spec.kind}/{split}: {scenes} scenes -> {store}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return store


def _digest(cfg: dict, length: int) -> str:
    """A digest of a resolved configuration. A key added after runs were cached is left out at the value those
    runs computed with (``train.config.ADDED_KEYS``), so a cached run made before the key existed keeps its
    identity; ``labels.gate_confidence`` is left out where it does nothing (``labels.switch_gate`` other than
    ``confidence``), so that a change of its default does not disown the other rows' runs."""
    from train.config import ADDED_KEYS
    cfg = copy.deepcopy(cfg)
    for dotted, before in ADDED_KEYS.items():
        section, key = dotted.split(".")
        if cfg.get(section, {}).get(key, before) == before:
            cfg.get(section, {}).pop(key, None)
    if cfg.get("labels", {}).get("switch_gate", "none") != "confidence":
        cfg.get("labels", {}).pop("gate_confidence", None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:length]


def stage1_key(cfg: dict) -> str:
    """The stage-1 signature: the resolved configuration without its stage-2 keys and its ablation name."""
    c = copy.deepcopy(cfg)
    c.pop("ablation", None)
    c.pop("init_from", None)
    for section, key in STAGE2_KEYS:
        c[section].pop(key, None)
    return _digest(c, 10)


def config_sha(cfg: dict) -> str:
    """A row's resolved configuration (without the parent a fork records), to check a cached result against."""
    return _digest({k: v for k, v in cfg.items() if k != "init_from"}, 16)


def row_config(spec: DatasetSpec, ablation: str, seed: int, overrides: list[str]) -> dict:
    from train.config import load_config
    return load_config(spec.config, [f"ablation={ablation}", f"seed={seed}", "eval.interval=0", "eval.at_end=true",
                                     *overrides])


def run_sha(cfg: dict) -> str:
    """A run's identity: its resolved configuration without the preset's name (and the parent a fork records)."""
    return _digest({k: v for k, v in cfg.items() if k not in ("ablation", "init_from")}, 16)


def row_run(spec: DatasetSpec, row: Row, seed: int, overrides: list[str]) -> tuple[dict, str]:
    """A trained row's configuration and the name of its run directory. Rows whose presets resolve to the same
    configuration are one run, trained once under the first of them in ``ROWS`` with Ours (``none``) first, and
    with that row's configuration (a cached result is checked against it)."""
    cfg = row_config(spec, row.ablation, seed, overrides)
    order = ["none"] + [r.ablation for r in ROWS if r.ablation not in (None, "none") and spec.kind in r.kinds]
    for ablation in order[:order.index(row.ablation)]:
        other = row_config(spec, ablation, seed, overrides)
        if run_sha(other) == run_sha(cfg):
            return other, ablation
    return cfg, row.ablation


def stage1_dir(cfg: dict, seed_dir: Path) -> Path | None:
    """The shared stage-1 run a row forks from (``seed<k>/stage1-<key>``); ``None`` for a row trained straight
    through (no stage 1, or the oracle)."""
    if int(cfg["schedule"]["warmup_epochs"]) > 0 and not cfg["labels"]["oracle"]:
        return seed_dir / f"stage1-{stage1_key(cfg)}"
    return None


@contextlib.contextmanager
def stage1_lock(stage1: Path):
    """An exclusive lock on a shared stage-1 run (``seed<k>/.stage1-<key>.lock``), held while it trains."""
    stage1.parent.mkdir(parents=True, exist_ok=True)
    with open(stage1.parent / f".{stage1.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def train_stage1(cfg: dict, train_store: Path, val_store: Path, stage1: Path, device: str, progress: bool) -> bool:
    """The stage-1 run the rows equal outside stage 2 fork from (``stage1.done`` once trained; resumed).
    Whether this call trained it."""
    from train.engine import Trainer
    if (stage1 / "stage1.done").exists():
        return False
    s = cfg["schedule"]
    print(f"[train] {stage1.parent.parent.name}/{stage1.parent.name}/{stage1.name} (stage 1, "
          f"{s['warmup_epochs']} epochs, shared)", flush=True)
    parent = stage1 / "checkpoints" / "last.pth"
    Trainer(copy.deepcopy(cfg), [train_store], stage1, eval_paths=[val_store], device=device,
            resume=parent.exists(), progress=progress).train(stop_after_epochs=int(s["warmup_epochs"]))
    (stage1 / "stage1.done").write_text("")
    return True


def train_row(cfg: dict, train_store: Path, val_store: Path, run_dir: Path, device: str,
              no_train: bool = False, progress: bool = True) -> dict | None:
    """Train one row (forked from its shared stage-1 run) and evaluate it on the val store; cached in
    ``result.json``. Returns the evaluation's rows (mIoU and per-class IoU); ``None`` with ``no_train`` when
    the row has not been run."""
    from train.engine import Trainer
    done = run_dir / "result.json"
    if done.exists():
        res = json.loads(done.read_text())
        if res.get("config_sha") != config_sha(cfg):
            raise SystemExit(f"{done} was made with another configuration of this row: delete {run_dir} (and the "
                             f"stage-1 runs beside it) or use another --work directory")
        return res
    if no_train:
        return None
    s = cfg["schedule"]
    stage1 = stage1_dir(cfg, run_dir.parent)
    stage1_seconds = 0.0
    if stage1 is not None:
        with stage1_lock(stage1):  # another --jobs task forking the same stage-1 run waits for it here
            t0 = time.perf_counter()
            if train_stage1(cfg, train_store, val_store, stage1, device, progress):
                stage1_seconds = time.perf_counter() - t0
        init_from = stage1 / "checkpoints" / "last.pth"
    else:
        init_from = None
    t1 = time.perf_counter()
    print(f"[train] {run_dir.parent.parent.name}/{run_dir.parent.name}/{run_dir.name}", flush=True)
    resume = (run_dir / "checkpoints" / "last.pth").exists()
    run_cfg = copy.deepcopy(cfg)
    if resume:  # a fork's config.yaml records its parent: resume with it, as `cns-cli train --resume` does
        run_cfg["init_from"] = yaml.safe_load((run_dir / "config.yaml").read_text())["init_from"]
    trainer = Trainer(run_cfg, [train_store], run_dir, eval_paths=[val_store], device=device,
                      resume=resume, init_from=None if resume else init_from, progress=progress)
    evals = trainer.train()
    epochs = int(s["epochs"])
    if not evals and trainer.start_epoch >= epochs:  # stopped after its last checkpoint, before its evaluation
        evals = [trainer.evaluate(epochs - 1)]
    if not evals:
        raise RuntimeError(f"{run_dir}: the run ended without its final evaluation")
    res = {"config_sha": config_sha(cfg), "rows": evals[-1]["rows"], "class_names": evals[-1]["class_names"],
           "stage1": stage1.name if init_from else None,
           "seconds_stage1": round(stage1_seconds, 1), "seconds": round(time.perf_counter() - t1, 1)}
    done.write_text(json.dumps(res, indent=1))
    return res


def on_training_scenes(run_dir: Path, train_store: Path, device: str) -> dict:
    """The oracle's networks scored on the scenes they were trained on (cached in
    ``<run>/eval/training_scenes.json``): next to the val score it tells underfitting (both low: the networks or
    the steps are the limit) from too few training scenes (a large gap: more scenes are the lever)."""
    out = run_dir / "eval" / "training_scenes.json"
    if out.exists():
        return json.loads(out.read_text())
    from train.config import load_config
    from train.engine import check_stores
    from train.evaluate import evaluate
    from train.models import load_trained_model
    cfg = load_config(run_dir / "config.yaml", [])
    info = check_stores([str(train_store)], cfg, for_training=False)
    model, _ = load_trained_model(cfg, run_dir / "checkpoints" / "last.pth", info, device)
    rows = evaluate(model, [str(train_store)], cfg, device, with_baselines=False, post_refine=False)["rows"]
    res = {"2d": rows["cns_2d"]["miou"], "3d": rows["cns_3d"]["miou"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    return res


def baseline_rows(cfg: dict, val_store: Path, out: Path, device: str) -> dict:
    from train.engine import check_stores
    from train.evaluate import evaluate
    if out.exists():
        return json.loads(out.read_text())
    cfg = copy.deepcopy(cfg)
    check_stores([str(val_store)], cfg, for_training=False)  # fills the class list from the store
    res = evaluate(None, [str(val_store)], cfg, device, with_baselines=True)
    res = {"rows": res["rows"], "class_names": res["class_names"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    return res


def eval_key(row: Row) -> str:
    """The evaluation rows (``<key>_2d``, ``<key>_3d``) a table row reads."""
    return row.baseline or ("cns_refined" if row.post_refine else "cns")


def measured(row: Row, res: dict) -> dict:
    """2D / 3D mIoU of a row from its evaluation (3D baselines: every labelled point; paired only as well)."""
    r, key = res["rows"], eval_key(row)
    out = {"2d": r[f"{key}_2d"]["miou"], "3d": r[f"{key}_3d"]["miou"]}
    if row.baseline:
        out["3d_paired"] = r[f"{key}_3d_paired"]["miou"]
    return out


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(m: float | None, s: float | None) -> str:
    if m is None:
        return "–"
    return f"{m:.1f}" if s is None else f"{m:.1f} ± {s:.1f}"


def per_seed_lines(block: dict, seeds: list) -> list[str]:
    """With several seeds: each trained row's 2D / 3D val mIoU per seed (the spread behind the mean ± std)."""
    baselines = {r.name for r in ROWS if r.baseline}
    trained = [n for n in block["rows"] if n not in baselines]
    if len(seeds) < 2 or not trained:
        return []
    lines = ["", "Per seed, 2D / 3D val mIoU:", "", "| row | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|" + "---|" * len(seeds)]
    for name in trained:
        values = block["per_seed"][name]
        cells = [f"{v['2d']:.1f} / {v['3d']:.1f}" for v in values] + ["–"] * (len(seeds) - len(values))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def write_tables(result: dict, out_json: Path, out_md: Path) -> str:
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1))
    lines = [f"# CNS controlled-noise benchmark ({result['mode']})", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']}  ",
             f"Seeds: {result['seeds']}; wall time of this invocation {result['wall_minutes']:.1f} min, training and "
             f"evaluation of the rows {result['train_minutes']:.1f} min; "
             f"simulated pseudo-labels (pipeline/simulate/configs/{result['simulate']}.yaml), not CLIP/SAM.", ""]
    for kind, block in result["datasets"].items():
        gate = block.get("gate") or {"passed": False}
        lines += [f"## {kind} ({block['config']}: {block['train_scenes']} train / {block['val_scenes']} val scenes)",
                  "", f"Oracle gate ({result['oracle_gate']} % val mIoU in 2D and 3D): "
                  f"**{'passed' if gate['passed'] else 'MISSED -- the noisy rows below are not evidence'}**"
                  + ("" if "gate" in block else " (the oracle row has not been run)"), ""]
        seen = (block.get("gate") or {}).get("training_scenes")
        if seen:
            lines += [f"The oracle on its own training scenes (seed {result['seeds'][0]}; a diagnostic, not a row): "
                      f"2D {seen['2d']:.1f}, 3D {seen['3d']:.1f} -- close to its val score: the networks or "
                      "the steps are the limit; far above it: too few training scenes.", ""]
        lines += ["| row | 2D mIoU | 3D mIoU | paper 2D | paper 3D |", "|---|---|---|---|---|"]
        baselines = {r.name for r in ROWS if r.baseline}
        for name, r in block["rows"].items():
            paper = PAPER_TABLE2.get(name, (None, None))
            seeds = len(block["per_seed"][name])
            # a trained row run for fewer seeds than asked (a run in progress, --no-train) says how many
            short = "" if name in baselines or seeds == len(result["seeds"]) else f" ({seeds} of {len(result['seeds'])} seeds)"
            lines.append(f"| {name}{short} | {fmt(r['2d_mean'], r['2d_std'])} | {fmt(r['3d_mean'], r['3d_std'])} | "
                         f"{fmt(paper[0], None)} | {fmt(paper[1], None)} |")
        if len(result["seeds"]) > 1:
            label_rows = " and ".join(r.name for r in ROWS if r.baseline)
            lines += ["", f"Mean ± standard deviation over the seeds; {label_rows} score the labels of the "
                      "stores, which every seed shares (one value)."]
        lines += per_seed_lines(block, result["seeds"])
        for name, twin in block.get("same_run", {}).items():
            lines += ["", f"{name} is the same run as {twin}: its preset resolves to the same configuration here."]
        if block["not_run"]:
            lines += ["", f"Not run: {'; '.join(block['not_run'])}."]  # row names hold commas
        lines.append("")
    lines += ["Paper: ScanNet val, Table 2 of Chen et al. 2023 (full networks and datasets); the measured rows are "
              "synthetic scenes with simulated labels and CPU study networks: compare directions, not values.", ""]
    text = "\n".join(lines)
    out_md.write_text(text)
    return text


def parse_rows(text: str) -> list[Row]:
    """``--rows``: comma-separated row names (which may hold commas themselves: 'Ours, switch per frame', the
    longest name that matches wins) or ablation presets (``switch_frame``; ``none`` is Ours)."""
    names = {r.name: r for r in ROWS}
    tokens = [t.strip() for t in text.split(",")]
    chosen, i = [], 0
    while i < len(tokens):
        for j in range(len(tokens), i, -1):
            name = ", ".join(tokens[i:j])
            if name in names or (j == i + 1 and name in ROW_OF_PRESET):
                chosen.append(names.get(name) or ROW_OF_PRESET[name])
                i = j
                break
        else:
            raise SystemExit(f"unknown row {tokens[i]!r} in --rows {text!r}; known: {list(names)}, or the presets "
                             f"{list(ROW_OF_PRESET)}")
    return chosen


class RowRefused(Exception):
    """A worker's refusal (``train_row``'s ``SystemExit``), carried back to the parent process."""


def _use_threads(threads: int | None) -> None:
    """Torch's thread count for this process (and the label stages' subprocesses): a worker of ``--jobs``."""
    if threads:
        import os

        import torch
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def dataset_stores(kind: str, a: argparse.Namespace) -> tuple[DatasetSpec, Path, Path, Path]:
    """A dataset's spec (``--scenes`` and ``--full`` applied), its directory under ``--work`` and its train and
    val stores, written by the label stages where they are missing (they resume a partly written store)."""
    spec = copy.deepcopy(DATASETS[kind])
    if a.scenes:
        spec.train_scenes, spec.val_scenes = map(int, a.scenes.split(","))
    root = dataset_root(a.work, kind, a.full)
    if a.full:
        spec.options = {**spec.options, **spec.full_options}
    cache = dataset_root(a.work, spec.stores_of, a.full) / "cache" if spec.stores_of else root / "cache"
    train_store = run_labels(spec, "train", spec.train_scenes, cache, a.simulate)
    val_store = run_labels(spec, "val", spec.val_scenes, cache, a.simulate)
    return spec, root, train_store, val_store


def train_rows(kind: str, stores: tuple, a: argparse.Namespace, rows: list, seed: int, threads: int) -> None:
    """A task of ``--jobs``: train one dataset's ``rows`` for one seed; ``stores``: ``dataset_stores``'s
    answer. A seed's runs (its stage-1 runs included) live in ``seed<k>/`` and share nothing with another
    seed's; two tasks of one seed whose rows share a stage-1 run train it once (``train_row`` holds a lock on
    it); the stores are written before the workers start."""
    _use_threads(threads)
    spec, root, train_store, val_store = stores
    for row in rows:
        if spec.kind in row.kinds and not row.baseline:
            cfg, run_name = row_run(spec, row, seed, a.overrides)
            try:
                train_row(cfg, train_store, val_store, root / f"seed{seed}" / run_name, a.device, progress=False)
            except SystemExit as e:  # a pool worker that exits leaves the pool waiting for it forever
                raise RowRefused(str(e)) from None


def reaches_gate(oracle_values: list[dict], gate: float) -> bool:
    """Whether the oracle's val mIoU, the mean over its seeds, reaches ``gate`` in 2D and in 3D."""
    return all(statistics.fmean(v[d] for v in oracle_values) >= gate for d in ("2d", "3d"))


def oracle_passes(kind: str, a: argparse.Namespace, seeds: list) -> bool:
    """Whether the oracle's runs of every seed in ``seeds`` are there and reach the gate."""
    root = dataset_root(a.work, kind, a.full)
    values = []
    for seed in seeds:
        done = root / f"seed{seed}" / ROWS[0].ablation / "result.json"
        if not done.exists():
            return False
        values.append(measured(ROWS[0], json.loads(done.read_text())))
    return reaches_gate(values, a.oracle_gate)


def parallel_tasks(kinds: list, rows: list, seeds: list, oracle_seeds: int | None = None) -> tuple[list, list]:
    """``--jobs``' two phases as (dataset, rows, seed) tasks. First the oracle of each dataset's first seed;
    then, for the datasets whose first oracle passed, the oracles of the other seeds among the first
    ``oracle_seeds`` (``--oracle-seeds``; default every seed) and one task per (trained row,
    seed), row by row in the table's order (``train_in_parallel`` then starts the tasks with the most epochs
    left first, keeping that order among equals) so that the cores stay busy to the end: a task is a run, not
    a seed's list of runs."""
    oracle = [r for r in rows if r.ablation == "oracle"]
    first = [(k, oracle, seeds[0]) for k in kinds]
    rest = {k: [(k, oracle, s) for s in seeds[1:oracle_seeds]] for k in kinds}
    for row in rows:
        if row.ablation != "oracle" and not row.baseline:
            for k in kinds:
                if DATASETS[k].kind in row.kinds:
                    rest[k] += [(k, [row], s) for s in seeds]
    return first, rest


def epochs_to_train(stores: tuple, rows: list, seed: int, a: argparse.Namespace) -> int:
    """The epochs a task still has to train (a resumed run counted whole): its rows' runs without a
    ``result.json``, each with its stage-1 epochs while the shared stage-1 run is not done. ``--jobs`` starts
    the longest tasks first so that no core idles at the end while one long run trains alone."""
    spec, root = stores[0], stores[1]
    total = 0
    for row in rows:
        cfg, run_name = row_run(spec, row, seed, a.overrides)
        run_dir = root / f"seed{seed}" / run_name
        if (run_dir / "result.json").exists():
            continue
        s, stage1 = cfg["schedule"], stage1_dir(cfg, run_dir.parent)
        stage1_done = stage1 is not None and (stage1 / "stage1.done").exists()
        total += int(s["epochs"]) - (int(s["warmup_epochs"]) if stage1_done else 0)
    return total


def train_in_parallel(kinds: list, a: argparse.Namespace, rows: list, seeds: list) -> None:
    """``--jobs N``: the trained rows in N processes of an equal share of the cores (``parallel_tasks``). The
    noisy rows of a dataset train only when its first seed's oracle passed the gate (or always,
    ``--ignore-gate``); the table's gate is the mean over all seeds' oracles, as without ``--jobs``."""
    import multiprocessing as mp
    import os
    stores = {kind: dataset_stores(kind, a) for kind in kinds}  # written before any worker reads them
    first, rest = parallel_tasks(kinds, rows, seeds, a.oracle_seeds)
    cores = os.cpu_count() or 1
    with mp.get_context("spawn").Pool(min(a.jobs, max(len(first), sum(map(len, rest.values()))))) as pool:
        try:
            threads = max(1, cores // min(a.jobs, len(first)))  # a lone first oracle takes every core
            pool.starmap(train_rows, [(k, stores[k], a, r, s, threads) for k, r, s in first], chunksize=1)
            todo = [t for k in kinds if a.ignore_gate or oracle_passes(k, a, seeds[:1]) for t in rest[k]]
            todo.sort(key=lambda t: -epochs_to_train(stores[t[0]], t[1], t[2], a))  # longest first, stable
            threads = max(1, cores // max(1, min(a.jobs, len(todo))))
            pool.starmap(train_rows, [(k, stores[k], a, r, s, threads) for k, r, s in todo], chunksize=1)
        except RowRefused as e:
            raise SystemExit(str(e)) from None


def run_dataset(kind: str, a: argparse.Namespace, rows: list, seeds: list) -> dict:
    """One dataset's stores, rows and gate: ``{"block", "trained_seconds", "gate_ok"}``, training the rows not
    yet run unless ``--no-train`` (``--jobs`` trains them before, in parallel, and this only collects them)."""
    trained_seconds = 0.0
    gate_ok = True
    spec, root, train_store, val_store = dataset_stores(kind, a)
    block = {"config": spec.config, "train_scenes": spec.train_scenes, "val_scenes": spec.val_scenes,
             "options": spec.options, "rows": {}, "per_seed": {}, "classes": {},
             "not_run": [], "same_run": {}}
    kind_rows = [r for r in rows if spec.kind in r.kinds]
    timed = set()  # runs whose time is counted (Ours and Post-Refine read one run)
    for row in kind_rows:
        values = []
        # the label rows score the stores themselves, which every seed shares: one value, no spread to report
        # the oracle, a check of the setting rather than a row compared, on --oracle-seeds of them (default all)
        for seed in (seeds[:1] if row.baseline else seeds[:a.oracle_seeds] if row.ablation == "oracle" else seeds):
            run_root = root / f"seed{seed}"
            if row.baseline:
                cfg = row_config(spec, "none", seed, a.overrides)
                res = baseline_rows(cfg, val_store, run_root / "baselines.json", a.device)
            else:
                cfg, run_name = row_run(spec, row, seed, a.overrides)
                if run_name != row.ablation:
                    block["same_run"][row.name] = ROW_OF_PRESET[run_name].name
                res = train_row(cfg, train_store, val_store, run_root / run_name, a.device, a.no_train)
                if res is not None and (run_root / run_name) not in timed:
                    timed.add(run_root / run_name)
                    trained_seconds += res.get("seconds_stage1", 0) + res.get("seconds", 0)
            if res is None:
                continue
            values.append(measured(row, res))
            block["classes"].setdefault(row.name, {})[seed] = {d: res["rows"][f"{eval_key(row)}_{d}"]["iou"]
                                                               for d in ("2d", "3d")}
        if not values:
            block["not_run"].append(row.name)
            print(f"[{kind}] {row.name}: not run", flush=True)
            continue
        entry = {}
        for d in values[0]:
            entry[f"{d}_mean"], entry[f"{d}_std"] = mean_std([v[d] for v in values])
        block["rows"][row.name] = entry
        block["per_seed"][row.name] = values
        print(f"[{kind}] {row.name}: 2D {fmt(entry['2d_mean'], entry['2d_std'])}  "
              f"3D {fmt(entry['3d_mean'], entry['3d_std'])}", flush=True)
        if row.ablation == "oracle":
            passed = reaches_gate(values, a.oracle_gate)
            block["gate"] = {"passed": passed, "2d": entry["2d_mean"], "3d": entry["3d_mean"]}
            oracle_run = root / f"seed{seeds[0]}" / row.ablation
            if (oracle_run / "checkpoints" / "last.pth").exists():
                block["gate"]["training_scenes"] = on_training_scenes(oracle_run, train_store, a.device)
            if not passed:
                gate_ok = False
                print(f"ORACLE GATE MISSED on {kind}: val mIoU 2D {entry['2d_mean']:.1f} / 3D "
                      f"{entry['3d_mean']:.1f} < {a.oracle_gate} -- the networks and budget cannot learn these "
                      "scenes even from clean labels, so no noisy row would mean anything", flush=True)
                if not a.ignore_gate:
                    break
    return {"block": block, "trained_seconds": trained_seconds, "gate_ok": gate_ok}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="every Table 2 row, 3 seeds (hours on CPU)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench_cns")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--seeds", type=int, default=None, help="default: 1 quick, 3 full")
    ap.add_argument("--datasets", default="street,indoor")
    ap.add_argument("--rows", default=None,
                    help="comma-separated row names or ablation presets (default: the mode's rows), e.g. "
                         "'w 2D,Ours, switch per frame' or 'pred2d_only,switch_frame'")
    ap.add_argument("--simulate", default="default", help="simulator config (pipeline/simulate/configs/<name>.yaml)")
    ap.add_argument("--oracle-gate", type=float, default=50.0)
    ap.add_argument("--oracle-seeds", type=int, default=None,
                    help="train the oracle on the first N seeds only (default: every seed); the gate is their "
                         "mean. For a study of rows whose setting's oracle is already on record (make bench-gates)")
    ap.add_argument("--ignore-gate", action="store_true", help="train the noisy rows even when the oracle misses")
    ap.add_argument("--no-train", action="store_true",
                    help="tables from the rows already run in --work only (the others are listed as not run)")
    ap.add_argument("--scenes", default=None, help="train,val scene counts instead of the datasets' own (tests)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="processes training side by side, each an equal share of the cores and one (dataset, "
                         "seed) pair at a time")
    ap.add_argument("--tag", default=None, help="results file stem (default cns_ablation[_quick])")
    ap.add_argument("overrides", nargs="*", help="config overrides for every row, key=value (tests, studies)")
    a = ap.parse_intermixed_args(argv)
    t_start = time.perf_counter()
    mode = "full" if a.full else "quick"
    seeds = list(range(a.seeds if a.seeds is not None else (3 if a.full else 1)))
    wanted = parse_rows(a.rows) if a.rows else None
    rows = [r for r in ROWS if (wanted is None and ((a.full and r.full) or r.quick)) or (wanted and r in wanted)]
    if rows[0].ablation != "oracle":
        rows.insert(0, ROWS[0])  # the gate row always comes first
    stem = a.tag or ("cns_ablation" if a.full else "cns_ablation_quick")
    result = {"mode": mode, "command": "python bench/bench_cns.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine(), "device": a.device, "seeds": seeds, "simulate": a.simulate,
              "oracle_gate": a.oracle_gate, "datasets": {}}
    kinds = a.datasets.split(",")
    unknown = [k for k in kinds if k not in DATASETS]
    if unknown:
        raise SystemExit(f"unknown dataset(s) {unknown}; known: {sorted(DATASETS)}")
    if a.jobs > 1 and not a.no_train:
        train_in_parallel(kinds, a, rows, seeds)
        collect = copy.copy(a)
        collect.no_train = True
        outs = [run_dataset(k, collect, rows, seeds) for k in kinds]
    else:
        outs = [run_dataset(k, a, rows, seeds) for k in kinds]
    for kind, o in zip(kinds, outs):
        result["datasets"][kind] = o["block"]
    gate_ok = all(o["gate_ok"] and "gate" in o["block"] for o in outs)
    trained_seconds = sum(o["trained_seconds"] for o in outs)
    result["wall_minutes"] = (time.perf_counter() - t_start) / 60
    # training and evaluation of the rows reported (shared stage-1 runs counted once, with their first row)
    result["train_minutes"] = trained_seconds / 60
    result["gate_passed"] = gate_ok
    text = write_tables(result, a.out / f"{stem}.json", a.out / f"{stem}.md")
    print(text)
    print(f"results: {a.out / (stem + '.json')} and {a.out / (stem + '.md')}")
    if not gate_ok:
        print("bench-cns FAILED: the oracle row is below its gate (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
