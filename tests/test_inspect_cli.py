"""`cns-cli inspect`: bad inputs end with one clear line and exit code 2, and nothing is written."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from cli import main
from data_cache import schema
from tests.toy_store import build_toy_store


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good = build_toy_store(root / "toy.zarr", num_frames=2, num_images=3)
    newer = build_toy_store(root / "newer.zarr", num_frames=1, num_images=1,
                            schema_version=schema.SCHEMA_VERSION + 1)
    (root / "plain").mkdir()
    run = root / "not_a_run"
    run.mkdir()
    return {"good": good, "newer": newer, "plain": root / "plain", "missing": root / "missing.zarr", "run": run}


CASES = [
    (["summary", "{plain}"], "is not a CNS store"),
    (["summary", "{missing}"], "does not exist"),
    (["summary", "{newer}"], "schema version 2 (newer than this cns-cli reads: 1)"),
    (["frame", "{plain}", "0", "--out", "{out}"], "is not a CNS store"),
    (["frame", "{newer}", "0", "--out", "{out}"], "schema version 2"),
    (["frame", "{good}", "no-such-token", "--out", "{out}"], "no frame with token 'no-such-token'"),
    (["frame", "{good}", "7", "--out", "{out}"], "frame index 7 out of range"),
    (["frame", "{good}", "1", "--image", "3", "--out", "{out}"], "image 3 out of range: frame 1 (toy0-001) has 3"),
    (["frame", "{good}", "1", "--image", "CAM_9", "--out", "{out}"], "image CAM_9 out of range"),
    (["frame", "{good}", "1", "--run", "{run}", "--out", "{out}"], "is not a training run (no config.yaml"),
    (["frame", "{good}", "1", "--run", "{missing}", "--out", "{out}"], "is not a directory"),
    (["report", "{plain}", "--out", "{out}"], "is not a CNS store"),
    (["report", "{newer}", "--out", "{out}"], "schema version 2"),
    (["report", "{good}", "--run", "{run}", "--out", "{out}"], "is not a training run"),
]


@pytest.mark.parametrize("args,message", CASES, ids=[" ".join(c[0][:1] + [c[1][:20]]) for c in CASES])
def test_bad_input_one_line_exit_2_nothing_written(stores, tmp_path, args, message):
    out = tmp_path / "out"
    argv = ["inspect"] + [a.format(out=out, **stores) for a in args]
    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], res.output
    assert not out.exists()
