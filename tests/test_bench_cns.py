"""bench/bench_cns.py in a tiny mode: the oracle gate, shared stage-1 forks, resumption and the tables."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import bench_cns  # noqa: E402
import stage1_recall  # noqa: E402
from train.config import load_config  # noqa: E402

TINY = ["--datasets", "street", "--scenes", "2,1", "schedule.epochs=2", "schedule.warmup_epochs=1",
        "schedule.max_steps_per_epoch=1", "data.image_size=[56,104]", "eval.bn_recalibration_images=2"]


@pytest.mark.slow
def test_tiny_benchmark_gate_forks_and_tables(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "results"
    args = ["--work", str(work), "--out", str(out), "--rows", "Baseline,Ours,w/o CLIP,Post-Refine", *TINY]
    # a gate no network reaches: the oracle row is trained and reported, nothing else is, exit status 1
    assert bench_cns.main([*args, "--oracle-gate", "101"]) == 1
    res = json.loads((out / "cns_ablation_quick.json").read_text())
    street = res["datasets"]["street"]
    assert res["gate_passed"] is False and street["gate"]["passed"] is False
    assert list(street["rows"]) == ["Oracle (ground truth)"]
    assert "MISSED" in (out / "cns_ablation_quick.md").read_text()
    assert "ORACLE GATE MISSED on street" in capsys.readouterr().out
    # the diagnostic beside the gate: the oracle on its own training scenes, written once next to its run
    seen = street["gate"]["training_scenes"]
    assert 0 <= seen["2d"] <= 100 and 0 <= seen["3d"] <= 100
    assert json.loads((work / "street" / "seed0" / "oracle" / "eval" / "training_scenes.json").read_text()) == seen
    assert f"own training scenes (seed 0; a diagnostic, not a row): 2D {seen['2d']:.1f}" in (
        out / "cns_ablation_quick.md").read_text()
    # the same work directory with a reachable gate: the oracle is not trained again, the others are
    oracle_result = (work / "street" / "seed0" / "oracle" / "result.json").stat().st_mtime_ns
    assert bench_cns.main([*args, "--oracle-gate", "0"]) == 0
    assert (work / "street" / "seed0" / "oracle" / "result.json").stat().st_mtime_ns == oracle_result
    res = json.loads((out / "cns_ablation_quick.json").read_text())
    rows = res["datasets"]["street"]["rows"]
    assert list(rows) == ["Oracle (ground truth)", "Baseline", "Post-Refine", "w/o CLIP", "Ours"]  # Table 2 order
    assert all(0 <= rows[r]["2d_mean"] <= 100 and 0 <= rows[r]["3d_mean"] <= 100 for r in rows)
    # Ours and w/o CLIP differ in stage 2 only: both forked from one stage-1 run
    seed0 = work / "street" / "seed0"
    stage1 = [p for p in seed0.iterdir() if p.name.startswith("stage1-")]
    assert len(stage1) == 1 and (stage1[0] / "stage1.done").exists()
    for ablation in ("none", "no_clip_stage2"):
        parent = yaml.safe_load((seed0 / ablation / "config.yaml").read_text())["init_from"]
        assert Path(parent["checkpoint"]) == stage1[0] / "checkpoints" / "last.pth" and parent["epochs_done"] == 1
    # Post-Refine is the full method's networks, post-refined: no run of its own
    ours = json.loads((seed0 / "none" / "result.json").read_text())["rows"]
    assert rows["Post-Refine"]["2d_mean"] == pytest.approx(ours["cns_refined_2d"]["miou"])
    assert rows["Ours"]["3d_mean"] == pytest.approx(ours["cns_3d"]["miou"])
    base = json.loads((seed0 / "baselines.json").read_text())["rows"]
    assert rows["Baseline"]["2d_mean"] == pytest.approx(base["clip_2d"]["miou"])
    md = (out / "cns_ablation_quick.md").read_text()
    assert "| Ours |" in md and "| 28.4 | 33.5 |" in md and "passed" in md
    # the stage-2 premise diagnostic on that seed: recall of each source at the end of the shared stage 1
    names, rec = stage1_recall.stage1_recall(stage1[0], work / "street" / "cache" / "synthetic-train.zarr")
    assert set(rec) == {"clip2d", "net2d", "clip3d", "net3d"} and len(rec["net2d"]) == len(names)
    assert (~rec["clip2d"].isnan()).any()
    assert all((((r >= 0) & (r <= 100)) | r.isnan()).all() for r in rec.values())
    assert stage1_recall.main([str(seed0), "--rows", "none,no_clip_stage2", "--confidence", "0.5"]) == 0
    # what a confidence gate lets through: everything at 0, nothing above 1, never more at a higher threshold
    table = stage1_recall.confidence_coverage(stage1[0], work / "street" / "cache" / "synthetic-train.zarr",
                                              [0.0, 0.3, 0.6, 1.01])
    for rows_ in table.values():
        cover = [r["coverage"] for r in rows_]
        assert cover[0] == 100.0 and cover[-1] == 0.0 and cover == sorted(cover, reverse=True)
        assert 0 <= rows_[0]["acc_above"] <= 100 and rows_[0]["acc_below"] != rows_[0]["acc_below"]  # NaN: none
    # --no-train: the tables from what is there; a row never run is listed, not trained
    assert bench_cns.main([*args, "--oracle-gate", "0", "--no-train", "--rows", "Ours,w/o Refine"]) == 0
    res = json.loads((out / "cns_ablation_quick.json").read_text())
    assert res["datasets"]["street"]["not_run"] == ["w/o Refine"] and "Ours" in res["datasets"]["street"]["rows"]
    assert not (seed0 / "no_refine").exists() and "Not run: w/o Refine." in (out / "cns_ablation_quick.md").read_text()
    # a cached row made with another configuration is refused, not reported
    with pytest.raises(SystemExit, match="another configuration"):
        bench_cns.main([*args, "--oracle-gate", "0", "schedule.lr=0.001"])


def test_stage1_key_ignores_stage2_keys_only():
    spec = bench_cns.DATASETS["street"]
    key = lambda ablation: bench_cns.stage1_key(bench_cns.row_config(spec, ablation, 0, []))  # noqa: E731
    assert key("none") == key("no_clip_stage2") == key("no_cross_training") == key("switch_frame") == key("pred2d_only")
    assert key("no_refine") == key("base_clip_lsc")
    assert len({key("none"), key("no_refine"), key("base_clip"), key("latent_none"), key("oracle")}) == 5
    assert bench_cns.stage1_key(bench_cns.row_config(spec, "none", 1, [])) != key("none")  # the seed


def test_gate_confidence_is_part_of_a_runs_identity_only_where_it_acts():
    spec = bench_cns.DATASETS["rooms16"]
    sha = lambda ablation, *o: bench_cns.config_sha(bench_cns.row_config(spec, ablation, 0, list(o)))  # noqa: E731
    assert sha("none") == sha("none", "labels.gate_confidence=0.9")  # switch_gate none: the key does nothing
    assert sha("gate_agree_sam") == sha("gate_agree_sam", "labels.gate_confidence=0.9")
    assert sha("gate_confidence") != sha("gate_confidence", "labels.gate_confidence=0.9")


def test_rows_of_one_configuration_are_one_run():
    rows = {r.name: r for r in bench_cns.ROWS}
    indoor, street = bench_cns.DATASETS["indoor"], bench_cns.DATASETS["street"]
    run = lambda spec, name: bench_cns.row_run(spec, rows[name], 0, [])[1]  # noqa: E731
    assert bench_cns.row_config(indoor, "none", 0, [])["data"]["images_per_frame"] == 8
    assert run(indoor, "Image numbers 8") == run(indoor, "Ours") == "none"  # Ours' rooms are 8 images a step
    assert run(indoor, "Image numbers 16") == "images_16" and run(indoor, "Post-Refine") == "none"
    assert [run(street, r.name) for r in bench_cns.ROWS if r.ablation and "street" in r.kinds] == [
        r.ablation for r in bench_cns.ROWS if r.ablation and "street" in r.kinds]
    # a row that shares a run is checked against, and trains with, the run's own configuration
    cfg, _ = bench_cns.row_run(indoor, rows["Image numbers 8"], 0, [])
    assert cfg["ablation"] == "none"
    # an override can make two rows one run or keep them apart
    assert bench_cns.row_run(indoor, rows["Image numbers 16"], 0, ["data.images_per_frame=16"])[1] == "none"


def test_gate_is_reached_on_the_seed_mean_in_both_modalities():
    assert bench_cns.reaches_gate([{"2d": 60, "3d": 45}, {"2d": 40, "3d": 56}], 50)
    assert not bench_cns.reaches_gate([{"2d": 60, "3d": 45}, {"2d": 40, "3d": 54}], 50)


def test_make_demo_runs_the_benchmarks_street_regime():
    """make demo's stores and training are the benchmark's streets (README: "the benchmark's street stores"),
    only shorter: its Makefile variables and demo_street_cpu.yaml cannot drift from bench_cns.DATASETS."""
    if shutil.which("make") is None:
        pytest.skip("GNU make is not installed")
    show = "show-demo-streets: ; @echo $(DEMO_SCENES) $(DEMO_VAL_SCENES) $(DEMO_STREETS)"
    out = subprocess.run(["make", "--no-print-directory", "-s", "-C", str(REPO), f"--eval={show}",
                          "show-demo-streets"], check=True, capture_output=True, text=True).stdout.split()
    spec = bench_cns.DATASETS["street"]
    assert [int(out[0]), int(out[1])] == [spec.train_scenes, spec.val_scenes]
    assert out[2::2] == ["--dataset-option"] * len(out[3::2])
    options = {"kind": "street", **{k: str(v) for k, v in spec.options.items()}}
    assert dict(o.split("=", 1) for o in out[3::2]) == options
    demo, bench = load_config("demo_street_cpu"), load_config(spec.config)
    assert (demo["schedule"]["epochs"], demo["schedule"]["warmup_epochs"]) == (40, 20)  # half of them stage 1
    for cfg in (demo, bench):  # what the demo shortens or adds for its report; the rest is the benchmark's
        for section, key in (("schedule", "epochs"), ("schedule", "warmup_epochs"), ("schedule", "log_interval"),
                             ("eval", "interval")):
            cfg[section].pop(key)
    assert demo == bench


def test_unknown_row_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown row"):
        bench_cns.main(["--work", str(tmp_path), "--rows", "Ours,Nonsense"])


def test_rows_by_name_with_commas_or_by_preset():
    names = lambda text: [r.name for r in bench_cns.parse_rows(text)]  # noqa: E731
    assert names("w 2D,Ours, switch per frame") == ["w 2D", "Ours, switch per frame"]
    assert names("Ours,w/o CLIP") == ["Ours", "w/o CLIP"]
    assert names("pred2d_only, switch_frame,none") == ["w 2D", "Ours, switch per frame", "Ours"]
    with pytest.raises(SystemExit, match="unknown row 'switch per frame'"):
        bench_cns.parse_rows("switch per frame")


@pytest.mark.slow
def test_jobs_train_dataset_seed_pairs_side_by_side(tmp_path, capfd):
    """--jobs 2: one run per task in two processes, the first seed's oracle first and gated; the parent collects
    the tables from the runs; a refusal in a worker reaches the parent instead of hanging the pool."""
    work, out = tmp_path / "work", tmp_path / "results"
    args = ["--work", str(work), "--out", str(out), "--rows", "Ours,w/o CLIP", "--seeds", "2", "--jobs", "2", *TINY]
    assert bench_cns.main([*args, "--oracle-gate", "101"]) == 1  # the first seed's oracle, then nothing else
    assert (work / "street" / "seed0" / "oracle" / "result.json").exists()
    for seed in (0, 1):
        assert not (work / "street" / f"seed{seed}" / "none").exists()
    assert not (work / "street" / "seed1" / "oracle").exists()
    assert list(json.loads((out / "cns_ablation_quick.json").read_text())["datasets"]["street"]["rows"]) == [
        "Oracle (ground truth)"]
    assert bench_cns.main([*args, "--oracle-gate", "0"]) == 0
    street = json.loads((out / "cns_ablation_quick.json").read_text())["datasets"]["street"]
    assert list(street["rows"]) == ["Oracle (ground truth)", "w/o CLIP", "Ours"]
    for seed in (0, 1):  # each seed's two rows forked from that seed's one stage-1 run
        runs = work / "street" / f"seed{seed}"
        result = json.loads((runs / "none" / "result.json").read_text())
        assert street["per_seed"]["Ours"][seed]["2d"] == pytest.approx(result["rows"]["cns_2d"]["miou"])
        stage1 = [p for p in runs.iterdir() if p.name.startswith("stage1-")]
        assert len(stage1) == 1 and result["stage1"] == stage1[0].name
        assert json.loads((runs / "no_clip_stage2" / "result.json").read_text())["stage1"] == stage1[0].name
    assert "street/seed1/none" in capfd.readouterr().out  # the log names the dataset and seed of each run
    # a fork stopped after its last checkpoint, before its result: resumed (its recorded parent kept), evaluated
    ours = work / "street" / "seed1" / "none"
    before = json.loads((ours / "result.json").read_text())
    (ours / "result.json").unlink()
    assert bench_cns.main([*args, "--oracle-gate", "0"]) == 0
    after = json.loads((ours / "result.json").read_text())
    assert after["rows"]["cns_2d"] == before["rows"]["cns_2d"] and after["rows"]["cns_3d"] == before["rows"]["cns_3d"]
    assert yaml.safe_load((ours / "config.yaml").read_text())["init_from"]["epochs_done"] == 1
    # a row with fewer seeds than asked (a run in progress) says so in the table
    done = work / "street" / "seed1" / "no_clip_stage2" / "result.json"
    done.rename(done.with_suffix(".away"))
    assert bench_cns.main([*args, "--oracle-gate", "0", "--no-train"]) == 0
    md = (out / "cns_ablation_quick.md").read_text()
    assert "| w/o CLIP (1 of 2 seeds) |" in md and "| Ours |" in md
    done.with_suffix(".away").rename(done)
    # --oracle-seeds 1: the oracle scored (and trained) on the first seed only, and the table says so
    assert bench_cns.main([*args, "--oracle-gate", "0", "--no-train", "--oracle-seeds", "1"]) == 0
    assert len(json.loads((out / "cns_ablation_quick.json").read_text())["datasets"]["street"]["per_seed"][
        "Oracle (ground truth)"]) == 1
    assert "| Oracle (ground truth) (1 of 2 seeds) |" in (out / "cns_ablation_quick.md").read_text()
    with pytest.raises(SystemExit, match="another configuration"):
        bench_cns.main([*args, "--oracle-gate", "0", "schedule.lr=0.001"])


@pytest.mark.slow
def test_label_rows_are_scored_once_over_seeds(tmp_path):
    """With several seeds the label rows score the stores every seed shares, once, without a spread; --jobs
    changes nothing in tables collected without training."""
    tables = {}
    for jobs in (1, 2):
        out = tmp_path / f"results{jobs}"
        args = ["--work", str(tmp_path / f"work{jobs}"), "--out", str(out), "--datasets", "street,indoor",
                "--scenes", "1,1", "--rows", "Baseline,w/o CNS", "--no-train", "--jobs", str(jobs)]
        assert bench_cns.main(args) == 1  # the oracle row has not been run: no gate, so not a pass
        res = json.loads((out / "cns_ablation_quick.json").read_text())
        tables[jobs] = {kind: (block["rows"], block["not_run"]) for kind, block in res["datasets"].items()}
    assert list(tables[2]) == ["street", "indoor"] and tables[2] == tables[1]
    assert tables[2]["indoor"][1] == ["Oracle (ground truth)"] and set(tables[2]["indoor"][0]) == {"Baseline", "w/o CNS"}
    # several seeds: the label rows score the stores every seed shares, once, without a spread
    out = tmp_path / "results_seeds"
    bench_cns.main(["--work", str(tmp_path / "work1"), "--out", str(out), "--datasets", "street", "--scenes", "1,1",
                    "--rows", "Baseline,w/o CNS", "--no-train", "--seeds", "2"])
    street = json.loads((out / "cns_ablation_quick.json").read_text())["datasets"]["street"]
    assert street["rows"]["Baseline"]["2d_std"] is None and len(street["per_seed"]["Baseline"]) == 1
    assert street["rows"]["w/o CNS"] == tables[1]["street"][0]["w/o CNS"]
    md = (out / "cns_ablation_quick.md").read_text()
    assert "| Baseline |" in md and "seeds)" not in md  # label rows: one value for every seed, no count
    assert not (tmp_path / "work1" / "street" / "seed1" / "baselines.json").exists()
    assert "which every seed shares (one value)" in (out / "cns_ablation_quick.md").read_text()


def test_runs_cached_before_point_targets_keep_their_identity():
    """labels.point_targets came after the benchmark's runs were cached: at the value they computed
    (first_pair, pinned in bench_*_cpu.yaml) it is left out of the digests; the paper's pairs is a new run."""
    spec = bench_cns.DATASETS["indoor"]
    cfg = bench_cns.row_config(spec, "none", 0, [])
    assert cfg["labels"]["point_targets"] == "first_pair"
    before = copy.deepcopy(cfg)
    before["labels"].pop("point_targets")  # a resolved configuration of a run made before the key existed
    assert bench_cns.config_sha(cfg) == bench_cns.config_sha(before)
    assert bench_cns.stage1_key(cfg) == bench_cns.stage1_key(before)
    pairs = bench_cns.row_config(spec, "none", 0, ["labels.point_targets=pairs"])
    assert bench_cns.stage1_key(pairs) != bench_cns.stage1_key(cfg)  # it changes stage 1's 3D targets too


def test_rooms16_study_rows_and_stores():
    """`make bench-rooms16`: the benchmark's rooms at 16 images a step with every pair a 3D term, on the indoor
    stores; 'Ours, first pair' is its own run there, and the same run as Ours in the benchmark's rooms."""
    spec, indoor = bench_cns.DATASETS["rooms16"], bench_cns.DATASETS["indoor"]
    assert (spec.kind, spec.stores_of, spec.options, spec.train_scenes) == ("indoor", "indoor", indoor.options, 16)
    first = bench_cns.ROW_OF_PRESET["first_pair"]
    ours, first_cfg = (bench_cns.row_config(spec, a, 0, []) for a in ("none", "first_pair"))
    assert ours["data"]["images_per_frame"] == 16 and ours["labels"]["point_targets"] == "pairs"
    assert first_cfg["labels"]["point_targets"] == "first_pair"
    assert bench_cns.row_run(spec, first, 0, [])[1] == "first_pair"
    assert bench_cns.row_run(indoor, first, 0, [])[1] == "none"  # pinned first_pair: Ours itself
    assert first not in [r for r in bench_cns.ROWS if r.full and "indoor" in r.kinds]  # not a --full row


def test_parallel_tasks_are_one_run_each_first_oracle_first():
    """--jobs' tasks: the first seed's oracle alone in the first phase; then the other seeds' oracles and one task
    per (row, seed), in the table's row order, label rows (no training) left out."""
    rows = bench_cns.parse_rows("Oracle (ground truth),Baseline,w/o SCT,Ours,Ours, first pair")
    first, rest = bench_cns.parallel_tasks(["rooms16"], rows, [0, 1, 2])
    assert [(k, [r.name for r in rs], s) for k, rs, s in first] == [("rooms16", ["Oracle (ground truth)"], 0)]
    assert [(r[0].name, s) for _, r, s in rest["rooms16"]] == [
        ("Oracle (ground truth)", 1), ("Oracle (ground truth)", 2), ("w/o SCT", 0), ("w/o SCT", 1), ("w/o SCT", 2),
        ("Ours", 0), ("Ours", 1), ("Ours", 2), ("Ours, first pair", 0), ("Ours, first pair", 1),
        ("Ours, first pair", 2)]
    first, rest = bench_cns.parallel_tasks(["street"], rows, [0])
    assert [r[0].name for _, r, _ in rest["street"]] == ["w/o SCT", "Ours"]  # first pair is a rooms row
    first, rest = bench_cns.parallel_tasks(["rooms16"], rows, [0, 1, 2], oracle_seeds=1)  # --oracle-seeds 1
    assert [s for _, _, s in first] == [0]
    assert [(r[0].name, s) for _, r, s in rest["rooms16"]][:2] == [("w/o SCT", 0), ("w/o SCT", 1)]
    assert "Oracle (ground truth)" not in {r[0].name for _, r, _ in rest["rooms16"]}


def test_jobs_start_the_tasks_with_most_epochs_left(tmp_path):
    """--jobs orders its tasks by the epochs they still train: a run whose stage-1 run is still to train counts
    it, a fork of a done stage-1 run counts stage 2 only, a run with its result counts nothing."""
    import argparse
    a = argparse.Namespace(work=tmp_path, full=False, overrides=[])
    spec, root = bench_cns.DATASETS["rooms16"], tmp_path / "rooms16"
    ours, first_pair = bench_cns.parse_rows("Ours,Ours, first pair")
    assert bench_cns.epochs_to_train((spec, root), [ours], 0, a) == 60
    cfg, run_name = bench_cns.row_run(spec, ours, 0, [])
    stage1 = root / "seed0" / f"stage1-{bench_cns.stage1_key(cfg)}"
    stage1.mkdir(parents=True)
    (stage1 / "stage1.done").write_text("")
    s = cfg["schedule"]
    assert bench_cns.epochs_to_train((spec, root), [ours], 0, a) == s["epochs"] - s["warmup_epochs"] == 40
    assert bench_cns.epochs_to_train((spec, root), [first_pair], 0, a) == 60  # its own stage 1 (other targets)
    (root / "seed0" / run_name).mkdir()
    (root / "seed0" / run_name / "result.json").write_text("{}")
    assert bench_cns.epochs_to_train((spec, root), [ours, first_pair], 0, a) == 60
