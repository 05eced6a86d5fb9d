"""The networks: shapes, the MinkUNet34 layout, voxel order, the CPU spconv algorithm."""
import pytest
import torch

from train.models import MODELS_2D, MODELS_3D, CNSModel, PretrainedWeightsError, conv_algo


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # see tests/test_train_run.py
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _voxels(n=300, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.unique(torch.randint(0, 24, (n, 3), generator=g), dim=0)
    b = torch.arange(len(idx)) % batch
    return torch.cat([b[:, None], idx], 1).int(), torch.randn(len(idx), 4, generator=g)


def test_minkunet34_layout_and_output_rows_follow_the_input_order():
    net = MODELS_3D.get("minkunet34")(4, device="cpu").eval()
    blocks = [len(e) for e in net.enc] + [len(d) for d in net.dec]
    assert blocks == [2, 3, 4, 6, 2, 2, 2, 2] and net.out_channels == 96
    n_params = sum(p.numel() for p in net.parameters())
    assert 30e6 < n_params < 45e6  # MinkUNet34C has ~37.8M
    index, feat = _voxels()
    with torch.no_grad():
        out = net(feat, index, 2)
        perm = torch.randperm(len(index), generator=torch.Generator().manual_seed(1))
        out_perm = net(feat[perm], index[perm], 2)
    assert out.shape == (len(index), 96)
    assert torch.allclose(out[perm], out_perm, atol=1e-4)  # per-voxel features stay with their voxel


def test_small_3d_variant_and_the_cpu_algorithm():
    from spconv.core import ConvAlgo
    assert conv_algo("cpu") == ConvAlgo.Native and conv_algo("cuda") is None
    net = MODELS_3D.get("spunet_small")(4, device="cpu")
    index, feat = _voxels()
    assert net(feat, index, 2).shape == (len(index), net.out_channels)


@pytest.mark.parametrize("name", ["deeplabv3_resnet50", "deeplabv3_mobilenet_v3", "unet_small"])
def test_2d_nets_and_eq5_heads(name):
    text = torch.nn.functional.normalize(torch.randn(5, 16), dim=1)
    net2d = MODELS_2D.get(name)(pretrained=False)
    model = CNSModel(net2d, MODELS_3D.get("spunet_small")(4), text, latent_dim=8).eval()
    index, feat = _voxels(100, batch=1)
    inverse = torch.arange(len(index)).repeat(2)  # two points per voxel
    rgb = torch.randint(0, 255, (2, 3, 32, 48), dtype=torch.uint8)
    with torch.no_grad():
        out = model(rgb, feat, index, inverse, 1)
    assert out["logits2d"].shape == (2, 5, 32, 48) and out["logits3d"].shape == (2 * len(index), 5)
    assert out["lat2d"].shape[:2] == (2, 8) and out["lat3d"].shape == (len(index), 8)  # lat3d: per voxel
    assert torch.equal(out["logits3d"][: len(index)], out["logits3d"][len(index):])
    # the forward composes theta_s / phi_s with t_l: the same logits as Eq. 5 on the projected features
    with torch.no_grad():
        small = CNSModel.text_logits(model.theta_s(net2d(rgb)), text, dim=1)
        eq5_2d = torch.nn.functional.interpolate(small, size=(32, 48), mode="bilinear", align_corners=False)
        eq5_3d = CNSModel.text_logits(model.phi_s(model.net3d(feat, index, 1)), text, dim=1)[inverse]
    assert torch.allclose(out["logits2d"], eq5_2d, atol=1e-4) and torch.allclose(out["logits3d"], eq5_3d, atol=1e-4)
    # open vocabulary: other text embeddings change only the logits' width
    model.set_text_embeddings(torch.nn.functional.normalize(torch.randn(3, 16), dim=1))
    with torch.no_grad():
        assert model(rgb, feat, index, inverse, 1)["logits3d"].shape[1] == 3


def test_grid_context_mlp_follows_the_input_order_and_pools_per_frame():
    net = MODELS_3D.get("grid_mlp_small")(4).eval()
    index, feat = _voxels()
    with torch.no_grad():
        out = net(feat, index, 2)
        perm = torch.randperm(len(index), generator=torch.Generator().manual_seed(1))
        assert torch.allclose(net(feat[perm], index[perm], 2), out[perm], atol=1e-5)
        # frame 1's voxels never see frame 0's: changing frame 0 leaves frame 1's output as it was
        other = feat.clone()
        other[index[:, 0] == 0] += 5.0
        moved = net(other, index, 2)
    assert out.shape == (len(index), net.out_channels)
    one = index[:, 0] == 1
    assert torch.allclose(moved[one], out[one], atol=1e-5) and not torch.allclose(moved[~one], out[~one])


def test_unet_small_has_no_pretrained_weights():
    with pytest.raises(PretrainedWeightsError, match="unet_small"):
        MODELS_2D.get("unet_small")(pretrained=True)
