"""Simulated foundation models: MaskCLIP and SAM outputs made from a store's ground truth, with known noise.

**A benchmark component, clearly named as such, never a fallback.** Real CLIP and SAM checkpoints cannot be
downloaded everywhere this project runs; to test what CNS does with noisy labels there, the simulator writes
a store in the normal schema whose ``maskclip`` and ``sam`` arrays come from the ground truth through a
controlled corruption (:mod:`pipeline.simulate.noise` describes it), so the real ``refine`` stage, the trainer
and the evaluation run on it unchanged and the recovery can be measured against a known truth.

Design (why the runner is untouched):

* The simulated stages (:mod:`pipeline.simulate.stages`) subclass :class:`pipeline.stages.base.Stage` under
  the real names ``maskclip`` and ``sam`` in their own registry. :func:`pipeline.stages.base.build_stage` picks
  them when the stage options carry ``simulate`` (the validated knobs) -- what ``cns-cli labels --simulate
  CONFIG`` passes. They write exactly the arrays of the real stages (``clip/text_embed``, ``clip/label``,
  ``clip/confidence``; ``sam/mask_id``, ``sam/feat``, ``sam/proj``, ``sam/proj_mean``) with the same shapes, and
  the done markers of those stage names, so ``refine``, the trainer and ``cns-cli cache validate`` need no
  change. Nothing selects them without ``--simulate``: without checkpoints the real stages still refuse.
* Their fingerprints carry ``"simulated": true``, the simulator's name and version, the seed and every knob
  of the stage. A rerun with real models (or other knobs) on such a store is refused by the runner's
  fingerprint check, naming the field; :meth:`data_cache.store.Store.simulated_stages` reads the marker back
  (``cns-cli cache status`` / ``validate`` print it).
* The knobs are one YAML file with a seed, ``pipeline/simulate/configs/default.yaml`` (the defaults; a user's file is
  merged over it and checked key by key, :mod:`pipeline.simulate.config`).

Ground truth: ``images/gt`` where the store has it (synthetic scenes); else (real ScanNet, nuScenes) the
labelled points projected through the ``correspond`` stage's pairs, the nearest point winning a pixel. That is
sparse: unlabelled pixels take the class of the nearest labelled pixel within
``ground_truth.fill_max_distance_px``; pixels farther away are "unknown" -- CLIP labels them at random (a
uniform class histogram) and SAM segments them as regions of their own. The simulated outputs of an image
depend only on the seed, the image's identity (frame token, image name) and its ground truth.
"""
from .config import SimulationConfigError, available_configs, load_config
from .stages import SIMULATOR_NAME, SIMULATOR_VERSION, simulated_stage_options

__all__ = ["SIMULATOR_NAME", "SIMULATOR_VERSION", "SimulationConfigError", "available_configs", "load_config",
           "simulated_stage_options"]
