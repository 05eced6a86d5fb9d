"""The whole system on a store the pipeline wrote: labels (tiny models) -> train both stages -> eval tables."""
from __future__ import annotations

import json

from click.testing import CliRunner

from cli import main


def test_labels_train_eval_on_a_pipeline_store(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runner = CliRunner()
    labels = runner.invoke(main, ["labels", "--dataset", "synthetic", "--cache", str(tmp_path), "--workers", "0",
                                  "--test-tiny-models", "--dataset-option", "num_scenes=2", "--no-progress"])
    assert labels.exit_code == 0, labels.output
    store = tmp_path / "synthetic-train.zarr"
    run = tmp_path / "run"
    train = runner.invoke(main, ["train", "--cache", str(store), "--config", "synthetic_street_cpu", "--out", str(run),
                                 "--seed", "0", "schedule.epochs=2", "schedule.warmup_epochs=1",
                                 # 2 of a sweep's 6 cameras a step: a third of the 2D cost (37 -> 13 s), the
                                 # same code path (evaluation still scores every camera)
                                 "data.images_per_frame=2"])
    assert train.exit_code == 0, train.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    stages = {r.get("stage") for r in records if "stage" in r}
    assert {1, 2} <= stages, stages  # both training stages ran
    evaluation = runner.invoke(main, ["eval", "--cache", str(store), "--run", str(run)])
    assert evaluation.exit_code == 0, evaluation.output
    for row in ("CLIP labels (MaskCLIP), 2D", "CLIP labels projected, 3D, all points", "w/o CNS (SAM-refined CLIP), 2D",
                "CNS 2D net", "CNS 3D net"):
        assert row in evaluation.output, row
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["rows"]["cns_3d"]["miou"] <= 100.0


def test_open_vocabulary_uses_the_stores_text_tower(tmp_path, monkeypatch):
    """--classes embeds new names with the CLIP that made the store (here the tiny test CLIP, recorded in the
    store's fingerprint), so no weights are needed and the embedding width fits the trained heads."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runner = CliRunner()
    assert runner.invoke(main, ["labels", "--dataset", "synthetic", "--cache", str(tmp_path), "--workers", "0",
                                "--test-tiny-models", "--dataset-option", "num_scenes=1",
                                "--no-progress"]).exit_code == 0
    store, run = tmp_path / "synthetic-train.zarr", tmp_path / "run"
    train = runner.invoke(main, ["train", "--cache", str(store), "--config", "synthetic_street_cpu", "--out", str(run),
                                 "schedule.epochs=1", "schedule.warmup_epochs=1", "data.images_per_frame=2"])
    assert train.exit_code == 0, train.output
    ov = runner.invoke(main, ["eval", "--cache", str(store), "--run", str(run), "--classes", "car,road,tree",
                              "--out", str(tmp_path / "ov.json")])
    assert ov.exit_code == 0, ov.output
    result = json.loads((tmp_path / "ov.json").read_text())
    assert result["open_vocabulary"] and result["class_names"] == ["car", "road", "tree"]
    assert "CNS 3D net" in ov.output
    missing = runner.invoke(main, ["eval", "--cache", str(store), "--run", str(run), "--classes", "car,road",
                                   "--clip-checkpoint", str(tmp_path / "nope.pt")])
    assert missing.exit_code == 2 and "does not exist" in missing.output and "Traceback" not in missing.output
