"""Faults injected on purpose (issue 22): a deleted chunk, flipped bytes, a truncated root ``zarr.json``, a run
that failed before any shard was done, a typo or a wrong type in a training configuration, a read-only store.

Each ends in one line naming what is at fault, exit code 2 for a user error (1 for ``cache validate`` of a store
that fails a check), and nothing lost: a rerun of ``labels`` refills what was deleted, bit for bit.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from data_cache import schema
from data_cache.errors import one_line
from data_cache.integrity import read_guard
from data_cache.store import CacheError, Store, sha256_file
from tests.toy_store import build_toy_store

REPO = Path(__file__).resolve().parents[1]
DATASET = ["--dataset", "synthetic", "--dataset-option", "num_scenes=1", "--dataset-option", "seed=3"]
LABELS = ["labels", *DATASET, "--stages", "correspond,maskclip", "--workers", "0", "--shard-size", "1",
          "--no-progress", "--test-tiny-models"]
#: one chunk (zarr shard) file of each kind: every point of the store, the first 16 images, their CLIP labels
LOST = ("points/xyz/c/0/0", "images/rgb/c/0/0/0/0", "clip/label/c/0/0/0")


def _arrays(path) -> dict:
    store = Store(path, consolidated=False)
    return {a.name: store.array(a.name)[...] for a in schema.ARRAYS if a.name in store}


def _copy(store: Path, folder: Path) -> Path:
    dst = folder / store.name
    shutil.copytree(store, dst)
    return dst


def _one_line_error(result, *parts) -> str:
    """The command failed with exit code 2 and one line ``Error: ...`` holding every one of ``parts`` (besides
    the warnings a command prints anyway, e.g. for --test-tiny-models), no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("WARNING: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A synthetic store (1 frame, 6 images) after correspond and maskclip (tiny CLIP), and its arrays."""
    cache = tmp_path_factory.mktemp("labelled")
    result = CliRunner().invoke(main, [*LABELS, "--cache", str(cache)])
    assert result.exit_code == 0, result.output
    store = cache / "synthetic-train.zarr"
    return store, _arrays(store)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """A complete toy store (every stage) that training and inspection accept."""
    return build_toy_store(tmp_path_factory.mktemp("toy") / "toy-train.zarr", num_frames=2, num_images=2)


def test_deleted_chunks_are_named_and_labels_refills_them(labelled, tmp_path, caplog):
    source, before = labelled
    store = _copy(source, tmp_path)
    for key in LOST:
        (store / key).unlink()
    runner = CliRunner()
    validated = runner.invoke(main, ["cache", "validate", str(store)])
    assert validated.exit_code == 1, validated.output
    for key in LOST:
        array, chunk = key.split("/c/")
        assert f"{array} chunk c/{chunk} (rows 0-" in validated.output and "frame 0)" in validated.output, key
    status = runner.invoke(main, ["cache", "status", str(store)])
    assert status.exit_code == 0 and "WARNING: 3 chunk file(s) missing" in status.output, status.output

    with caplog.at_level(logging.WARNING, logger="cns.labels"):
        rerun = runner.invoke(main, [*LABELS, "--cache", str(store.parent)])
    assert rerun.exit_code == 0, rerun.output
    assert "redoing stage 'correspond' shard(s) 0: 2 chunk file(s) missing: points/xyz chunk c/0/0" in caplog.text
    assert "redoing stage 'maskclip' shard(s) 0: 1 chunk file(s) missing: clip/label chunk c/0/0/0" in caplog.text
    after = _arrays(store)
    assert after.keys() == before.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert runner.invoke(main, ["cache", "validate", "--deep", str(store)]).exit_code == 0
    assert not (store / schema.PARTS_DIR).exists()  # the redone correspond shard's part file is removed


def test_readers_refuse_a_store_with_a_missing_chunk(toy, tmp_path):
    store = _copy(toy, tmp_path)
    (store / "points/xyz/c/0/0").unlink()
    runner = CliRunner()
    _one_line_error(runner.invoke(main, ["inspect", "summary", str(store)]), "points/xyz chunk c/0/0", "frames 0-1")
    out = tmp_path / "run"
    _one_line_error(runner.invoke(main, ["train", "--cache", str(store), "--out", str(out), "--config",
                                         "synthetic_street_cpu", "model.pretrained_2d=false"]),
                    "points/xyz chunk c/0/0", "lost data")
    assert not out.exists()
    from train.predict import StoreFrames
    with pytest.raises(CacheError, match="points/xyz chunk c/0/0"):  # predict's reader refuses it too
        StoreFrames(store)


def _flip_byte(path: Path, offset: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_found_by_deep_validate_and_named_by_readers(toy, tmp_path):
    from train.config import load_config
    from train.data import CacheFrameDataset
    store = _copy(toy, tmp_path)
    _flip_byte(store / "images/rgb/c/0/0/0/0")  # inside the first image's compressed chunk
    runner = CliRunner()
    assert runner.invoke(main, ["cache", "validate", str(store)]).exit_code == 0  # a listing reads no image
    deep = runner.invoke(main, ["cache", "validate", "--deep", str(store)])
    assert deep.exit_code == 1
    assert "images/rgb chunk c/0/0/0/0 (rows 0-3, frames 0-1) cannot be decoded: ValueError: Stored and computed " \
           "checksum do not match" in deep.output, deep.output
    dataset = CacheFrameDataset([store], load_config("synthetic_street_cpu"), train=False)
    with pytest.raises(CacheError) as caught:
        dataset[0]
    message = str(caught.value)
    assert "\n" not in message and "images/rgb chunk c/0/0/0/0 (rows 0-3, frames 0-1) cannot be decoded" in message
    # from a DataLoader worker the error comes back with the worker's traceback in its message: still one line
    from torch.utils.data import DataLoader
    with pytest.raises(CacheError) as caught:
        next(iter(DataLoader(dataset, batch_size=None, num_workers=1)))
    assert "\n" in str(caught.value) and one_line(caught.value) == message
    _one_line_error(runner.invoke(main, ["inspect", "frame", str(store), "0", "--out", str(tmp_path / "pics")]),
                    "images/rgb chunk c/0/0/0/0", "cannot be decoded", "validate --deep")
    from train.predict import StoreFrames
    with pytest.raises(CacheError) as caught:  # predict's reader names the chunk in one line
        StoreFrames(store).read(0)
    assert "\n" not in str(caught.value) and "images/rgb chunk c/0/0/0/0" in str(caught.value)


def test_read_guard_lets_other_errors_through(toy):
    """An error inside the guard that no damaged chunk explains is not turned into a store error."""
    with pytest.raises(ValueError, match="not a chunk problem"):
        with read_guard(Store(toy), frames=(0, 1)):
            raise ValueError("not a chunk problem")


def test_truncated_root_metadata_is_one_line_naming_the_file(toy, tmp_path):
    store = _copy(toy, tmp_path)
    meta = store / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:100])
    runner = CliRunner()
    for args in (["cache", "validate", str(store)], ["cache", "status", str(store)],
                 ["inspect", "summary", str(store)]):
        _one_line_error(runner.invoke(main, args), f"{meta} is damaged")


def test_a_failed_run_does_not_pin_its_configuration(labelled, tmp_path):
    source, _ = labelled
    store = _copy(source, tmp_path)
    shutil.rmtree(store / schema.DONE_DIR / "maskclip")  # as if maskclip had never run on this store
    meta = json.loads((store / "zarr.json").read_text())
    del meta["attributes"]["cns"]["stages"]["maskclip"]
    (store / "zarr.json").write_text(json.dumps(meta))
    (store / "zarr.json.consolidated").unlink(missing_ok=True)
    bad = tmp_path / "not-a-clip.pt"
    bad.write_bytes(b"not a checkpoint")
    base = ["labels", *DATASET, "--cache", str(store.parent), "--stages", "maskclip", "--workers", "0",
            "--shard-size", "1", "--no-progress"]
    runner = CliRunner()
    failed = runner.invoke(main, [*base, "--clip-checkpoint", str(bad)])
    assert failed.exit_code != 0
    recorded = Store(store).raw_attrs["stages"]["maskclip"]
    assert recorded["checkpoint_sha256"] == sha256_file(bad) and not Store(store).done_shards("maskclip")
    corrected = runner.invoke(main, [*base, "--test-tiny-models"])  # refused ("rerun with --overwrite") before
    assert corrected.exit_code == 0, corrected.output
    assert Store(store).raw_attrs["stages"]["maskclip"]["config"]["tiny"] is True

    # a stage with done shards still refuses another configuration, with a command that can be pasted as is
    refused = runner.invoke(main, [*base, "--test-tiny-models", "--stage-option", "maskclip.feat_dim=8"])
    line = _one_line_error(refused, "feat_dim", "to redo it (and the stages that read it): cns-cli labels")
    words = shlex.split(line.split("read it): ", 1)[1])
    for option in (["--dataset", "synthetic"], ["--split", "train"], ["--cache", str(store.parent)],
                   ["--dataset-option", "num_scenes=1"], ["--dataset-option", "seed=3"],
                   ["--stages", "maskclip,refine"]):
        assert any(words[i:i + 2] == option for i in range(len(words))), (option, words)
    assert words[-1] == "--overwrite"


CONFIG_PROBE = """
import sys, time
from click.testing import CliRunner
from cli import main
t0 = time.perf_counter()
result = CliRunner().invoke(main, sys.argv[1:])
print(result.exit_code, "torch" in sys.modules, "spconv" in sys.modules, round(time.perf_counter() - t0, 2))
print(result.output.strip())
"""


@pytest.mark.parametrize("verb, override, parts", [
    ("train", "schedule.lr=abc", ("schedule.lr takes a number", "'abc'")),
    ("train", "data.batch_size=0", ("data.batch_size takes an integer >= 1", "got 0")),
    ("train", "schedule.lrr=0.1", ("unknown configuration key 'schedule.lrr'",)),
    ("train", "ablation=no_such", ("unknown ablation 'no_such'",)),
    ("eval", "data.augment.hflip=maybe", ("data.augment.hflip takes true or false",)),
])
def test_bad_configuration_is_refused_before_torch_and_writes_nothing(toy, tmp_path, verb, override, parts):
    out = tmp_path / "run"
    args = ["--cache", str(toy), "--config", "synthetic_street_cpu", override]
    args = ["train", *args, "--out", str(out)] if verb == "train" else ["eval", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", CONFIG_PROBE, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    status, output = proc.stdout.split("\n", 1)
    code, torch_loaded, spconv_loaded, seconds = status.split()
    assert (code, torch_loaded, spconv_loaded) == ("2", "False", "False"), proc.stdout + proc.stderr
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and all(p in lines[0] for p in parts), output
    assert float(seconds) < 5
    assert not out.exists()


#: root writes through any permission bits (CAP_DAC_OVERRIDE): as root, the commands run without that capability
AS_USER = (["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]
           if os.geteuid() == 0 and shutil.which("setpriv") else [])


@pytest.mark.skipif(os.geteuid() == 0 and not AS_USER, reason="root without setpriv writes to a chmod a-w store")
def test_read_only_store_is_one_line(labelled, tmp_path):
    """``chmod -R a-w`` on the store: ``labels`` says so in one line, ``cache validate`` still reads it."""
    source, _ = labelled
    folder = tmp_path / "cache"
    folder.mkdir()
    try:
        store = _copy(source, folder)
        subprocess.run(["chmod", "-R", "a-w", str(store)], check=True)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run([*AS_USER, sys.executable, "-m", "cli", *LABELS, "--cache", str(folder)], cwd=folder,
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
        assert lines == [f"Error: {store} is read-only (no write permission on it or its folders): this command "
                         f"writes to the store; make it writable or write a copy elsewhere"], proc.stderr
        assert "Traceback" not in proc.stderr
        validated = subprocess.run([*AS_USER, sys.executable, "-m", "cli", "cache", "validate", str(store)],
                                   cwd=folder, env=env, capture_output=True, text=True, timeout=120)
        assert validated.returncode == 0, validated.stdout + validated.stderr  # reading needs no write
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(folder)], check=True)


# -- the faults of several jobs on one store (issue 22 points 4-5: two jobs at once, a stale lease after SIGKILL,
# a multi-process dask cluster) and of a checkpoint of another architecture (point 3) -------------------------
# Their fixtures and helpers live in their own modules; the tests are collected here, so that this file is the
# one list of every injected fault.
from tests.faults_checkpoint import (  # noqa: E402,F401
    correspond_store, test_detector_names_every_real_architecture,
    test_wrong_architecture_checkpoint_is_one_line_and_exit_2)
from tests.faults_jobs import (  # noqa: E402,F401
    reference, test_a_lease_of_a_dead_process_on_this_host_is_taken_at_once,
    test_a_live_lease_is_not_taken_and_a_heartbeat_keeps_it, test_a_recomputed_task_does_not_redo_a_done_shard,
    test_dask_scheduler_and_worker_processes_equal_in_process, test_one_of_several_claimants_gets_a_lease,
    test_stage_bars_count_frames_per_stage_once, test_stale_lease_of_a_killed_job_is_taken_over,
    test_two_jobs_at_once_split_the_shards_and_equal_one_job, test_worker_events_name_their_cause)
