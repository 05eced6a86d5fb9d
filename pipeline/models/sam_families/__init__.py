"""SAM families behind one option (``--sam-model`` / ``SAM_MODEL``): each family is a module registered in
:data:`SAM_FAMILIES` that builds its models, names its checkpoints and makes the ``sam`` stage's generator.

======================  ==========================================  ===============================================
family (module)         ``--sam-model``                             package (pip extra)
======================  ==========================================  ===============================================
``sam1`` (:mod:`.sam1`)  ``vit_h``, ``vit_l``, ``vit_b``             ``segment-anything`` (a base dependency)
``sam2`` (:mod:`.sam2`)  ``sam2.1_hiera_tiny|small|base_plus|large``  ``sam2`` (``pip install -e '.[sam2]'``)
``hq`` (:mod:`.hq`)      ``hq_vit_b``, ``hq_vit_l``, ``hq_vit_h``    ``segment-anything-hq`` (``pip install -e '.[hq]'``)
======================  ==========================================  ===============================================

Every family writes the same arrays (``sam/mask_id`` int32, -1 = no mask; ``sam/feat`` through the fixed PCA
projection), on the same feature grid: SAM's ``feature_grid`` of the training resolution (long side 1024,
16-pixel cells; a family whose embedding covers the image differently resamples its image cells to it).

A family class provides (see :class:`SamFamily`): ``models`` (its ``--sam-model`` names) and ``test_model``
(the random-weight model ``--test-tiny-models`` builds), ``config(model)`` (embedding width, input size,
stride, generator defaults), ``resolve_weights``, ``build``, ``generator`` and ``detect`` (the architecture a
state_dict holds, for the one-line wrong-checkpoint error of :func:`check_architecture`).
"""
from __future__ import annotations

import importlib

from data_cache.errors import OptionError

from ...registry import Registry
from ..weights import WeightsError

SAM_FAMILIES = Registry("SAM family")
_MODULES = ("sam1", "sam2", "hq")


class MissingExtraError(WeightsError):
    """A SAM family's package is not installed: one line naming the pip command."""


def _load_all() -> None:
    for name in _MODULES:
        importlib.import_module(f"{__name__}.{name}")


def families() -> list:
    _load_all()
    return [SAM_FAMILIES.get(n) for n in SAM_FAMILIES.names()]


def model_names() -> list[str]:
    """Every ``--sam-model`` value, family by family."""
    return [m for fam in families() for m in fam.models]


def family_of(model: str):
    """The family class that builds ``model`` (a ``--sam-model`` name or a family's test model)."""
    for fam in families():
        if model in fam.models or model == fam.test_model:
            return fam
    raise WeightsError(f"unknown SAM model '{model}' (--sam-model / SAM_MODEL: {', '.join(model_names())})")


class SamFamily:
    """What every family module implements (class attributes and classmethods; no state)."""

    name = ""
    models: tuple[str, ...] = ()
    test_model = ""        # built by --test-tiny-models (random weights, toy or reduced size)
    package = ""           # import name of the family's library
    install = ""           # the command that installs it

    @classmethod
    def require(cls) -> None:
        """:class:`MissingExtraError` (one line naming the install command) when the package is absent."""
        try:
            importlib.import_module(cls.package)
        except ImportError as e:
            raise MissingExtraError(f"SAM model family {cls.name} needs the '{cls.package}' package ({e}); "
                                    f"install it with: {cls.install}") from None

    @classmethod
    def config(cls, model: str) -> dict:
        """``{"embed_dim", "image_size", "patch_size", "generator_defaults"}`` of ``model``."""
        raise NotImplementedError

    @classmethod
    def resolve_weights(cls, model: str, checkpoint: str | None = None, tiny: bool = False,
                        random_init: bool = False) -> dict:
        """``{"source": "tiny"|"random"|"checkpoint", "model_type", "model", "path"?}`` or :class:`WeightsError`:
        the project's one weights policy (:func:`pipeline.models.weights.resolve_weights`: ``tiny``/
        ``random_init`` (explicit test flags) > ``checkpoint`` > the registry's file in
        ``$CNS_CHECKPOINTS``/``checkpoints``), with the family's own test model for ``tiny``."""
        from .. import weights
        if tiny:
            return {"source": "tiny", "model_type": cls.test_model, "model": cls.test_model}
        if model not in cls.models:
            raise WeightsError(f"SAM model '{model}' is not one of family {cls.name}'s: {', '.join(cls.models)}")
        src = weights.resolve_weights("sam", model, checkpoint, random_init=random_init)
        return {**src, "model_type": src["model"]}

    @classmethod
    def build(cls, model: str, checkpoint: str | None = None, tiny: bool = False, random_init: bool = False,
              device="cpu"):
        """``(model, info)``: the network in eval mode and ``info`` (:meth:`resolve_weights` + :meth:`config`)."""
        raise NotImplementedError

    @classmethod
    def generator_classes(cls) -> tuple[type, type]:
        """``(batched, upstream)``: the family's generator classes (imported when asked)."""
        raise NotImplementedError

    @classmethod
    def generator(cls, model, kind: str, bf16: bool = False, encoder_batch: int = 4, **thresholds):
        """The ``sam`` stage's generator (``kind``: batched | upstream): an object with ``label_images(images,
        out_hw, grid_hw)``, ``encode(images)``, ``image_grid(embedding, image_hw, grid_hw)`` and ``timings``.
        bf16 is a setting of the batched generator only (the upstream ones run in float32)."""
        batched, upstream = cls.generator_classes()
        if kind == "batched":
            return batched(model, bf16=bf16, encoder_batch=encoder_batch, **thresholds)
        if bf16:
            raise OptionError("sam option bf16=true needs generator=batched")
        return upstream(model, **thresholds)

    @classmethod
    def detect(cls, state_dict: dict) -> str | None:
        """The model name of this family whose architecture ``state_dict`` holds, else None."""
        raise NotImplementedError


def weights_help(model: str) -> str:
    return (f"get weights with `make weights SAM_MODEL={model}` (python -m pipeline.models.weights --sam {model}), "
            f"then pass --sam-checkpoint PATH")


def unwrap_state_dict(obj) -> dict:
    """The state_dict of a loaded checkpoint: SAM 2 wraps it as ``{"model": ...}``, SAM and HQ-SAM do not."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj["model"]
    return obj


def detect_architecture(state_dict: dict) -> str | None:
    """The ``--sam-model`` (or test model) whose architecture ``state_dict`` holds, from a few keys and
    shapes (:meth:`SamFamily.detect` of each family), or None when no family recognises it."""
    for fam in families():
        held = fam.detect(state_dict)
        if held is not None:
            return held
    return None


def check_architecture(state_dict: dict, model: str, path: str) -> None:
    """One :class:`WeightsError` line when the checkpoint at ``path`` holds another architecture than
    ``model``: the architecture it holds and the option to pass (instead of the state_dict's key lists)."""
    held = detect_architecture(state_dict)
    if held is None:
        raise WeightsError(f"{path} is not a checkpoint of any SAM family known here (SAM, SAM 2.1, HQ-SAM): "
                           f"--sam-model {model} cannot load it")
    if held != model:
        raise WeightsError(f"{path} holds a {held} checkpoint, not {model}: pass --sam-model {held} "
                           f"(make labels SAM_MODEL={held})")


def read_checked(path: str, model: str) -> dict:
    """The state_dict in ``path`` (memory-mapped: a listing of keys and shapes reads no weights), after
    :func:`check_architecture` — called before a network is built, so a wrong file costs no model build."""
    import torch
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:  # a legacy (non-zip) torch file cannot be memory-mapped: read it whole
        if "mmap" not in str(e):
            raise
        obj = torch.load(path, map_location="cpu", weights_only=True)
    sd = unwrap_state_dict(obj)
    check_architecture(sd, model, path)
    return sd


def load_checked(network, state_dict: dict, path: str, model: str) -> None:
    """Load a :func:`read_checked` state_dict into ``network`` (strict); a file of the right architecture
    that still does not fit is one line with the numbers of missing and unexpected keys."""
    missing, unexpected = network.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        first = (list(missing) + list(unexpected))[0]
        raise WeightsError(f"{path}: a {model} checkpoint that does not fit the {model} architecture "
                           f"({len(missing)} missing, {len(unexpected)} unexpected state_dict keys, e.g. {first})")


def blocks_in(state_dict: dict, prefix: str) -> int:
    """Number of ``<prefix><i>.`` blocks in ``state_dict`` (1 + the largest index)."""
    idx = [int(k[len(prefix):].split(".", 1)[0]) for k in state_dict if k.startswith(prefix)
           and k[len(prefix):].split(".", 1)[0].isdigit()]
    return max(idx) + 1 if idx else 0
