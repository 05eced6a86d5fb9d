"""Configuration: shipped files, overrides, ablation presets, unknown keys."""
import pytest

from train.config import ABLATIONS, ConfigError, available_configs, load_config, parse_overrides


def test_every_shipped_config_loads():
    names = available_configs()
    assert {"nuscenes", "scannet", "synthetic_street_cpu", "synthetic_indoor_cpu"} <= set(names)
    for n in names:
        load_config(n)
    assert load_config("scannet")["data"]["images_per_frame"] == 16
    assert load_config("nuscenes")["schedule"]["warmup_epochs"] == 20
    indoor = load_config("synthetic_indoor_cpu")  # _base_ inheritance
    assert indoor["data"]["voxel_size"] == 0.05 and indoor["model"]["net3d"] == "spunet_small"


def test_overrides_are_yaml_values():
    ov = parse_overrides(["schedule.epochs=3", "schedule.warmup_epochs=1", "labels.stage2_sources=[clip2d, pred3d]", "data.image_size=null"])
    cfg = load_config(None, ov)
    assert cfg["schedule"]["epochs"] == 3 and cfg["labels"]["stage2_sources"] == ["clip2d", "pred3d"]


def test_unknown_keys_and_bad_values_are_refused():
    with pytest.raises(ConfigError, match="schedule.epoch"):
        load_config(None, ["schedule.epoch=3"])
    with pytest.raises(ConfigError, match="stage2_sources"):
        load_config(None, ["labels.stage2_sources=[clip4d]"])
    with pytest.raises(ConfigError, match="unknown ablation"):
        load_config(None, ["ablation=nothing"])


def test_ablation_presets_set_keys_and_explicit_overrides_win():
    cfg = load_config(None, ["ablation=no_refine"])
    assert cfg["labels"]["refine"] is False and cfg["ablation"] == "no_refine"
    cfg = load_config(None, ["ablation=latent_clip", "loss.latent_target=none"])
    assert cfg["loss"]["latent_target"] == "none"
    assert set(ABLATIONS) >= {"no_refine", "no_cross_training", "no_self_cross_training", "no_clip_stage2",
                              "pred2d_only", "pred3d_only", "latent_sam", "latent_clip", "latent_sam_clip",
                              "latent_none", "post_refine", "images_8", "images_16", "images_32"}
