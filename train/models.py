"""The 2D and 3D networks, their heads (Eq. 5 and 7), and a registry per kind.

``MODELS_2D`` maps a name to a builder returning a module ``uint8 images [I, 3, H, W] -> features
[I, C, H/s, W/s]`` and its channel count C; ``MODELS_3D`` a builder returning a sparse U-Net ``voxel
features -> per-voxel features`` and its C. :class:`CNSModel` puts both behind the paper's heads.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.registry import Registry
from pipeline.models.weights import WeightsError

from .sparse import conv_algo, sparse_modules

MODELS_2D = Registry("2D network")
MODELS_3D = Registry("3D network")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PretrainedWeightsError(WeightsError):
    """ImageNet weights were asked for and cannot be had: never fall back to random weights silently (the
    policy of :func:`pipeline.models.weights.resolve_weights`)."""


# -- 2D ---------------------------------------------------------------------------------------------
class DeepLabV3Features(nn.Module):
    """torchvision DeepLabV3 without its last 1x1 classifier: ASPP features at the backbone's stride."""

    def __init__(self, seg_model: nn.Module):
        super().__init__()
        self.backbone = seg_model.backbone
        head = seg_model.classifier
        self.out_channels = head[-1].in_channels
        self.head = nn.Sequential(*list(head.children())[:-1])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, rgb_uint8: torch.Tensor) -> torch.Tensor:
        x = (rgb_uint8.float() - self.mean) / self.std
        return self.head(self.backbone(x)["out"])


def _build_deeplab(factory, weights_enum, pretrained: bool) -> nn.Module:
    weights_backbone = weights_enum.IMAGENET1K_V1 if pretrained else None
    try:
        model = factory(weights=None, weights_backbone=weights_backbone, num_classes=2, aux_loss=False)
    except Exception as e:  # noqa: BLE001 — any download/cache failure: a clear error, never random weights
        raise PretrainedWeightsError(
            f"ImageNet backbone weights {weights_backbone} are not available ({type(e).__name__}: {e}); "
            "put them in the torch hub cache or train from scratch with --no-pretrained-2d "
            "(model.pretrained_2d=false)") from e
    return DeepLabV3Features(model)


@MODELS_2D.register("deeplabv3_resnet50")
def deeplabv3_resnet50(pretrained: bool = True) -> DeepLabV3Features:
    from torchvision.models import ResNet50_Weights
    from torchvision.models.segmentation import deeplabv3_resnet50 as factory
    return _build_deeplab(factory, ResNet50_Weights, pretrained)


@MODELS_2D.register("deeplabv3_mobilenet_v3")
def deeplabv3_mobilenet_v3(pretrained: bool = True) -> DeepLabV3Features:
    """The CPU variant (MobileNetV3-Large backbone)."""
    from torchvision.models import MobileNet_V3_Large_Weights
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large as factory
    return _build_deeplab(factory, MobileNet_V3_Large_Weights, pretrained)


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SmallUNet2D(nn.Module):
    """A small from-scratch encoder-decoder for CPU studies (not the paper's network): three stride-2
    stages (widths ``widths``) and a decoder that upsamples and adds the skips back to stride 2. Output:
    features at stride 2. It learns in a few hundred CPU steps what DeepLabV3 without ImageNet weights
    does not, so a controlled benchmark measures the labels rather than the compute budget."""

    def __init__(self, widths=(32, 48, 64, 96)):
        super().__init__()
        w = widths
        self.stem = nn.Sequential(_conv_bn(3, w[0], 2), _conv_bn(w[0], w[0]))
        self.down = nn.ModuleList([nn.Sequential(_conv_bn(w[i], w[i + 1], 2), _conv_bn(w[i + 1], w[i + 1]))
                                   for i in range(len(w) - 1)])
        self.lateral = nn.ModuleList([nn.Conv2d(w[i + 1], w[0], 1) for i in range(len(w) - 1)])
        self.fuse = _conv_bn(w[0], w[0])
        self.out_channels = w[0]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, rgb_uint8: torch.Tensor) -> torch.Tensor:
        x = self.stem((rgb_uint8.float() - self.mean) / self.std)
        top = x
        feats = []
        for down in self.down:
            x = down(x)
            feats.append(x)
        for lateral, f in zip(self.lateral, feats):  # FPN-like: every level added at stride 2
            top = top + F.interpolate(lateral(f), size=top.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(top)


@MODELS_2D.register("unet_small")
def unet_small(pretrained: bool = False) -> SmallUNet2D:
    """CPU study network (see :class:`SmallUNet2D`); there are no pretrained weights for it."""
    if pretrained:
        raise PretrainedWeightsError("unet_small has no pretrained weights: set model.pretrained_2d=false")
    return SmallUNet2D()


# -- 3D ---------------------------------------------------------------------------------------------
def _algo_kw(algo):
    return {} if algo is None else {"algo": algo}


class SparseBasicBlock(nn.Module):
    """Two 3^3 submanifold convolutions with a residual: sparse tensor in, sparse tensor out (the blocks of a
    level are chained by a plain ``nn.Sequential``, whatever the backend ``sp``)."""

    def __init__(self, cin: int, cout: int, key: str, algo, sp):
        super().__init__()
        kw = _algo_kw(algo)
        self.conv1 = sp.SubMConv3d(cin, cout, 3, padding=1, bias=False, indice_key=key, **kw)
        self.bn1 = nn.BatchNorm1d(cout)
        self.conv2 = sp.SubMConv3d(cout, cout, 3, padding=1, bias=False, indice_key=key, **kw)
        self.bn2 = nn.BatchNorm1d(cout)
        self.proj = None
        if cin != cout:
            self.proj = sp.SparseSequential(sp.SubMConv3d(cin, cout, 1, bias=False, **kw),
                                                nn.BatchNorm1d(cout))

    def forward(self, x):
        identity = x.features if self.proj is None else self.proj(x).features
        out = self.conv1(x)
        out = out.replace_feature(F.relu(self.bn1(out.features)))
        out = self.conv2(out)
        return out.replace_feature(F.relu(self.bn2(out.features) + identity))


class SparseUNet(nn.Module):
    """A spconv U-Net in the layout of MinkUNet34 (Pointcept's SpUNet-v1m1): a 5^3 stem, four stride-2
    encoder levels with ``layers[:4]`` basic blocks, four decoder levels with ``layers[4:]`` blocks that
    concatenate the skip features. Output: per input voxel, in the input's order.

    ``sp``: the sparse backend's module (:func:`train.sparse.sparse_modules`; default spconv); the modules and
    their state_dict keys and shapes are the same with every backend."""

    def __init__(self, in_channels: int, channels=(32, 64, 128, 256, 256, 128, 96, 96),
                 layers=(2, 3, 4, 6, 2, 2, 2, 2), base: int = 32, stem_kernel: int = 5, algo=None, sp=None):
        super().__init__()
        sp = sp if sp is not None else sparse_modules("spconv")
        self.tensor_type = sp.SparseConvTensor  # a class, not the module: the network stays deep-copyable
        kw = _algo_kw(algo)
        self.stem = sp.SparseSequential(
            sp.SubMConv3d(in_channels, base, stem_kernel, padding=stem_kernel // 2, bias=False, indice_key="stem",
                              **kw),
            nn.BatchNorm1d(base), nn.ReLU())
        n = len(layers) // 2
        self.down, self.enc, self.up, self.dec = nn.ModuleList(), nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        enc_ch = [base]
        c = base
        for s in range(n):
            self.down.append(sp.SparseSequential(
                sp.SparseConv3d(c, channels[s], 2, stride=2, bias=False, indice_key=f"spconv{s + 1}", **kw),
                nn.BatchNorm1d(channels[s]), nn.ReLU()))
            self.enc.append(nn.Sequential(*[
                SparseBasicBlock(channels[s], channels[s], f"subm{s + 1}", algo, sp) for _ in range(layers[s])]))
            c = channels[s]
            enc_ch.append(c)
        for s in range(n):
            level = n - 1 - s  # the level the decoder step returns to (its skip)
            cout = channels[n + s]
            self.up.append(sp.SparseSequential(
                sp.SparseInverseConv3d(c, cout, 2, bias=False, indice_key=f"spconv{level + 1}", **kw),
                nn.BatchNorm1d(cout), nn.ReLU()))
            key = f"subm{level}"  # level 0 has the stem's indices but a 3^3 kernel: its own key
            blocks = [SparseBasicBlock(cout + enc_ch[level], cout, key, algo, sp)]
            blocks += [SparseBasicBlock(cout, cout, key, algo, sp) for _ in range(layers[n + s] - 1)]
            self.dec.append(nn.Sequential(*blocks))
            c = cout
        self.out_channels = c

    def forward(self, feat: torch.Tensor, index: torch.Tensor, batch_size: int) -> torch.Tensor:
        spatial = (index[:, 1:].max(0).values + 1).tolist()
        # every encoder level halves the grid: pad so that the decoder restores the exact shape
        m = 2 ** len(self.down)
        spatial = [((s + m - 1) // m) * m + m for s in spatial]
        x = self.tensor_type(feat, index.int(), spatial, batch_size)
        x = self.stem(x)
        skips = [x]
        for down, enc in zip(self.down, self.enc):
            x = enc(down(x))
            skips.append(x)
        skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = up(x)
            skip = skips.pop()
            x = dec(x.replace_feature(torch.cat([x.features, skip.features], 1)))
        return x.features


@MODELS_3D.register("minkunet34")
def minkunet34(in_channels: int, device="cpu", sparse_backend: str = "spconv") -> SparseUNet:
    sp = sparse_modules(sparse_backend, device)
    return SparseUNet(in_channels, algo=conv_algo(device, sp), sp=sp)


@MODELS_3D.register("spunet_small")
def spunet_small(in_channels: int, device="cpu", sparse_backend: str = "spconv") -> SparseUNet:
    """The CPU variant: same layout, one block per level, narrow channels, a 3^3 stem (the Native CPU
    algorithm costs one matrix product per kernel offset: 27 instead of 125)."""
    sp = sparse_modules(sparse_backend, device)
    return SparseUNet(in_channels, channels=(16, 32, 64, 64, 64, 32, 32, 32), layers=(1, 1, 1, 1, 1, 1, 1, 1),
                      base=16, stem_kernel=3, algo=conv_algo(device, sp), sp=sp)


class GridContextMLP(nn.Module):
    """A small from-scratch 3D network for CPU studies (not the paper's): a per-voxel MLP whose blocks also
    see the mean feature of the coarser grid cells the voxel lies in (cells of ``scales`` voxels, pooled per
    frame with scatter-mean). Context from a few voxels to a whole street in a handful of dense matrix
    products: a CPU step costs a fraction of a sparse U-Net's, which spconv runs with its slow native
    algorithm there. Output: per input voxel, in the input's order."""

    def __init__(self, in_channels: int, width: int = 64, scales=(2, 4, 8, 16, 32), blocks: int = 3):
        super().__init__()
        self.scales = tuple(scales)
        self.inp = nn.Sequential(nn.Linear(in_channels, width), nn.BatchNorm1d(width), nn.ReLU())
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Linear(width * (1 + len(self.scales)), width), nn.BatchNorm1d(width), nn.ReLU())
            for _ in range(blocks)])
        self.out_channels = width

    def forward(self, feat: torch.Tensor, index: torch.Tensor, batch_size: int) -> torch.Tensor:
        index = index.long()
        cells = []
        for s in self.scales:  # (frame, cell) -> dense cell id, and each cell's voxel count
            c = index[:, 1:] // s
            extent = c.max(0).values + 1 if len(c) else torch.ones(3, dtype=torch.long, device=c.device)
            key = ((index[:, 0] * extent[0] + c[:, 0]) * extent[1] + c[:, 1]) * extent[2] + c[:, 2]
            _, cell, count = torch.unique(key, return_inverse=True, return_counts=True)
            cells.append((cell, count.unsqueeze(1).to(feat.dtype)))
        x = self.inp(feat)
        for block in self.blocks:
            # the mean per cell, then gathered back to the voxels: dividing [cells, C] rather than [voxels, C]
            ctx = [(torch.zeros(len(c), x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, cell, x) / c)[cell]
                   for cell, c in cells]
            x = x + block(torch.cat([x] + ctx, 1))
        return x


@MODELS_3D.register("grid_mlp_small")
def grid_mlp_small(in_channels: int, device="cpu", sparse_backend: str = "spconv") -> GridContextMLP:
    """CPU study network (see :class:`GridContextMLP`); dense torch: ``sparse_backend`` is not used."""
    return GridContextMLP(in_channels)


# -- heads ------------------------------------------------------------------------------------------
class CNSModel(nn.Module):
    """Both networks and their heads.

    * theta_s / phi_s: linear maps of the 2D / 3D features into the CLIP text space (width E); the logits
      are dot products with the frozen class text embeddings t_l (**Eq. 5**, :meth:`text_logits`).
    * theta_f / phi_f: linear maps to the latent target's space for the latent consistency of **Eq. 7**
      (width D of ``sam/feat`` or ``clip/feat``, their sum for ``sam+clip``; absent without a latent term).

    The text embeddings are a non-persistent buffer: they come from the store (``clip/text_embed``), and
    open-vocabulary evaluation swaps them (:meth:`set_text_embeddings`) without touching trained weights.
    """

    def __init__(self, net2d: nn.Module, net3d: nn.Module | None, text_embed: torch.Tensor, latent_dim: int | None):
        super().__init__()
        self.net2d, self.net3d = net2d, net3d
        E = text_embed.shape[1]
        self.theta_s = nn.Conv2d(net2d.out_channels, E, 1)
        # net3d None: a 2D-only model (nuImages); the 3D heads and outputs are absent
        self.phi_s = nn.Linear(net3d.out_channels, E) if net3d is not None else None
        self.theta_f = nn.Conv2d(net2d.out_channels, latent_dim, 1) if latent_dim else None
        self.phi_f = nn.Linear(net3d.out_channels, latent_dim) if latent_dim and net3d is not None else None
        self.register_buffer("text_embed", text_embed.float().clone(), persistent=False)

    def set_text_embeddings(self, text_embed: torch.Tensor) -> None:
        if text_embed.shape[1] != self.text_embed.shape[1]:
            raise ValueError(f"text embeddings of width {text_embed.shape[1]}, the model was trained with "
                             f"{self.text_embed.shape[1]}")
        self.text_embed = text_embed.to(self.text_embed)

    def _text_head(self, head: nn.Module):
        """``head`` (theta_s / phi_s) composed with the text embeddings: weight [L, C] and bias [L] such that
        ``logits = weight @ f + bias`` equals :meth:`text_logits` of ``head(f)`` (both maps are linear). A
        C -> L product per pixel or voxel instead of C -> E -> L: E is CLIP's width (512), L the classes."""
        t = self.text_embed.to(head.weight.dtype)
        weight = t @ head.weight.reshape(head.weight.shape[0], -1)
        return weight, (t @ head.bias if head.bias is not None else None)

    @staticmethod
    def text_logits(embedding: torch.Tensor, text_embed: torch.Tensor, dim: int) -> torch.Tensor:
        """**Eq. 5**: the score of class l is the dot product of the projected feature with t_l."""
        return torch.tensordot(embedding.movedim(dim, -1), text_embed.to(embedding.dtype), dims=([-1], [1])
                               ).movedim(-1, dim)

    def forward(self, rgb: torch.Tensor, voxel_feat: torch.Tensor, voxel_index: torch.Tensor,
                inverse: torch.Tensor, batch_size: int) -> dict:
        out = {}
        if rgb.shape[0]:
            f2 = self.net2d(rgb)
            weight, bias = self._text_head(self.theta_s)  # Eq. 5 on theta_s(f2), composed
            small = F.conv2d(f2, weight[:, :, None, None], bias)
            # the dot product with t_l and the bilinear upsampling are both linear: upsampling the L-channel
            # logits equals upsampling the E-channel embedding first, at a fraction of the memory
            out["logits2d"] = F.interpolate(small, size=rgb.shape[-2:], mode="bilinear", align_corners=False)
            if self.theta_f is not None:
                out["lat2d"] = self.theta_f(f2)
        if self.net3d is None:
            return out
        f3 = self.net3d(voxel_feat, voxel_index, batch_size)
        out["logits3d"] = F.linear(f3, *self._text_head(self.phi_s))[inverse]  # Eq. 5 on phi_s(f3), composed
        if self.phi_f is not None:
            out["lat3d"] = self.phi_f(f3)  # per voxel: Eq. 7 gathers it at the pairs' voxels (batch["inverse"])
        return out


def build_model(cfg: dict, in_channels: int, text_embed: torch.Tensor, feature_dims: dict, device) -> CNSModel:
    """Both networks and their heads. ``feature_dims``: the channels of the cached latent targets
    (``{"sam": D, "clip": D}``, from the stores); the Eq. 7 heads are as wide as ``loss.latent_target`` needs."""
    from .losses import LATENT_FEATURES
    m = cfg["model"]
    net2d = MODELS_2D.get(m["net2d"])(pretrained=bool(m["pretrained_2d"]))
    net3d = (MODELS_3D.get(m["net3d"])(in_channels, device=device, sparse_backend=m["sparse_backend"])
             if m["net3d"] else None)
    keys = LATENT_FEATURES[cfg["loss"]["latent_target"]]
    latent_dim = sum(int(feature_dims[k]) for k in keys)
    return CNSModel(net2d, net3d, text_embed, latent_dim or None).to(device)


def load_trained_model(cfg: dict, checkpoint, info: dict, device):
    """A run's networks with the weights of ``checkpoint`` (``cns-cli eval``, ``cns-cli inspect --run``).

    ``info`` is :func:`train.engine.check_stores`' answer for the stores to evaluate; the Eq. 7 heads take
    the width they were trained with (an evaluation store need not hold the feature grids). Returns
    ``(model, state)``."""
    state = torch.load(checkpoint, map_location=device, weights_only=False)
    cfg_model = dict(cfg, model=dict(cfg["model"], pretrained_2d=False))  # the checkpoint has the weights
    in_ch = info["point_channels"] + (3 if cfg["data"]["use_xyz"] else 0)
    model = build_model(cfg_model, in_ch, info["text_embed"], state.get("feature_dims", info["feature_dims"]), device)
    model.load_state_dict(state["model"])
    return model, state
