"""``cns-cli predict`` throughput on CPU: frames per second, reading, inference and writing included.

    python bench/bench_predict.py [--repeat 3] [--configs synthetic_street_cpu,nuscenes] [--threads 2]

Source: the real nuScenes sweep of ../shared/data (34 688 points, 6 cameras at 1600x900, resized to 224x416 as
``correspond`` does) read through the nuscenes adapter, once with the cameras (2D + 3D networks) and once as
a LiDAR sweep alone (3D network only). The networks are a run's at random initialisation, written here: the
speed of a forward pass does not depend on the weights' values. Prints the median over ``--repeat`` runs.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

DATA = Path(os.environ.get("CNS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def untrained_run(config: str, class_names, point_channels: int, out: Path) -> Path:
    """A run directory (config.yaml + checkpoints/last.pth) with the networks of ``config`` at random init."""
    import torch

    from train.config import dump_config, load_config
    from train.models import build_model
    cfg = load_config(config, {"data.class_names": list(class_names), "model.pretrained_2d": False,
                               "loss.latent_target": "none"})
    text_embed = torch.nn.functional.normalize(torch.randn(len(class_names), 512), dim=1)
    model = build_model(cfg, point_channels + 3, text_embed, {}, "cpu")
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"model": model.state_dict(), "text_embed": text_embed, "point_channels": point_channels,
                "feature_dims": {}, "teacher": None}, out / "checkpoints" / "last.pth")
    dump_config(cfg, out / "config.yaml")
    return out


def lidar_only_copy(root: Path, tmp: Path) -> Path:
    """The nuScenes sweep as a folder dataset without calibration: the LiDAR alone."""
    from pipeline.datasets import build_adapter
    from pipeline.datasets.folder_from import write_folder
    folder = write_folder(build_adapter("nuscenes", root, "all"), tmp / "lidar_only", progress=False)
    for calib in (folder / "frames").glob("*/calib.json"):
        calib.unlink()
    return folder


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--configs", default="synthetic_street_cpu,nuscenes")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    import torch

    from pipeline.datasets.classes import nuscenes16
    from train.predict import run_predict
    if args.threads:
        torch.set_num_threads(args.threads)
    root = DATA / "nuscenes_sample"
    tmp = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    try:
        sources = {"nuScenes sweep + 6 cameras": {"dataset": "nuscenes", "data_root": root, "split": "all"},
                   "nuScenes sweep alone (3D)": {"dataset": "folder", "data_root": lidar_only_copy(root, tmp),
                                                 "split": "all"}}
        print(f"torch threads {torch.get_num_threads()}, median of {args.repeat}")
        print(f"{'config':<24} {'source':<30} {'frames/s':>9} {'s/frame':>8}")
        for config in args.configs.split(","):
            run = untrained_run(config, nuscenes16(), 1, tmp / f"run_{config}")
            for title, source in sources.items():
                rates = [run_predict(run, tmp / "out", progress=False, **source)["frames_per_second"]
                         for _ in range(args.repeat)]
                fps = statistics.median(rates)
                print(f"{config:<24} {title:<30} {fps:9.3f} {1 / fps:8.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
