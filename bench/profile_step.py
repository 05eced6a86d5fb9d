"""Where one training step of a benchmark row spends its time: a few steps of ``bench/bench_cns.py``'s regime on
its cached stores, timed, then the torch profiler's table of the most expensive operators.

    python bench/profile_step.py indoor                          # the oracle row of train/configs/bench_indoor_cpu
    python bench/profile_step.py street --ablation none loss.latent_target=none   # any row, any override
    python bench/profile_step.py indoor --work runs/bench_cns --steps 3 --table 0

The stores must exist (``make bench-cns`` or ``python bench/bench_cns.py --rows Baseline`` writes them). The
step runs with the training loop's own :meth:`train.engine.Trainer.training_step` (stage 1), on batches read
beforehand, so the time is the step's and not the loader's; the loader's time per batch is printed apart.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main(argv=None) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import bench_cns
    from data_cache.store import store_path
    from train.engine import Trainer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", choices=sorted(bench_cns.DATASETS))
    ap.add_argument("--ablation", default="oracle", help="the row's preset (train/config.py ABLATIONS)")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench_cns", help="bench_cns.py's --work")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step; one more is profiled)")
    ap.add_argument("--table", type=int, default=15, help="profiler rows to print (0: none)")
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value")
    a = ap.parse_intermixed_args(argv)
    spec = bench_cns.DATASETS[a.dataset]
    cache = bench_cns.dataset_root(a.work, a.dataset) / "cache"
    stores = [store_path(cache, "synthetic", split) for split in ("train", "val")]
    missing = [str(s) for s in stores if not s.exists()]
    if missing:
        raise SystemExit(f"no benchmark store at {', '.join(missing)}: run bench/bench_cns.py first")
    cfg = bench_cns.row_config(spec, a.ablation, 0, a.overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(copy.deepcopy(cfg), [stores[0]], Path(run_dir), eval_paths=[stores[1]], device="cpu",
                          progress=False)
        trainer.model.train()
        generator = torch.Generator().manual_seed(0)
        loader = iter(trainer.loader)
        t0 = time.perf_counter()
        batches = [next(loader) for _ in range(a.steps + 2)]
        load_s = (time.perf_counter() - t0) / len(batches)
        b = batches[0]
        trainer.training_step(b, 1, generator)  # warm-up: allocator, oneDNN kernels
        times = []
        for batch in batches[1:-1]:
            t = time.perf_counter()
            trainer.training_step(batch, 1, generator)
            times.append(time.perf_counter() - t)
        with profile(activities=[ProfilerActivity.CPU]) as prof:  # one more step, for the operator table
            trainer.training_step(batches[-1], 1, generator)
    print(f"{a.dataset} {a.ablation} {' '.join(a.overrides)}: {len(b['coord'])} points, {len(b['voxel_feat'])} voxels, "
          f"{len(b['pair_point'])} pairs, images {tuple(b['rgb'].shape)}; torch threads {torch.get_num_threads()}")
    print(f"step {statistics.median(times):.3f} s (median of {len(times)}); "
          f"loader {load_s:.3f} s per batch")
    if a.table:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
