"""The stated public surface: each package's ``__all__``, no reach into another module's private helpers,
one weights policy, and ``cns-cli --version`` (what a bug report needs)."""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.models import weights

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data_cache", "inspection", "pipeline", "pipeline.datasets", "pipeline.models", "pipeline.simulate",
            "pipeline.stages", "pipeline.synthetic", "train")
PROJECT_ROOTS = ("data_cache", "inspection", "pipeline", "train", "cli")


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_states_a_small_public_surface(package):
    module = importlib.import_module(package)
    assert 0 < len(module.__all__) <= 10
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"


def test_importing_the_packages_stays_cheap():
    """The lazy exports: naming the public surface imports neither torch nor zarr."""
    code = ("import sys, cli, data_cache, inspection, pipeline, pipeline.models, train; "
            "print(sorted(m for m in ('torch', 'zarr', 'spconv', 'open_clip') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


def _private_reaches(path: Path) -> list[str]:
    """``from <project module> import _name`` and ``<project module alias>._name`` in one source file."""
    tree = ast.parse(path.read_text())
    aliases, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PROJECT_ROOTS \
                or isinstance(node, ast.ImportFrom) and node.level:
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} imports {a.name}")
                aliases.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            aliases.update(a.asname or a.name.split(".")[0] for a in node.names
                           if a.name.split(".")[0] in PROJECT_ROOTS)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                and node.attr.startswith("_") and not node.attr.startswith("__"):
            found.append(f"{path.relative_to(REPO)}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_no_module_reaches_into_another_modules_private_helpers():
    files = [REPO / "cli.py", *(p for root in PROJECT_ROOTS[:-1] for p in (REPO / root).rglob("*.py"))]
    assert len(files) > 40
    assert sum((_private_reaches(p) for p in files), []) == []


def test_the_checker_sees_a_private_reach(tmp_path):
    bad = REPO / "tests" / "_surface_probe.py"
    bad.write_text("from inspection import render\nfrom pipeline.datasets.classes import _x\nrender._mpl()\n")
    try:
        assert len(_private_reaches(bad)) == 2
    finally:
        bad.unlink()


def test_weights_policy_never_random_unless_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("CNS_CHECKPOINTS", str(tmp_path))
    assert weights.resolve_weights("clip", "ViT-B-16", tiny=True) == {"source": "tiny", "model": "CNS-Tiny-ViT"}
    assert weights.resolve_weights("sam", "vit_b", random_init=True)["source"] == "random"
    assert weights.resolve_weights("clip", "ViT-B-16", pretrained="openai")["tag"] == "openai"
    for kind, model, flag in (("clip", "ViT-B-16", "--clip-checkpoint"), ("sam", "vit_h", "--sam-checkpoint")):
        with pytest.raises(weights.WeightsError, match=f"make weights.*{flag}"):
            weights.resolve_weights(kind, model)
        with pytest.raises(weights.WeightsError, match="does not exist"):
            weights.resolve_weights(kind, model, checkpoint=str(tmp_path / "missing.pth"))
    with pytest.raises(weights.WeightsError, match="no pretrained tags"):
        weights.resolve_weights("sam", "vit_h", pretrained="openai")
    (tmp_path / weights.default_for("sam", "vit_b").filename).write_bytes(b"")
    assert weights.resolve_weights("sam", "vit_b")["source"] == "checkpoint"


def test_pretrained_2d_refusal_is_a_weights_error():
    from train.models import PretrainedWeightsError
    assert issubclass(PretrainedWeightsError, weights.WeightsError)


def test_version_names_every_library_and_the_gpu():
    import torch

    from cli import main
    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0, res.output
    lines = dict(line.split(": ", 1) for line in res.output.strip().splitlines())
    assert list(lines) == ["cns-label-free", "torch", "spconv", "torchvision", "open_clip", "segment-anything",
                           "zarr", "dask", "GPU visible"]
    assert lines["torch"].startswith(f"{torch.__version__} (CUDA build: {torch.version.cuda or 'none, CPU only'})")
    assert lines["open_clip"] == metadata.version("open_clip_torch")
    assert lines["zarr"] == metadata.version("zarr") and lines["dask"] == metadata.version("dask")
    assert lines["GPU visible"].startswith("yes" if torch.cuda.is_available() else "no")
    spconv = [d for d in metadata.distributions() if (d.metadata["Name"] or "").lower().startswith("spconv")]
    for dist in spconv:
        assert f"{dist.metadata['Name'].lower().replace('_', '-')} {dist.version}" in lines["spconv"]
    if any(d.metadata["Name"].lower().replace("_", "-") == "spconv-cu118" for d in spconv):
        assert "spconv-cu118 " in lines["spconv"] and "(CUDA 11.8)" in lines["spconv"]


@pytest.mark.parametrize("verb, says", [("labels", "Directory of stores"), ("train", "one cache store"),
                                        ("eval", "one cache store")])
def test_cache_help_says_directory_or_one_store(verb, says):
    from cli import main
    res = CliRunner().invoke(main, [verb, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    cache_help = next(line for line in res.output.splitlines() if line.strip().startswith("--cache"))
    assert says in cache_help
