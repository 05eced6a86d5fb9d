"""When stage 2 starts: the full method against 'w/o SCT' with a later switch to stage 2.

Label switching (Eq. 6) keeps the classes the networks predict when stage 2 starts and stops teaching the
others (``bench/stage1_recall.py`` measures that premise). This study forks the full method ('Ours',
ablation ``none``) and 'w/o SCT' (``no_self_cross_training``: the same stage 2 with the CLIP labels only, so
the pair differs in label switching alone) from one stage-1 run of ``--warmup`` epochs instead of the
dataset's own, on the benchmark's stores, and prints their val mIoU next to the same pair at the default
switch when the benchmark has run it.

    python bench/stage2_start.py [--dataset indoor] [--full] [--seed 0] [--warmup 40]

Runs go to ``<work>/<dataset>/seed<k>/warmup<W>/``; the stores must exist (``bench_cns.py`` writes them).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_cns import DATASETS, dataset_root, measured, row_config, train_row, ROWS  # noqa: E402
from data_cache.store import store_path  # noqa: E402

PAIR = {"Ours": "none", "w/o SCT": "no_self_cross_training"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="indoor", choices=sorted(DATASETS))
    ap.add_argument("--full", action="store_true", help="the --full stores (rooms of 32 images)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=40, help="stage-1 epochs (the dataset's config: 20 rooms, 30 streets)")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench_cns")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    spec = copy.deepcopy(DATASETS[a.dataset])
    root = dataset_root(a.work, a.dataset, a.full)
    stores = [store_path(root / "cache", "synthetic", split) for split in ("train", "val")]
    missing = [str(s) for s in stores if not s.exists()]
    if missing:
        raise SystemExit(f"no benchmark store at {', '.join(missing)}: run bench/bench_cns.py "
                         f"{'--full ' if a.full else ''}first")
    out = root / f"seed{a.seed}" / f"warmup{a.warmup}"
    table = {}
    for name, ablation in PAIR.items():
        row = next(r for r in ROWS if r.name == name)
        cfg = row_config(spec, ablation, a.seed, [f"schedule.warmup_epochs={a.warmup}"])
        res = train_row(cfg, *stores, out / ablation, a.device)
        default = root / f"seed{a.seed}" / ablation / "result.json"
        table[name] = {f"warmup {a.warmup}": measured(row, res),
                       "default": measured(row, json.loads(default.read_text())) if default.exists() else None}
    print(f"{a.dataset}{' (full)' if a.full else ''}, seed {a.seed}: val mIoU 2D / 3D")
    for name, r in table.items():
        d = r["default"]
        print(f"  {name:8s} stage 2 after {a.warmup} epochs: {r[f'warmup {a.warmup}']['2d']:.1f} / "
              f"{r[f'warmup {a.warmup}']['3d']:.1f}   default: " + (f"{d['2d']:.1f} / {d['3d']:.1f}" if d else "not run"))
    (out / "summary.json").write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
