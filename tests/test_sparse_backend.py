"""model.sparse_backend: one import point (train/sparse.py), the same modules and checkpoints with both backends,
one-line errors where a backend cannot run. The numerical parity of spconv_triton (GPU only) is checked by
``make gpu-check`` against a reference that spconv computes on CPU (bench/gpu_check.py)."""
import sys

import pytest
import torch

from data_cache.errors import UserError
from train.config import ConfigError, load_config
from train.models import MODELS_3D, SparseUNet, build_model
from train.sparse import SPARSE_BACKENDS, conv_algo, sparse_modules


def _shapes(net):
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


SMALL = dict(channels=(16, 32, 64, 64, 64, 32, 32, 32), layers=(1,) * 8, base=16, stem_kernel=3)  # spunet_small's


def test_both_backends_build_the_same_minkunet34():
    triton_sp = pytest.importorskip("spconv_triton.pytorch")
    ref = MODELS_3D.get("minkunet34")(4, device="cpu")  # spconv (on the meta device its init takes 10x longer)
    with torch.device("meta"):  # shapes only, nothing allocated
        other = SparseUNet(4, algo=None, sp=triton_sp)  # as minkunet34(device="cuda", sparse_backend=...) builds it
    assert _shapes(other) == _shapes(ref) and len(_shapes(ref)) > 300
    assert other.stem[0].weight.shape == (32, 5, 5, 5, 4)  # KRSC: [out, k, k, k, in]


def test_both_backends_load_each_others_checkpoints():
    triton_sp = pytest.importorskip("spconv_triton.pytorch")
    ref = MODELS_3D.get("spunet_small")(4, device="cpu")  # spconv
    other = SparseUNet(4, algo=None, sp=triton_sp, **SMALL)
    assert type(other.stem[0]).__module__.startswith("spconv_triton") and _shapes(other) == _shapes(ref)
    other.load_state_dict(ref.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), other.state_dict().values()))
    torch.manual_seed(1)
    fresh = SparseUNet(4, algo=None, sp=triton_sp, **SMALL)
    ref.load_state_dict(fresh.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), fresh.state_dict().values()))


def test_the_default_backend_is_spconv_and_runs_on_cpu():
    cfg = load_config("nuscenes")
    assert cfg["model"]["sparse_backend"] == "spconv"
    sp = sparse_modules("spconv", "cpu")
    assert sp.__name__ == "spconv.pytorch" and conv_algo("cpu", sp) == sp.ConvAlgo.Native
    assert conv_algo("cuda", sp) is None  # the backend's default on a GPU


def test_spconv_triton_on_cpu_is_one_config_error_line():
    cfg = load_config("synthetic_street_cpu", ["model.net3d=spunet_small", "model.sparse_backend=spconv_triton",
                                               "model.pretrained_2d=false"])
    with pytest.raises(ConfigError) as e:
        build_model(cfg, 4, torch.randn(3, 8), {"sam": 4, "clip": 8}, "cpu")
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg
    assert "model.sparse_backend=spconv_triton" in msg and "GPU" in msg and "model.sparse_backend=spconv" in msg


def test_spconv_triton_missing_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "spconv_triton", None)  # as if not installed: its import fails
    monkeypatch.delitem(sys.modules, "spconv_triton.pytorch", raising=False)
    with pytest.raises(ConfigError) as e:
        SPARSE_BACKENDS.get("spconv_triton").load("cuda")
    msg = str(e.value)
    assert "\n" not in msg and "pip install -e '.[triton]'" in msg and "spconv_triton.pytorch" in msg


def test_an_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="sparse_backend must be one of spconv, spconv_triton, got 'torchsparse'"):
        load_config("nuscenes", ["model.sparse_backend=torchsparse"])


def test_cns_cli_train_with_spconv_triton_on_cpu_is_one_error_line(tmp_path):
    from click.testing import CliRunner

    from cli import main
    from tests.toy_store import build_toy_store
    toy = build_toy_store(tmp_path / "toy.zarr", num_frames=2, num_images=2)
    res = CliRunner().invoke(main, ["train", "--cache", str(toy), "--config", "synthetic_street_cpu", "--out",
                                    str(tmp_path / "run"), "--device", "cpu", "model.net3d=spunet_small",
                                    "model.sparse_backend=spconv_triton"])
    # (train/commands.py turns ConfigError into a click.ClickException: exit 1, not CnsGroup's 2)
    assert res.exit_code in (1, 2), res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: model.sparse_backend=spconv_triton runs Triton kernels on a GPU only (device cpu): "
                      "use model.sparse_backend=spconv on CPU"]
