"""Configuration: shipped files, overrides, ablation presets, unknown keys."""
import pytest

from train.config import ABLATIONS, ConfigError, available_configs, load_config, parse_overrides


def test_every_shipped_config_loads():
    names = available_configs()
    assert {"nuscenes", "scannet", "synthetic_street_cpu", "synthetic_indoor_cpu"} <= set(names)
    for n in names:
        for like in ("nuscenes", "scannet"):  # folder.yaml takes its base from the store's dataset.json "like"
            load_config(n, like=like)
    assert load_config("scannet")["data"]["images_per_frame"] == 16
    nus = load_config("nuscenes")["schedule"]  # paper sec. 4: 20 epochs, stage 2 after ten of stage 1
    assert (nus["epochs"], nus["warmup_epochs"]) == (20, 10)
    scan = load_config("scannet")["schedule"]  # 30 epochs, stage 2 after ten
    assert (scan["epochs"], scan["warmup_epochs"]) == (30, 10)
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


def test_table2_presets_mean_what_the_paper_means():
    def keys(name):
        cfg = load_config(None, [f"ablation={name}"])
        return cfg["labels"], cfg["loss"]["latent_target"], cfg["eval"]["post_refine"]

    # 'w 2D' / 'w 3D': one network's predictions train both, no CLIP labels in stage 2
    assert keys("pred2d_only")[0]["stage2_sources"] == ["pred2d"]
    assert keys("pred3d_only")[0]["stage2_sources"] == ["pred3d"]
    # 'Base+CLIP': raw CLIP labels, no refinement, no switching, no latent term; '+LSC' adds Eq. 7 with SAM
    labels, latent, _ = keys("base_clip")
    assert labels["refine"] is False and labels["stage2_sources"] == ["clip2d"] and latent == "none"
    labels, latent, _ = keys("base_clip_lsc")
    assert labels["refine"] is False and labels["stage2_sources"] == ["clip2d"] and latent == "sam"
    assert keys("no_clip_stage2")[0]["stage2_sources"] == ["pred2d", "pred3d"]
    assert keys("no_self_cross_training")[0]["stage2_sources"] == ["clip2d", "clip3d"]
    assert keys("none")[0]["switch"] == "pair" and keys("switch_frame")[0]["switch"] == "frame"
    with pytest.raises(ConfigError, match="labels.switch"):
        load_config(None, ["labels.switch=image"])
