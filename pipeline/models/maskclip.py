"""MaskCLIP: dense CLIP pseudo-labels (Zhou et al., ECCV 2022; CNS paper Eq. 1).

Three layers, as in segment-anything:

* :func:`create_clip` builds an open_clip model at the training resolution (``force_image_size``; open_clip
  resizes the position embeddings of a square checkpoint bicubically) from an explicit weight source: an
  open_clip ``pretrained`` tag, a checkpoint file (OpenAI TorchScript or open_clip state dict), or — for
  tests and benchmarks only — random weights. It never falls back to random weights by itself.
* :class:`MaskCLIP` (``nn.Module``) runs the image tower with its last transformer block replaced by a dense
  teacher's (:mod:`pipeline.models.dense`; by default MaskCLIP's *value path*, :func:`value_path`: the
  query-key attention is dropped, every patch token keeps its own value). The output is one L2-normalised
  CLIP embedding per 16x16 patch.
* :class:`MaskCLIPPredictor` holds the class text embeddings and turns uint8 images into per-pixel labels
  and confidences: cosine similarity of patch and text embeddings, times ``logit_scale``, upsampled
  bilinearly to pixels, softmax over classes, argmax.

:func:`build_text_embeddings` computes the class text embeddings ``t_l`` (85 templates, see
:mod:`pipeline.models.prompts`) and is what the trainer's open-vocabulary evaluation calls.
"""
from __future__ import annotations

import logging
import os
import zipfile
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import prompts, weights
from data_cache.errors import UnknownNameError

from .weights import WeightsError
from ..registry import shipped_config_dir

log = logging.getLogger(__name__)

CONFIG_DIR = shipped_config_dir("pipeline.models", "configs/clip")  # package data (setup.cfg)
#: the random-weight test architecture (``configs/clip/CNS-Tiny-ViT.json``)
TINY_MODEL = weights.TINY_MODELS["clip"]
#: CLIP's learned temperature for the OpenAI models (exp(logit_scale) = 100); scales cosine similarities
DEFAULT_LOGIT_SCALE = 100.0
#: seed of every random-weight build, so that a driver and its workers build the same random model
RANDOM_SEED = 0


def _register_configs() -> None:
    import open_clip
    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def is_torchscript(path: str | os.PathLike) -> bool:
    """True for OpenAI's TorchScript checkpoints (a zip archive with TorchScript ``code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/", 2)[1:2] == ["code"] for n in z.namelist())


def load_clip_state_dict(path: str | os.PathLike) -> dict:
    """A CLIP state dict from an OpenAI TorchScript checkpoint or an open_clip checkpoint file."""
    if is_torchscript(path):
        sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        for k in ("input_resolution", "context_length", "vocab_size"):
            sd.pop(k, None)
        return sd
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if sd and next(iter(sd)).startswith("module."):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


class _quiet_open_clip(logging.Filter):
    """Hide open_clip's 'initialized randomly' warning while we build a model we load weights into next."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    def __enter__(self):
        logging.getLogger().addFilter(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self)


def create_clip(model: str = "ViT-B-16", pretrained: str | None = None, checkpoint: str | None = None,
                image_size: int | Sequence[int] | None = None, tiny: bool = False, random_init: bool = False,
                quick_gelu: bool | None = None, device: str | torch.device = "cpu"):
    """Build an open_clip model in eval mode.

    Args:
        model: open_clip architecture name (``ViT-B-16``); ignored when ``tiny``.
        pretrained: an open_clip pretrained tag (``openai``, ``laion2b_s34b_b88k``...); downloads.
        checkpoint: a checkpoint file: OpenAI TorchScript (``ViT-B-16.pt``) or an open_clip state dict.
        image_size: (H, W) to build the image tower at (``force_image_size``); None = the model's own.
        tiny: the random-weight test architecture ``CNS-Tiny-ViT`` (tests only).
        random_init: ``model`` with random weights (benchmarks only).
        quick_gelu: activation override; None = what the weights were trained with (OpenAI: QuickGELU).
    Returns:
        ``(clip_model, info)`` where ``info`` records the weight source, ``mean``/``std`` (the model's
        preprocess config) and ``quick_gelu``.
    """
    import open_clip
    from open_clip.model import resize_pos_embed, resize_text_pos_embed

    _register_configs()
    src = weights.resolve_weights("clip", model, checkpoint, pretrained, tiny, random_init)
    name = src["model"]
    force_size = tuple(int(s) for s in image_size) if image_size is not None else None
    if quick_gelu is None:
        if src["source"] == "pretrained":
            tag_cfg = open_clip.get_pretrained_cfg(name, src["tag"]) or {}
            quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        elif src["source"] == "checkpoint":
            quick_gelu = is_torchscript(src["path"])
        else:
            quick_gelu = False
    kwargs = dict(force_image_size=force_size, force_quick_gelu=quick_gelu, device="cpu")
    if src["source"] == "pretrained":
        clip = open_clip.create_model(name, pretrained=src["tag"], require_pretrained=True, **kwargs)
    else:
        if src["source"] == "checkpoint":
            sd = load_clip_state_dict(src["path"])
        else:
            # random weights drawn at the architecture's own (square) size with a fixed seed, then loaded like
            # a checkpoint: the same model whatever the training resolution, on the driver and every worker
            with torch.random.fork_rng(devices=[]), _quiet_open_clip():
                torch.manual_seed(RANDOM_SEED)
                sd = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu).state_dict()
            log.warning("CLIP %s has RANDOM weights (%s: tests and benchmarks only)", name, src["source"])
        with _quiet_open_clip():
            clip = open_clip.create_model(name, pretrained=None, **kwargs)
        if "logit_scale" in sd and sd["logit_scale"].ndim != clip.logit_scale.ndim:
            sd["logit_scale"] = sd["logit_scale"].reshape(clip.logit_scale.shape)
        resize_pos_embed(sd, clip)
        resize_text_pos_embed(sd, clip)
        clip.load_state_dict(sd, strict=True)
    pp = getattr(clip.visual, "preprocess_cfg", {}) or {}
    mean = tuple(pp.get("mean") or weights.OPENAI_CLIP_MEAN)
    std = tuple(pp.get("std") or weights.OPENAI_CLIP_STD)
    info = {**src, "quick_gelu": quick_gelu, "mean": mean, "std": std, "image_size": clip.visual.image_size}
    return clip.to(device).eval(), info


# ----------------------------------------------------------------------------------------------------------
# the value path
# ----------------------------------------------------------------------------------------------------------
def _qkv_weights(block, which: int):
    attn = block.attn
    c = attn.embed_dim
    w = attn.in_proj_weight[which * c:(which + 1) * c]
    b = attn.in_proj_bias[which * c:(which + 1) * c] if attn.in_proj_bias is not None else None
    return w, b


def value_path(block, x: torch.Tensor) -> torch.Tensor:
    """MaskCLIP's last block: ``x + out_proj(v(ln_1(x)))``, then the block's MLP with its residual.

    This is exactly the block's output if its attention matrix were the identity (every token attends only
    to itself), which is what ``tests/test_maskclip.py`` checks. ``x`` is batch-first [B, N, C].
    """
    w, b = _qkv_weights(block, 2)
    v = F.linear(block.ln_1(x), w, b)
    x = x + block.ls_1(block.attn.out_proj(v))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def block_keys(block, x: torch.Tensor) -> torch.Tensor:
    """The last block's attention keys [B, N, C] (used by MaskCLIP's key smoothing)."""
    w, b = _qkv_weights(block, 1)
    return F.linear(block.ln_1(x), w, b)


class MaskCLIP(nn.Module):
    """CLIP's image tower returning one embedding per patch (MaskCLIP).

    The first ``layers - 1`` blocks run as trained; the last is ``last_block(block, x, grid_hw)``: a dense
    teacher of :mod:`pipeline.models.dense` (default: MaskCLIP's value path, :func:`value_path`); then
    ``ln_post`` and ``proj`` as for CLIP's class token. The class token is dropped.

    Input of :meth:`forward`: uint8 RGB images [B, H, W, 3] (or float [B, 3, H, W] already normalised) at
    the resolution the model was built at. Output: L2-normalised features [B, E, H/16, W/16].
    """

    def __init__(self, clip, mean: Sequence[float], std: Sequence[float], last_block=None):
        super().__init__()
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        visual = clip.visual
        if not isinstance(visual, VisionTransformer) or getattr(visual, "attn_pool", None) is not None:
            raise NotImplementedError(f"MaskCLIP needs an open_clip VisionTransformer with a class token "
                                      f"(got {type(visual).__name__})")
        if not isinstance(visual.transformer.resblocks[-1], ResidualAttentionBlock):
            raise NotImplementedError("MaskCLIP needs standard ResidualAttentionBlocks (q/k/v in_proj)")
        self.clip = clip
        self.last_block = last_block if last_block is not None else (lambda block, x, grid_hw: value_path(block, x))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def visual(self):
        return self.clip.visual

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.visual.image_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.visual.grid_size)

    @property
    def embed_dim(self) -> int:
        return int(self.visual.output_dim)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> normalised float [B, 3, H, W] with CLIP's own mean/std."""
        x = images.to(self.mean.device).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Tokens entering the last block [B, 1 + h*w, C] (batch-first): the class token, then the patches.

        Through open_clip's public ``VisionTransformer.forward_intermediates`` (open_clip_torch >= 3.3, the
        range setup.cfg pins): the output of block L-2, class token and patch tokens as two tensors."""
        if tuple(pixels.shape[-2:]) != self.image_size:
            raise ValueError(f"images are {tuple(pixels.shape[-2:])}, the model was built for {self.image_size}")
        before_last = len(self.visual.transformer.resblocks) - 2
        out = self.visual.forward_intermediates(pixels, indices=[before_last], stop_early=True, output_fmt="NLC",
                                                intermediates_only=True, output_extra_tokens=True)
        return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)

    def forward(self, images: torch.Tensor, return_keys: bool = False):
        pixels = self.preprocess(images) if images.dtype == torch.uint8 else images
        x = self.tokens(pixels)
        last = self.visual.transformer.resblocks[-1]
        y = self.last_block(last, x, self.grid_size)[:, 1:]
        y = self.visual.ln_post(y) @ self.visual.proj
        b, (h, w) = y.shape[0], self.grid_size
        feat = F.normalize(y, dim=-1).transpose(1, 2).reshape(b, -1, h, w)
        if not return_keys:
            return feat
        keys = block_keys(last, x)[:, 1:]
        return feat, keys.transpose(1, 2).reshape(b, -1, h, w)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], tokenizer, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings [len(texts), E]."""
        dev = self.mean.device
        out = []
        for i in range(0, len(texts), batch_size):
            tok = tokenizer(list(texts[i:i + batch_size])).to(dev)
            out.append(F.normalize(self._encode_text(tok).float(), dim=-1))
        return torch.cat(out)

    def _encode_text(self, tok: torch.Tensor) -> torch.Tensor:
        """``clip.encode_text`` on the context up to the longest prompt's end token.

        CLIP's text tower is causal and pools at the end token (``argmax`` of the ids), so the padding after
        it cannot change the result; cutting it makes the 85-template embedding ~4x cheaper. Models with
        another text tower use ``encode_text`` as it is. ``tests/test_maskclip.py`` checks the equality.
        """
        from open_clip.model import CLIP
        clip = self.clip
        mask = getattr(clip, "attn_mask", None)
        if not (type(clip) is CLIP and getattr(clip, "text_pool_type", "") == "argmax" and mask is not None):
            return clip.encode_text(tok)
        n = int(tok.argmax(dim=-1).max()) + 1
        cast = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tok[:, :n]).to(cast) + clip.positional_embedding[:n].to(cast)
        x = clip.ln_final(clip.transformer(x, attn_mask=mask[:n, :n]))
        x = x[torch.arange(x.shape[0], device=x.device), tok.argmax(dim=-1)]
        proj = clip.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj


# ----------------------------------------------------------------------------------------------------------
# text embeddings
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def text_embeddings(model: MaskCLIP, tokenizer, class_names: Sequence[str], descriptive: bool = False,
                    dataset: str | None = None, templates: Sequence[str] = prompts.TEMPLATES) -> torch.Tensor:
    """Class text embeddings ``t_l`` [L, E], float32, L2-normalised.

    Every prompt (template x synonym) is embedded and L2-normalised; a class's prompts are averaged and the
    mean normalised again.
    """
    return embed_class_words(model, tokenizer, prompts.class_texts(class_names, descriptive=descriptive,
                                                                   dataset=dataset), templates)


@torch.no_grad()
def embed_class_words(model: MaskCLIP, tokenizer, words: Sequence[Sequence[str]],
                      templates: Sequence[str] = prompts.TEMPLATES) -> torch.Tensor:
    """[L, E] embeddings of classes given by their prompt words (one tuple of synonyms per class,
    :func:`pipeline.models.prompts.class_texts`), as :func:`text_embeddings` describes."""
    texts, owner = [], []
    for cls, synonyms in enumerate(words):
        for w in synonyms:
            ps = prompts.prompts_for(w, templates)
            texts += ps
            owner += [cls] * len(ps)
    emb = model.encode_text(texts, tokenizer)
    owner_t = torch.tensor(owner, device=emb.device)
    sums = torch.zeros(len(words), emb.shape[1], device=emb.device).index_add_(0, owner_t, emb)
    return F.normalize(sums / torch.bincount(owner_t, minlength=len(words))[:, None], dim=-1).cpu()


def architecture(name: str = "ViT-B-16") -> dict:
    """``embed_dim`` (E) and ``patch_size`` of an open_clip architecture, from its config (nothing is built)."""
    import open_clip
    _register_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise UnknownNameError(f"unknown open_clip architecture '{name}'")
    patch = cfg["vision_cfg"].get("patch_size")
    if patch is None:
        raise NotImplementedError(f"MaskCLIP needs a ViT image tower; {name} has none")
    return {"embed_dim": int(cfg["embed_dim"]), "patch_size": int(patch)}


def build_maskclip(model: str = "ViT-B-16", pretrained: str | None = None, checkpoint: str | None = None,
                   image_size: Sequence[int] | None = None, tiny: bool = False, random_init: bool = False,
                   device: str | torch.device = "cpu", dense: str = "maskclip",
                   dense_options: dict | None = None) -> tuple[MaskCLIP, object, dict]:
    """:class:`MaskCLIP` and its tokenizer; see :func:`create_clip` for the arguments. ``dense`` names the
    dense teacher of :mod:`pipeline.models.dense` whose last block the model runs, with ``dense_options``."""
    import open_clip

    from .dense import get_teacher
    teacher = get_teacher(dense, **(dense_options or {}))
    clip, info = create_clip(model, pretrained, checkpoint, image_size, tiny, random_init, device=device)
    tokenizer = open_clip.get_tokenizer(info["model"])
    return MaskCLIP(clip, info["mean"], info["std"], teacher).to(device).eval(), tokenizer, info


def build_text_embeddings(class_names: Sequence[str], model: str = "ViT-B-16", pretrained: str | None = None,
                          checkpoint: str | None = None, tiny: bool = False, device: str = "cpu",
                          descriptive: bool = False, dataset: str | None = None) -> torch.Tensor:
    """Class text embeddings [L, E] (float32, CPU, rows L2-normalised) for ``class_names``.

    The public entry point for open-vocabulary evaluation: 85 prompt templates, each prompt embedding
    normalised, averaged per class, normalised again. ``descriptive`` swaps in the descriptive names of
    :data:`pipeline.models.prompts.DESCRIPTIVE_NAMES`. Weight sources as in :func:`create_clip` (``tiny``:
    the random test model; raises :class:`WeightsError` when no weights are given).
    """
    m, tok, _ = build_maskclip(model, pretrained, checkpoint, None, tiny, device=device)
    return text_embeddings(m, tok, class_names, descriptive=descriptive, dataset=dataset)


# ----------------------------------------------------------------------------------------------------------
# predictor
# ----------------------------------------------------------------------------------------------------------
class MaskCLIPPredictor:
    """Per-pixel CLIP labels for batches of images.

    Args:
        model: a :class:`MaskCLIP`.
        text_embed: [L, E] class text embeddings (rows L2-normalised), or None to set later (:meth:`set_text`).
        logit_scale: multiplies the cosine similarities before the softmax (CLIP's 100).
        prompt_denoising: MaskCLIP's prompt denoising threshold, 0 = off (MaskCLIP uses 0.5): a class whose
            softmax probability stays below it at every patch of an image is removed from that image.
        key_smoothing: MaskCLIP's key smoothing threshold, 0 = off (MaskCLIP uses 1.0): patches whose top
            probability is below it take the average of all patches' probabilities weighted by the cosine
            similarity of the last block's keys (negative similarities count as 0 and the weights are
            normalised, so the result stays a distribution). When on, probabilities (not logits) are
            upsampled.
        bf16: run the image tower under bfloat16 autocast (for CUDA; also works on CPUs with bf16 support);
            the features are cast back and renormalised in float32 before scoring.
        pamr: refine the upsampled scores with PAMR (:mod:`pipeline.models.pamr`, NACLIP's defaults: 10
            iterations, dilations 8 and 16) guided by the normalised image, before the softmax.

    :meth:`predict` returns ``labels`` uint8 [B, H, W] (argmax class) and ``confidence`` uint8 [B, H, W]
    (softmax probability of that class x 255, rounded).
    """

    def __init__(self, model: MaskCLIP, text_embed: torch.Tensor | None, logit_scale: float = DEFAULT_LOGIT_SCALE,
                 prompt_denoising: float = 0.0, key_smoothing: float = 0.0, bf16: bool = False,
                 pamr: bool = False):
        self.model = model
        self.bf16 = bool(bf16)
        self.pamr = bool(pamr)
        self.device = model.mean.device
        self.text = None
        if text_embed is not None:
            self.set_text(text_embed)
        self.logit_scale = float(logit_scale)
        self.prompt_denoising = float(prompt_denoising or 0.0)
        self.key_smoothing = float(key_smoothing or 0.0)

    def set_text(self, text_embed: torch.Tensor) -> None:
        t = torch.as_tensor(text_embed, dtype=torch.float32)
        if t.ndim != 2 or t.shape[1] != self.model.embed_dim:
            raise ValueError(f"text embeddings {tuple(t.shape)} do not match the model's width "
                             f"{self.model.embed_dim}")
        if t.shape[0] > 255:
            raise ValueError("uint8 labels hold at most 255 classes (255 = ignore)")
        self.text = F.normalize(t, dim=-1).to(self.device)

    @torch.no_grad()
    def scores(self, images: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Patch-level scores [B, L, h, w] and whether they are probabilities (else logits)."""
        s, is_prob, _ = self._scores_and_features(images)
        return s, is_prob

    def _scores_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, bool, torch.Tensor]:
        if self.text is None:
            raise RuntimeError("no class text embeddings set (MaskCLIPPredictor.set_text)")
        feat, keys = self.features(images, return_keys=self.key_smoothing > 0)
        s, is_prob = self.scores_from_features(feat, keys)
        return s, is_prob, feat

    @torch.no_grad()
    def features(self, images: torch.Tensor, return_keys: bool = False):
        """The dense features [B, E, h, w] float32, L2-normalised (and the last block's keys, or None)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(torch.as_tensor(images).to(self.device), return_keys=return_keys)
        feat, keys = out if return_keys else (out, None)
        feat = F.normalize(feat.float(), dim=1)  # bf16 features renormalised in float32 (a no-op in float32)
        return feat, (keys.float() if keys is not None else None)

    @torch.no_grad()
    def scores_from_features(self, feat: torch.Tensor, keys: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
        """Patch-level scores from dense features [B, E, h, w] (and the last block's keys, for key smoothing)."""
        smooth = self.key_smoothing > 0
        if smooth and keys is None:
            raise ValueError("key smoothing needs the last block's keys")
        feat = feat.to(self.device, torch.float32)
        logits = self.logit_scale * torch.einsum("behw,le->blhw", feat, self.text)
        if self.prompt_denoising > 0:
            p = logits.softmax(dim=1).flatten(2).amax(dim=2)  # [B, L]
            drop = p < self.prompt_denoising
            drop &= ~drop.all(dim=1, keepdim=True)  # never drop every class of an image
            logits = logits.masked_fill(drop[:, :, None, None], -1e4)
        if not smooth:
            return logits, False
        b, l, h, w = logits.shape
        prob = logits.softmax(dim=1).flatten(2).transpose(1, 2)  # [B, hw, L]
        k = F.normalize(keys.flatten(2).transpose(1, 2), dim=-1)  # [B, hw, C]
        wgt = (k @ k.transpose(1, 2)).clamp_min(0.0)  # non-negative, so the result stays a distribution
        smoothed = (wgt @ prob) / wgt.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        sel = prob.amax(dim=-1, keepdim=True) < self.key_smoothing
        prob = torch.where(sel, smoothed, prob)
        return prob.transpose(1, 2).reshape(b, l, h, w), True

    @torch.no_grad()
    def predict(self, images: np.ndarray | torch.Tensor, return_features: bool = False):
        """``(labels, confidence)`` uint8 [B, H, W]; with ``return_features`` also the dense features
        float32 [B, E, h, w] that were scored (the model's L2-normalised patch embeddings)."""
        imgs = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
        s, is_prob, feat = self._scores_and_features(imgs)
        guide = None  # PAMR's guide: the normalised image the model saw
        if self.pamr:
            guide = self.model.preprocess(imgs) if imgs.dtype == torch.uint8 else imgs.to(self.device).float()
        size = tuple(imgs.shape[1:3]) if guide is None else tuple(guide.shape[-2:])
        labels, conf = self.labels_from_scores(s, is_prob, size, guide)
        return (labels, conf, feat.float().cpu().numpy()) if return_features else (labels, conf)

    @staticmethod
    def labels_from_scores(s: torch.Tensor, is_prob: bool, size_hw, guide: torch.Tensor | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
        """Patch scores [B, L, h, w] upsampled bilinearly to ``size_hw`` -> labels and confidences (uint8);
        with a ``guide`` image [B, 3, H, W], PAMR refines the upsampled scores first."""
        s = F.interpolate(s, size=tuple(size_hw), mode="bilinear", align_corners=False)
        if guide is not None:
            from .pamr import pamr
            s = pamr(guide.to(s.device), s)
        if is_prob:
            p = s / s.sum(dim=1, keepdim=True).clamp_min(1e-12)
        else:
            p = s.softmax(dim=1)
        conf, label = p.max(dim=1)
        conf = (conf * 255.0).round_().clamp_(0, 255).to(torch.uint8)
        return label.to(torch.uint8).cpu().numpy(), conf.cpu().numpy()
