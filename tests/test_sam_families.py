"""SAM families behind ``--sam-model``: SAM (vit_*), SAM 2.1 (sam2.1_hiera_*), HQ-SAM (hq_vit_*).

Each family runs the whole ``sam`` stage through ``cns-cli labels --test-tiny-models --sam-model ...`` on a
one-image synthetic store with random weights, and ``cns-cli cache validate`` passes on the result. The
project's batched generator gives each family's own automatic mask generator's masks (same order, same
predicted IoUs) at the image's size on CPU in float32. A family whose package is absent skips with the
install command as the reason (CI installs only ``.[test]``).
"""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import main
from data_cache.store import Store
from pipeline.models import sam_families as sf
from pipeline.models.sam import masks_to_id_map

from .test_maskclip import images

# one model name per family: the tiny test model of its family is what --test-tiny-models builds
FAMILY_MODELS = {"sam1": "vit_b", "sam2": "sam2.1_hiera_large", "hq": "hq_vit_h"}
# a random decoder's masks nearly all span the image: NMS 1.0 keeps every mask, so the comparison is not vacuous
ALL_MASKS = dict(points_per_side=4, points_per_batch=20, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                 box_nms_thresh=1.0)


def needs(family: str):
    fam = sf.family_of(FAMILY_MODELS[family])
    missing = importlib.util.find_spec(fam.package) is None
    return pytest.mark.skipif(missing, reason=f"{fam.package} not installed ({fam.install})")


@pytest.fixture(autouse=True)
def _no_local_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("CNS_CHECKPOINTS", str(tmp_path / "no-checkpoints"))


@pytest.mark.parametrize("family", [pytest.param(f, marks=needs(f)) for f in FAMILY_MODELS])
def test_family_runs_the_sam_stage_and_the_store_validates(family, tmp_path):
    model = FAMILY_MODELS[family]
    runner = CliRunner()
    res = runner.invoke(main, ["labels", "--dataset", "synthetic", "--cache", str(tmp_path), "--stages",
                               "correspond,sam", "--workers", "0", "--no-progress", "--test-tiny-models",
                               "--sam-model", model, "--dataset-option", "kind=indoor",
                               "--dataset-option", "num_scenes=1", "--dataset-option", "frames_per_room=1"])
    assert res.exit_code == 0, res.output
    path = tmp_path / "synthetic-train.zarr"
    val = runner.invoke(main, ["cache", "validate", str(path)])
    assert val.exit_code == 0 and "OK" in val.output, val.output
    store = Store(path)
    ids = store.array("sam/mask_id")[:]
    feat = store.array("sam/feat")[:]
    assert ids.dtype == np.int32 and ids.shape == (1, 240, 320) and ids.min() >= -1 and ids.max() >= 0
    # the same SAM grid for every family's test model (256-pixel input, 16-pixel cells): 240x320 -> 192x256 -> 12x16
    assert feat.shape[-2:] == (12, 16) and np.isfinite(feat).all() and np.abs(feat).max() > 0
    fp = store.raw_attrs["stages"]["sam"]
    assert fp["config"]["model_type"] == model and fp["config"]["tiny"] is True


@pytest.mark.parametrize("family", [pytest.param(f, marks=needs(f)) for f in ("sam2", "hq")])
def test_batched_generator_equals_the_familys_own(family):
    """Masks equal bit for bit, in the same order; predicted IoUs to float rounding (HQ: the decoder's
    batched matmuls run per prompt here and per image upstream)."""
    fam = sf.family_of(FAMILY_MODELS[family])
    net, _ = fam.build(FAMILY_MODELS[family], tiny=True)
    # two images, one of another size; 20 prompts per decoder call mix the images' prompts
    imgs = [images(1, seed=1)[0], np.ascontiguousarray(images(1, seed=2)[0][:48, :80])]
    batched = fam.generator(net, "batched", encoder_batch=2, **ALL_MASKS).generate(imgs)
    own = fam.generator(net, "upstream", **ALL_MASKS).amg  # SAM2AutomaticMaskGenerator / HQ's generator
    for im, out in zip(imgs, batched):
        anns = own.generate(im)
        want = np.stack([a["segmentation"] for a in anns])
        np.testing.assert_array_equal(out["masks"].numpy(), want)
        np.testing.assert_allclose(out["predicted_iou"].numpy(), [a["predicted_iou"] for a in anns], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(out["id_map"].numpy(), masks_to_id_map(want))
        assert len(want) >= 16, len(want)  # 16 prompts: every mask kept (HQ: one per prompt, SAM 2: three)


def test_every_model_has_one_family_and_a_registered_checkpoint():
    from pipeline.models import weights
    names = sf.model_names()
    assert len(names) == len(set(names)) == 10
    for m in names:
        ck = weights.default_for("sam", m)
        assert ck is not None and ck.model == m and ck.url.startswith("https://"), m
        assert ck.sha256 or ck.md5 or (ck.size_mb and "no published checksum" in ck.note), m
    with pytest.raises(sf.WeightsError, match="unknown SAM model 'vit_x'") as e:
        sf.family_of("vit_x")
    assert all(m in str(e.value) for m in names)


@pytest.mark.parametrize("family, command", [("sam2", "pip install -e '.[sam2]'"), ("hq", "pip install -e '.[hq]'")])
def test_a_missing_extra_is_one_line_naming_the_install_command(family, command, monkeypatch, tmp_path):
    fam = sf.family_of(FAMILY_MODELS[family])
    monkeypatch.setitem(sys.modules, fam.package, None)  # import fails as if not installed
    with pytest.raises(sf.MissingExtraError, match=f"needs the '{fam.package}' package.*{command.replace('[', '.').replace(']', '.')}"):
        fam.require()
    res = CliRunner().invoke(main, ["labels", "--dataset", "synthetic", "--cache", str(tmp_path), "--stages", "sam",
                                    "--workers", "0", "--no-progress", "--sam-model", FAMILY_MODELS[family]])
    assert res.exit_code == 2, res.output
    err = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(err) == 1 and command in err[0], res.output


@pytest.mark.parametrize("family", [pytest.param(f, marks=needs(f)) for f in FAMILY_MODELS])
def test_architecture_is_detected_from_the_test_models_state_dict(family):
    fam = sf.family_of(FAMILY_MODELS[family])
    net, _ = fam.build(FAMILY_MODELS[family], tiny=True)
    held = sf.detect_architecture(net.state_dict())
    # the SAM 2 test model is hiera_tiny at a smaller input: the same state_dict shapes as sam2.1_hiera_tiny
    assert held == {"sam1": "tiny", "sam2": "sam2.1_hiera_tiny", "hq": "hq_tiny"}[family]
    assert torch.is_tensor(next(iter(net.state_dict().values())))
