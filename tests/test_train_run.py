"""End-to-end CPU runs: both stages + eval tables, same-seed repeatability, kill-and-resume, every ablation
switch, DDP (gloo, 2 processes), refusals of mismatched stores, open-vocabulary evaluation."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from tests.toy_store import TOY_CLASSES, build_toy_store
from train.commands import eval_cmd, train
from train.config import ABLATIONS, ConfigError, load_config
from train.engine import StoreMismatch, Trainer, check_stores

REPO = Path(__file__).resolve().parents[1]
# 3 epochs (1 in stage 1), 2 steps each on 4 frames; evaluation only after the last epoch
ONE_THREAD_ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread here and in the subprocesses: on a shared 2-core machine, OpenMP threads that
    spin while another process holds a core make CPU runs 10x slower; one thread also keeps the in-process
    and the subprocess runs bitwise comparable."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


RUN_ARGS = ["schedule.epochs=3", "schedule.warmup_epochs=1", "eval.interval=0", "data.batch_size=2"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return build_toy_store(tmp_path_factory.mktemp("run") / "toy.zarr", num_frames=4, num_images=3)


@pytest.fixture(scope="module")
def straight_run(toy, tmp_path_factory):
    """The reference run through the CLI."""
    out = tmp_path_factory.mktemp("straight") / "run"
    res = CliRunner().invoke(train, ["--cache", str(toy), "--config", "synthetic_street_cpu", "--out", str(out),
                                     "--seed", "3", "--device", "cpu", *RUN_ARGS], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out, res.output


def _metrics(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pth", map_location="cpu", weights_only=False)["model"]


def test_short_run_both_stages_and_eval_tables(straight_run, toy):
    run, output = straight_run
    assert output.strip().splitlines()[-1] == f"run directory: {run}  checkpoint: {run / 'checkpoints' / 'last.pth'}"
    recs = _metrics(run)
    stages = {r["stage"] for r in recs if r["type"] == "train"}
    assert stages == {1, 2}
    stage2 = [r for r in recs if r["type"] == "train" and r["stage"] == 2]
    stage1 = [r for r in recs if r["type"] == "train" and r["stage"] == 1]
    assert all(r["share2d_clip2d"] > 0.5 and "share2d_pred3d" not in r for r in stage1)
    for r in stage2:  # every source supervises part of each step (per-pair switching), none dominates
        for dim in ("2d", "3d"):
            shares = [r[f"share{dim}_{n}"] for n in ("clip2d", "clip3d", "pred2d", "pred3d")]
            assert min(shares) > 0.05 and sum(shares) + r[f"share{dim}_none"] == pytest.approx(1)
    assert all(np.isfinite(r["loss"]) for r in recs if r["type"] == "train")
    assert any(r["type"] == "eval" for r in recs)
    assert "CNS 3D net" in output and "CNS 2D net" in output
    dumped = yaml.safe_load((run / "config.yaml").read_text())
    assert dumped["ablation"] == "none" and dumped["labels"]["refine"] is True
    assert dumped["data"]["class_names"] == list(TOY_CLASSES) and dumped["data"]["text_embed_sha256"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "epoch_001.pth", "epoch_002.pth", "epoch_003.pth", "last.pth"]
    lean = run.parent / "lean"  # schedule.keep_checkpoints prunes old epoch files
    cfg = load_config("synthetic_street_cpu", RUN_ARGS + ["seed=3", "schedule.keep_checkpoints=1", "eval.at_end=false"])
    Trainer(cfg, [toy], lean, device="cpu", progress=False).train()
    assert sorted(p.name for p in (lean / "checkpoints").iterdir()) == ["epoch_003.pth", "last.pth"]
    assert list((run / "tb").glob("events.out.tfevents.*"))

    res = CliRunner().invoke(eval_cmd, ["--cache", str(toy), "--run", str(run), "--device", "cpu",
                                        "--export", str(run / "pred")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    for title in ("CLIP labels (MaskCLIP), 2D", "CLIP labels projected, 3D, all points",
                  "CLIP labels projected, 3D, paired points only", "w/o CNS", "CNS 3D net", "CNS 2D net",
                  "evaluated on: toy-train", "2D ground truth: images/gt"):
        assert title in res.output
    assert "reported in the paper" not in res.output  # the paper has no numbers for a toy store
    result = json.loads((run / "eval" / "metrics.json").read_text())
    # the toy's CLIP labels are 20-25 % noisy and its SAM masks are the true regions
    assert result["rows"]["wo_cns_2d"]["miou"] > result["rows"]["clip_2d"]["miou"] + 10
    assert (run / "eval" / "config.yaml").exists()
    bins = sorted((run / "pred" / "points").glob("*_lidarseg.bin"))
    assert len(bins) == 4 and len(list((run / "pred" / "images").glob("*.png"))) == 12
    n0 = np.fromfile(bins[0], dtype=np.uint8)
    assert n0.max() < len(TOY_CLASSES)


def test_same_seed_is_repeatable(straight_run, toy, tmp_path):
    run, _ = straight_run
    cfg = load_config("synthetic_street_cpu", RUN_ARGS + ["seed=3"])
    Trainer(cfg, [toy], tmp_path / "again", device="cpu", progress=False).train()
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("frames_per_s", "data_wait_share")} for r in rs]  # noqa
    assert strip(_metrics(tmp_path / "again")) == strip(_metrics(run))
    a, b = _weights(run), _weights(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loader_workers_do_not_change_the_run(straight_run, toy, tmp_path):
    """2 persistent workers: each item is seeded by (seed, epoch, index), the epoch riding in the index."""
    run, _ = straight_run
    cfg = load_config("synthetic_street_cpu", RUN_ARGS + ["seed=3", "data.num_workers=2"])
    trainer = Trainer(cfg, [toy], tmp_path / "workers", device="cpu", progress=False)
    assert trainer.loader.persistent_workers
    trainer.train()
    a, b = _weights(run), _weights(tmp_path / "workers")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_and_resume_matches_the_straight_run(straight_run, toy, tmp_path):
    run, _ = straight_run
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "train.commands", "train", "--cache", str(toy), "--config", "synthetic_street_cpu",
           "--out", str(out), "--seed", "3", "--device", "cpu", *RUN_ARGS]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ONE_THREAD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "checkpoints" / "epoch_001.pth"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists(), proc.stderr.read().decode()[-2000:]
    assert not (out / "checkpoints" / "epoch_003.pth").exists(), "the run ended before it could be killed"
    last = out / "checkpoints" / "last.pth"
    done = torch.load(last, map_location="cpu", weights_only=False)["epoch"] + 1  # epochs the killed run finished
    res = CliRunner().invoke(train, ["--cache", str(toy), "--out", str(out), "--resume", "--device", "cpu"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert f"resuming {out} at epoch {done + 1} of 3 (from {last})" in res.output
    assert res.output.strip().splitlines()[-1] == f"run directory: {out}  checkpoint: {last}"
    a, b = _weights(run), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ev = lambda r: [x for x in _metrics(r) if x["type"] == "eval"]  # noqa: E731
    assert ev(out) == ev(run)
    steps = [r["step"] for r in _metrics(out) if r["type"] == "train"]
    assert steps == sorted(set(steps)) == list(range(1, 7))  # no duplicated lines from the killed epoch


def test_batchnorm_statistics_are_recalibrated_before_evaluation(straight_run, toy, tmp_path):
    """After a short run the running statistics (momentum 0.01 in MobileNetV3) are still mostly their initial
    values; re-estimated before the final checkpoint, eval mode scores like the batch statistics do."""
    from train.evaluate import evaluate
    run, _ = straight_run
    cfg = load_config(run / "config.yaml")

    def scores(model, batch_statistics):
        rows = evaluate(model, [toy], cfg, "cpu", with_baselines=False, batch_statistics=batch_statistics)["rows"]
        return np.array([rows["cns_2d"]["miou"], rows["cns_3d"]["miou"]])

    def model_of(path):
        from train.models import load_trained_model
        return load_trained_model(cfg, path / "checkpoints" / "last.pth", check_stores([toy], cfg, False), "cpu")

    model, state = model_of(run)
    assert state["bn_recalibration"]["images"] == 12  # all 4 frames x 3 images (fewer than 256)
    assert [r["bn_recalibration_images"] for r in _metrics(run) if r["type"] == "eval"] == [12]
    assert np.abs(scores(model, False) - scores(model, True)).max() < 2.0
    # the same run without the re-estimation: eval mode falls well behind the batch statistics (3D)
    cfg0 = load_config("synthetic_street_cpu", RUN_ARGS + ["seed=3", "eval.bn_recalibration_images=0",
                                                           "eval.at_end=false"])
    Trainer(cfg0, [toy], tmp_path / "stale", device="cpu", progress=False).train()
    stale, _ = model_of(tmp_path / "stale")
    assert (scores(stale, True) - scores(stale, False)).max() > 5.0


def test_training_evaluates_on_the_val_store_beside_the_training_store(tmp_path):
    train_store = build_toy_store(tmp_path / "toy-train.zarr", num_frames=2, num_images=2)
    args = ["--cache", str(train_store), "--config", "synthetic_street_cpu", "--device", "cpu",
            "schedule.epochs=1", "schedule.warmup_epochs=1", "eval.bn_recalibration_images=2"]
    res = CliRunner().invoke(train, args + ["--out", str(tmp_path / "no_val")], catch_exceptions=False)
    assert res.exit_code == 0 and "evaluating on toy-train -- the training stores themselves" in res.output
    ev = [r for r in _metrics(tmp_path / "no_val") if r["type"] == "eval"]
    assert ev[0]["eval_stores"] == "toy-train" and ev[0]["held_out"] is False
    from data_cache.store import Store
    build_toy_store(tmp_path / "toy-val.zarr", num_frames=1, num_images=2, seed=4, split="val",
                    text_embed=np.asarray(Store(train_store).array("clip/text_embed")[:]))
    res = CliRunner().invoke(train, args + ["--out", str(tmp_path / "val")], catch_exceptions=False)
    assert res.exit_code == 0 and "evaluating on toy-val" in res.output
    ev = [r for r in _metrics(tmp_path / "val") if r["type"] == "eval"]
    assert ev[0]["eval_stores"] == "toy-val" and ev[0]["held_out"] is True
    assert "evaluated on: toy-val" in res.output


def test_init_from_a_shared_stage1_run_equals_the_straight_ablation_run(toy, tmp_path):
    """A Table 2 row that differs only in stage 2, forked from the full method's stage-1 checkpoint, ends with
    the weights of the same row trained from scratch (the per-epoch reseeding makes them bitwise equal)."""
    parent = tmp_path / "stage1"
    cfg = load_config("synthetic_street_cpu", RUN_ARGS + ["seed=3", "eval.at_end=false"])
    Trainer(cfg, [toy], parent, device="cpu", progress=False).train(stop_after_epochs=1)  # stage 1 only
    child_args = RUN_ARGS + ["seed=3", "eval.at_end=false", "ablation=no_clip_stage2"]
    straight = tmp_path / "straight"
    Trainer(load_config("synthetic_street_cpu", child_args), [toy], straight, device="cpu", progress=False).train()
    fork = tmp_path / "fork"
    res = CliRunner().invoke(train, ["--cache", str(toy), "--config", "synthetic_street_cpu", "--out", str(fork),
                                     "--device", "cpu", "--init-from", str(parent / "checkpoints" / "last.pth"),
                                     *child_args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    a, b = _weights(straight), _weights(fork)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in _metrics(fork) if r["type"] == "train"]
    assert steps == [3, 4, 5, 6]  # epochs 2 and 3 only: epoch 1 came from the parent
    dumped = yaml.safe_load((fork / "config.yaml").read_text())
    assert dumped["init_from"]["epochs_done"] == 1 and dumped["init_from"]["parent_ablation"] == "none"
    assert dumped["init_from"]["changed_keys"] == ["ablation: 'none' -> 'no_clip_stage2'",
                                                   "labels.stage2_sources: ['clip2d', 'clip3d', 'pred2d', "
                                                   "'pred3d'] -> ['pred2d', 'pred3d']"]
    # a child with another head (no latent term) takes the shared weights and starts SGD afresh
    other = load_config("synthetic_street_cpu", RUN_ARGS + ["seed=3", "eval.at_end=false", "ablation=latent_none"])
    t = Trainer(other, [toy], tmp_path / "nohead", device="cpu", progress=False,
                init_from=parent / "checkpoints" / "last.pth")
    assert t.start_epoch == 1 and t.model.phi_f is None
    assert torch.equal(t.model.state_dict()["phi_s.weight"], _weights(parent)["phi_s.weight"])
    # that fork killed before its first checkpoint: a resume starts from the parent again, without the
    # metric lines the killed process wrote
    with open(tmp_path / "nohead" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"type": "train", "epoch": 1, "step": 3}) + "\n")
    again = Trainer(load_config(tmp_path / "nohead" / "config.yaml"), [toy], tmp_path / "nohead", device="cpu",
                    progress=False, resume=True)
    assert again.start_epoch == 1 and again.global_step == 2
    assert (tmp_path / "nohead" / "metrics.jsonl").read_text() == ""
    short = load_config("synthetic_street_cpu", ["schedule.epochs=1", "schedule.warmup_epochs=1"])
    with pytest.raises(ConfigError, match="has done 1 epochs"):
        Trainer(short, [toy], tmp_path / "short", device="cpu", progress=False,
                init_from=parent / "checkpoints" / "last.pth")


def test_resume_with_another_configuration_is_refused(straight_run, toy):
    run, _ = straight_run
    res = CliRunner().invoke(train, ["--cache", str(toy), "--out", str(run), "--resume", "--device", "cpu",
                                     "--config", "synthetic_street_cpu", "schedule.lr=0.5", *RUN_ARGS, "seed=3"])
    assert res.exit_code != 0 and "schedule.lr" in res.output
    res = CliRunner().invoke(train, ["--cache", str(toy), "--out", str(run), "--config", "synthetic_street_cpu"])
    assert res.exit_code != 0 and "--resume" in res.output


@pytest.fixture(scope="module")
def two_frames(tmp_path_factory):
    return build_toy_store(tmp_path_factory.mktemp("two") / "two.zarr", num_frames=2, num_images=2, seed=5)


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_every_ablation_switch_runs(ablation, two_frames, tmp_path):
    # one stage-2 step each; only the inference switch needs the evaluation
    cfg = load_config("synthetic_street_cpu", [f"ablation={ablation}", "schedule.epochs=1", "schedule.warmup_epochs=0",
                                               "data.batch_size=2", "eval.interval=0",
                                               f"eval.at_end={ablation == 'post_refine'}"])
    trainer = Trainer(cfg, [two_frames], tmp_path / ablation, device="cpu", progress=False)
    res = trainer.train()
    assert np.isfinite([r["loss"] for r in _metrics(tmp_path / ablation) if r["type"] == "train"]).all()
    dumped = yaml.safe_load((tmp_path / ablation / "config.yaml").read_text())
    assert dumped["ablation"] == ablation
    for key, value in ABLATIONS[ablation].items():  # the switches are recorded in the dump
        node = dumped
        for part in key.split("."):
            node = node[part]
        assert node == value
    if ablation == "post_refine":
        assert res[-1]["rows"]["headline_3d"] == res[-1]["rows"]["cns_refined_3d"]
        assert res[-1]["rows"]["headline_2d"] == res[-1]["rows"]["cns_refined_2d"]
    rec = [r for r in _metrics(tmp_path / ablation) if r["type"] == "train"][0]
    if ablation == "latent_none":
        assert rec["latent2d"] == 0 and rec["latent3d"] == 0
    shares = {k for k in rec if k.startswith("share2d_") and k != "share2d_none"}
    allowed = {"no_clip_stage2": {"pred2d", "pred3d"}, "pred2d_only": {"pred2d"}, "pred3d_only": {"pred3d"},
               "base_clip": {"clip2d"}, "base_clip_lsc": {"clip2d"}, "oracle": {"gt"}}
    if ablation in allowed:
        assert shares == {f"share2d_{n}" for n in allowed[ablation]}
    if ablation == "switch_frame":
        assert len(rec["targets2d"].split(",")) == 2  # one draw per frame


# -- refusals ---------------------------------------------------------------------------------------
def test_mismatched_stores_are_refused(toy, tmp_path):
    cfg = lambda: load_config("synthetic_street_cpu")  # noqa: E731
    v2 = build_toy_store(tmp_path / "v2.zarr", num_frames=1, num_images=2, schema_version=2)
    with pytest.raises(StoreMismatch, match="schema version 2"):
        check_stores([v2], cfg())
    classes = build_toy_store(tmp_path / "cls.zarr", num_frames=1, num_images=2,
                              class_names=("ground", "car", "bush", "building"))
    with pytest.raises(StoreMismatch, match="class list.*'bush'"):
        check_stores([toy, classes], cfg())
    other_text = build_toy_store(tmp_path / "text.zarr", num_frames=1, num_images=2, seed=9)
    with pytest.raises(StoreMismatch, match="clip/text_embed"):
        check_stores([toy, other_text], cfg())
    no_sam = build_toy_store(tmp_path / "nosam.zarr", num_frames=1, num_images=2, stages=("correspond", "maskclip"))
    with pytest.raises(StoreMismatch, match=r"sam, refine not complete; run cns-cli labels --dataset toy "
                                            r"--split train .*--stages sam,refine"):
        check_stores([no_sam], cfg())
    pinned = load_config("synthetic_street_cpu", {"data.class_names": ["a", "b", "c", "d"]})
    with pytest.raises(StoreMismatch, match="data.class_names"):
        check_stores([toy], pinned)
    res = CliRunner().invoke(train, ["--cache", str(toy), "--cache", str(other_text), "--out", str(tmp_path / "r"),
                                     "--config", "synthetic_street_cpu"])
    assert res.exit_code != 0 and "clip/text_embed" in res.output


def test_missing_pretrained_weights_is_an_error(monkeypatch):
    from torchvision.models import MobileNet_V3_Large_Weights

    from train.models import MODELS_2D, PretrainedWeightsError

    def offline(self, *a, **k):
        raise OSError("no network")
    monkeypatch.setattr(type(MobileNet_V3_Large_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(PretrainedWeightsError, match="--no-pretrained-2d"):
        MODELS_2D.get("deeplabv3_mobilenet_v3")(pretrained=True)
    MODELS_2D.get("deeplabv3_mobilenet_v3")(pretrained=False)  # from scratch is fine when asked for


def test_open_vocabulary_reordered_classes_give_the_same_miou(straight_run, toy, monkeypatch, tmp_path):
    """--classes re-embeds names with the CLIP text tower (faked here with the store's own embeddings):
    the same classes in another order must give permuted predictions and the same mIoU."""
    run, _ = straight_run
    from data_cache.store import Store
    embed = np.asarray(Store(toy).array("clip/text_embed")[:])
    calls = []

    def build_text_embeddings(class_names, model=None, pretrained=None, checkpoint=None, tiny=False, device="cpu"):
        calls.append(list(class_names))
        return torch.from_numpy(embed[[TOY_CLASSES.index(n) for n in class_names]]) * 3.0  # unnormalised

    fake = types.ModuleType("pipeline.models.maskclip")
    fake.build_text_embeddings = build_text_embeddings
    if "pipeline.models" not in sys.modules:
        monkeypatch.setitem(sys.modules, "pipeline.models", types.ModuleType("pipeline.models"))
    monkeypatch.setitem(sys.modules, "pipeline.models.maskclip", fake)
    res = CliRunner().invoke(eval_cmd, ["--cache", str(toy), "--run", str(run), "--device", "cpu",
                                        "--classes", "building,tree,car,ground", "--out", str(tmp_path / "ov.json")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert calls == [["building", "tree", "car", "ground"]]
    ov = json.loads((tmp_path / "ov.json").read_text())
    res = CliRunner().invoke(eval_cmd, ["--cache", str(toy), "--run", str(run), "--device", "cpu",
                                        "--out", str(tmp_path / "base.json")], catch_exceptions=False)
    base = json.loads((tmp_path / "base.json").read_text())
    assert ov["open_vocabulary"] and "clip_2d" not in ov["rows"]
    for key in ("cns_3d", "cns_2d"):
        assert ov["rows"][key]["miou"] == pytest.approx(base["rows"][key]["miou"], abs=1e-6)
        assert ov["rows"][key]["iou"]["car"] == base["rows"][key]["iou"]["car"]


# -- DDP --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo(toy, tmp_path):
    out = tmp_path / "ddp"
    env = ONE_THREAD_ENV
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "train.commands", "train", "--cache", str(toy),
           "--config", "synthetic_street_cpu", "--out", str(out), "--device", "cpu", "schedule.epochs=1",
           "schedule.warmup_epochs=0", "data.batch_size=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = _metrics(out)
    # 4 frames over 2 ranks at 1 frame per step: 2 steps, logged once (rank 0); the replicas' checksums
    # were compared at the end of training (a divergence raises)
    assert [r["step"] for r in recs if r["type"] == "train"] == [1, 2]
    assert (out / "checkpoints" / "last.pth").exists()


def test_readme_python_example_runs(straight_run, toy):
    """The README's Python example (open a store, read labels, predict a frame with a run) on the toy store."""
    run, _ = straight_run
    block = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    code = block.replace("runs/demo/cache/synthetic-val.zarr", str(toy)).replace("runs/demo/run", str(run))
    assert str(toy) in code and str(run) in code
    names: dict = {}
    exec(compile(code, "README.md", "exec"), names)  # noqa: S102 (the README's own code)
    store, pred = names["store"], names["pred"]
    starts, points = store.offsets("images"), store.offsets("points")
    assert names["labels"].shape == (starts[1] - starts[0], *store.attrs.image_size)
    assert pred["pred2d"].shape == names["labels"].shape
    assert pred["pred3d"].shape == (points[1] - points[0],)
