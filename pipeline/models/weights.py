"""Registry of the pretrained checkpoints the label stages use, with their preprocessing constants.

Each entry names the official download, its checksum and the image normalisation the network was trained
with, so that nothing about a model's input is guessed at run time::

    python -m pipeline.models.weights                       # CLIP ViT-B/16 (OpenAI) + SAM ViT-H into checkpoints/
    python -m pipeline.models.weights --sam vit_b --dest /data/ckpt
    python -m pipeline.models.weights --list

Downloads go to ``<dest>/<filename>`` (``dest`` defaults to ``$CNS_CHECKPOINTS`` or ``checkpoints``), are
checked against the registry's sha256 (or md5 where only that is published) and are renamed into place only
when the check passes. :func:`find_local` looks a checkpoint up in the same folder; the stages use it when no
checkpoint path is given, so ``make weights`` is enough to run them.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from data_cache.store import file_digest
from data_cache.errors import UnknownNameError, UserError

#: CLIP's image normalisation (OpenAI; open_clip's ``OPENAI_DATASET_MEAN``/``_STD``), on 0..1 pixels.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: SAM's image normalisation (``Sam.pixel_mean``/``pixel_std``), on 0..255 pixels.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
#: SAM 2's image normalisation (``SAM2Transforms``), on 0..1 pixels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)



class WeightsError(UserError, RuntimeError):
    """No usable weight source was given (the stages never fall back to random weights)."""


#: the random-weight test architecture of each kind (``configs/clip/CNS-Tiny-ViT.json``, ``configs/sam/tiny.json``)
TINY_MODELS = {"clip": "CNS-Tiny-ViT", "sam": "tiny"}
#: how to get each kind's weights, appended to every WeightsError
WEIGHTS_HELP = {
    "clip": "get weights with `make weights` (python -m pipeline.models.weights), then pass --clip-checkpoint "
            "PATH, or let open_clip download them with --clip-pretrained openai",
    "sam": "get weights with `make weights` (python -m pipeline.models.weights --sam vit_h), then pass "
           "--sam-checkpoint PATH",
}


def resolve_weights(kind: str, model: str, checkpoint: str | None = None, pretrained: str | None = None,
                    tiny: bool = False, random_init: bool = False) -> dict:
    """Where the weights of a CLIP or SAM ``model`` come from: the project's one weights policy, never
    random weights unless asked.

    Order: ``tiny`` / ``random_init`` (explicit test and benchmark flags) > ``checkpoint`` > ``pretrained``
    (an open_clip tag; CLIP only) > the registry's default file in ``$CNS_CHECKPOINTS``/``checkpoints`` (what
    ``make weights`` downloads) > :class:`WeightsError`.
    Returns ``{"source": "tiny"|"random"|"checkpoint"|"pretrained", "model", "path"?, "tag"?}``.
    """
    if kind not in TINY_MODELS:
        raise KeyError(f"unknown weights kind '{kind}' (known: {', '.join(TINY_MODELS)})")
    what = "CLIP" if kind == "clip" else "SAM"
    if tiny:
        return {"source": "tiny", "model": TINY_MODELS[kind]}
    if random_init:
        return {"source": "random", "model": model}
    if checkpoint:
        if not Path(checkpoint).is_file():
            raise WeightsError(f"{what} checkpoint {checkpoint} does not exist; {WEIGHTS_HELP[kind]}")
        return {"source": "checkpoint", "model": model, "path": str(checkpoint)}
    if pretrained:
        if kind != "clip":
            raise WeightsError(f"{what} weights have no pretrained tags (got '{pretrained}'); {WEIGHTS_HELP[kind]}")
        return {"source": "pretrained", "model": model, "tag": pretrained}
    local = find_local(kind, model)
    if local is not None:
        return {"source": "checkpoint", "model": model, "path": str(local)}
    raise WeightsError(f"no {what} weights for {model}: no checkpoint{', no pretrained tag' if kind == 'clip' else ''}"
                       f" given, and {checkpoint_dir()}/ holds no registered checkpoint; {WEIGHTS_HELP[kind]}")


@dataclass(frozen=True)
class Checkpoint:
    """One official checkpoint.

    ``kind`` is ``"clip"`` or ``"sam"``; ``model`` the architecture name it loads into (an open_clip model
    name, or a SAM ``model_type``); ``sha256``/``md5`` the published or verified checksums (None: unknown);
    ``preprocess`` the input normalisation and resolution the network was trained at; ``quick_gelu`` whether
    the CLIP checkpoint needs QuickGELU activations (OpenAI's do).
    """

    name: str
    kind: str
    model: str
    url: str
    filename: str
    sha256: str | None = None
    md5: str | None = None
    quick_gelu: bool = False
    preprocess: dict = field(default_factory=dict)
    size_mb: int = 0
    note: str = ""  # where the checksum comes from, or why there is none


CHECKPOINTS: dict[str, Checkpoint] = {c.name: c for c in (
    Checkpoint(
        name="clip-vit-b-16-openai", kind="clip", model="ViT-B-16",
        url="https://openaipublic.azureedge.net/clip/models/"
            "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
        filename="ViT-B-16.pt",
        # OpenAI publishes the sha256 as the URL's folder name (clip.clip._download checks it)
        sha256="5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
        quick_gelu=True, size_mb=335,
        preprocess={"mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD, "size": 224, "scale": 1.0 / 255.0,
                    "interpolation": "bicubic"},
    ),
    Checkpoint(
        name="sam-vit-h", kind="sam", model="vit_h",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        filename="sam_vit_h_4b8939.pth", md5="4b8939a88964f0f4ff5f5b2642c598a6", size_mb=2446,
        preprocess={"mean": SAM_PIXEL_MEAN, "std": SAM_PIXEL_STD, "long_side": 1024, "scale": 1.0},
    ),
    Checkpoint(
        name="sam-vit-l", kind="sam", model="vit_l",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        filename="sam_vit_l_0b3195.pth", md5="0b3195507c641ddb6910d2bb5adee89c", size_mb=1191,
        preprocess={"mean": SAM_PIXEL_MEAN, "std": SAM_PIXEL_STD, "long_side": 1024, "scale": 1.0},
    ),
    Checkpoint(
        name="sam-vit-b", kind="sam", model="vit_b",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        filename="sam_vit_b_01ec64.pth", md5="01ec64d29a2fca3f0661936605ae66f8", size_mb=358,
        preprocess={"mean": SAM_PIXEL_MEAN, "std": SAM_PIXEL_STD, "long_side": 1024, "scale": 1.0},
    ),
    *(Checkpoint(
        name=f"sam2.1-hiera-{size.replace('_', '-')}", kind="sam", model=f"sam2.1_hiera_{size}",
        url=f"https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_{size}.pt",
        filename=f"sam2.1_hiera_{size}.pt", size_mb=mb,
        note="no published checksum (SAM 2's checkpoints/download_ckpts.sh and model cards give none); "
             "size approximate (third-party listing)",
        preprocess={"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "size": 1024, "scale": 1.0 / 255.0,
                    "resize": "square (aspect not kept)"},
    ) for size, mb in (("tiny", 156), ("small", 185), ("base_plus", 324), ("large", 900))),
    *(Checkpoint(
        name=f"sam-hq-vit-{v}", kind="sam", model=f"hq_vit_{v}",
        url=f"https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_{v}.pth",
        filename=f"sam_hq_vit_{v}.pth", size_mb=mb,
        note="no published checksum (HQ-SAM's README links the files without one); size approximate "
             "(third-party listing)",
        preprocess={"mean": SAM_PIXEL_MEAN, "std": SAM_PIXEL_STD, "long_side": 1024, "scale": 1.0},
    ) for v, mb in (("b", 379), ("l", 1300), ("h", 2600))),
)}

#: The checkpoint a stage uses when given none: (kind, model) -> registry name (every SAM family's models).
DEFAULTS = {("clip", "ViT-B-16"): "clip-vit-b-16-openai",
            **{(c.kind, c.model): c.name for c in CHECKPOINTS.values() if c.kind == "sam"}}


def get(name: str) -> Checkpoint:
    try:
        return CHECKPOINTS[name]
    except KeyError:
        raise UnknownNameError(f"unknown checkpoint '{name}' (known: {', '.join(sorted(CHECKPOINTS))})") from None


def default_for(kind: str, model: str) -> Checkpoint | None:
    name = DEFAULTS.get((kind, model))
    return CHECKPOINTS[name] if name else None


def checkpoint_dir(dest: str | os.PathLike | None = None) -> Path:
    return Path(dest or os.environ.get("CNS_CHECKPOINTS") or "checkpoints")


def find_local(kind: str, model: str, dest: str | os.PathLike | None = None) -> Path | None:
    """The registry's default checkpoint for ``(kind, model)`` if it was downloaded to ``dest``, else None."""
    ck = default_for(kind, model)
    if ck is None:
        return None
    p = checkpoint_dir(dest) / ck.filename
    return p if p.is_file() else None


class ChecksumMismatch(WeightsError, ValueError):
    """A weights file whose checksum is not the registry's (a ``ValueError`` too, as it always was)."""


def verify(path: str | os.PathLike, ck: Checkpoint) -> None:
    """Raise ``ValueError`` if ``path`` does not match the registry's checksum (sha256, else md5)."""
    for algo, want in (("sha256", ck.sha256), ("md5", ck.md5)):
        if want:
            got = file_digest(path, algo)
            if got != want:
                raise ChecksumMismatch(f"{path}: {algo} {got} differs from the registry's {want} for {ck.name} "
                                 f"(a partial or different file; delete it and download again)")
            return


def download(name: str, dest: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Download checkpoint ``name`` into ``dest`` (skipped when a verified copy is there); returns its path."""
    ck = get(name)
    out = checkpoint_dir(dest) / ck.filename
    if out.is_file():
        verify(out, ck)
        print(f"{ck.name}: {out} present and verified")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{ck.filename}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(ck.url) as r:
            total = int(r.headers.get("Content-Length") or 0)
            done = 0
            while chunk := r.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                if progress and sys.stderr.isatty():
                    pct = f"{100 * done / total:5.1f}%" if total else f"{done >> 20} MiB"
                    print(f"\r{ck.name}: {pct}", end="", file=sys.stderr)
        if progress and sys.stderr.isatty():
            print(file=sys.stderr)
        verify(tmp, ck)
        if not (ck.sha256 or ck.md5):
            print(f"{ck.name}: no published checksum; {Path(tmp).stat().st_size} bytes downloaded, not verified "
                  f"(registry size ~{ck.size_mb} MB)")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"{ck.name}: downloaded to {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.models.weights", description=__doc__.splitlines()[0])
    p.add_argument("--dest", default=None, help="folder (default: $CNS_CHECKPOINTS or ./checkpoints)")
    p.add_argument("--clip", default="ViT-B-16", help="CLIP model to fetch ('none' to skip)")
    p.add_argument("--sam", default="vit_h", help="comma-separated SAM models (--sam-model names: vit_h, vit_l, "
                                                  "vit_b, sam2.1_hiera_tiny|small|base_plus|large, hq_vit_b|l|h), "
                                                  "'all' or 'none'")
    p.add_argument("--list", action="store_true", help="list the registry and exit")
    a = p.parse_args(argv)
    if a.list:
        for ck in CHECKPOINTS.values():
            local = checkpoint_dir(a.dest) / ck.filename
            check = f"sha256 {ck.sha256[:12]}…" if ck.sha256 else f"md5 {ck.md5}" if ck.md5 else "no published checksum"
            print(f"{ck.name:24s} {ck.kind:5s} {ck.model:22s} {ck.size_mb:5d} MB  "
                  f"{'present' if local.is_file() else 'missing'}  {check}  {ck.url}")
        return 0
    names = []
    if a.clip.lower() != "none":
        ck = default_for("clip", a.clip)
        if ck is None:
            p.error(f"no registered checkpoint for CLIP model {a.clip}")
        names.append(ck.name)
    all_sams = [c.model for c in CHECKPOINTS.values() if c.kind == "sam"]
    sams = [] if a.sam.lower() == "none" else (all_sams if a.sam == "all" else a.sam.split(","))
    for m in sams:
        ck = default_for("sam", m.strip())
        if ck is None:
            p.error(f"no registered checkpoint for SAM model type {m}")
        names.append(ck.name)
    failed = []
    for n in names:
        try:
            download(n, a.dest)
        except Exception as e:  # noqa: BLE001 — report every checkpoint, fail at the end
            print(f"{n}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            failed.append(n)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
