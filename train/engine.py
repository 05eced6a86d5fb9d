"""The training loop: store checks, two-stage schedule, checkpoints and resume, DDP, logging.

One process per GPU under ``torchrun`` (DDP; gloo on CPU). Everything random is re-seeded from
``(seed, epoch, rank)`` at the start of each epoch -- the data order, the augmentations (per item), the
label switching and torch's global generator -- so that a run resumed from the checkpoint of epoch e
continues exactly as the uninterrupted run would have, and two CPU runs with one seed are identical.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from data_cache import schema
from data_cache.errors import UserError
from data_cache.integrity import require_complete_chunks
from data_cache.store import CacheError, Store, labels_command

from .config import ConfigError, backfill_added_keys, dump_config
from .data import (TRAINING_ARRAYS, CacheFrameDataset, EpochSampler, batch_to, collate_offsets, latent_feature_arrays,
                   worker_init)
from .labels import LabelSources, allowed_sources, point_target_mode, switch_targets
from .losses import cotraining_loss, latent_losses
from .models import build_model


def describe_parent(checkpoint, cfg: dict) -> dict:
    """What ``config.yaml`` records of a run started with ``--init-from CHECKPOINT``: the checkpoint (path and
    sha256), how far its run had come, its ablation and the configuration keys this run changes."""
    from data_cache.store import file_digest
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    parent = dict(state["config"], init_from=None)
    return {"checkpoint": str(Path(checkpoint).resolve()), "sha256": file_digest(checkpoint),
            "epochs_done": int(state["epoch"]) + 1, "global_step": int(state["global_step"]),
            "parent_ablation": parent.get("ablation"),
            "changed_keys": diff_configs(parent, dict(cfg, init_from=None), ignore=())}


#: Keys that may change when a run is resumed (they do not change what is computed).
RESUMABLE_KEYS = ("data.num_workers", "schedule.log_interval", "eval.interval", "schedule.keep_checkpoints",
                  "model.sparse_backend")  # the backends build the same modules and load the same checkpoints


class RunDirError(UserError, FileExistsError):
    """``--out`` already holds a run that this command would overwrite."""


class StoreMismatch(CacheError):
    """A store does not fit the configuration (schema version, classes, text embeddings) or lacks a stage."""


def text_embed_sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr, dtype=np.float32).tobytes()).hexdigest()


#: loss.latent_target without CLIP, for a store whose teacher wrote no clip/feat (an import without features)
_WITHOUT_CLIP = {"clip": "none", "sam+clip": "sam"}


def _drop_absent_latent_features(store: Store, cfg: dict) -> None:
    """Leave ``clip/feat`` out of the Eq. 7 target (with a printed note) when the store's teacher wrote none."""
    target = cfg["loss"]["latent_target"]
    if target in _WITHOUT_CLIP and "clip/feat" in schema.absent_arrays(store.raw_attrs.get("stages", {})):
        cfg["loss"]["latent_target"] = _WITHOUT_CLIP[target]
        print(f"note: {store.path}: its imported labels came without features (no clip/feat); "
              f"loss.latent_target {target} -> {_WITHOUT_CLIP[target]}", file=sys.stderr)


def check_stores(paths, cfg: dict, for_training: bool = True) -> dict:
    """Refuse stores that do not fit ``cfg``; fill ``data.class_names``/``data.text_embed_sha256`` from the
    first store when the configuration leaves them null (so the dump pins them for resume and eval).
    ``for_training``: the stores must also hold the feature grids of the Eq. 7 target.

    Returns ``{"class_names", "text_embed" [L, E], "feature_dims" {"sam": D, "clip": D} (those present),
    "point_channels"}``.
    """
    if not paths:
        raise StoreMismatch("no cache store given (--cache)")
    d = cfg["data"]
    info = None
    for path in paths:
        st = Store(path)
        require_complete_chunks(st)  # before anything is written to --out
        a = st.attrs
        if a.schema_version != d["schema_version"]:
            raise StoreMismatch(f"{path}: schema version {a.schema_version}, the configuration expects "
                                f"{d['schema_version']} (data.schema_version); rebuild the store with "
                                f"`cns-cli labels` of this version")
        missing = [s for s in schema.STAGE_ORDER if not st.stage_complete(s)]
        if missing:
            raise StoreMismatch(f"{path}: stage(s) {', '.join(missing)} not complete; run "
                                f"{labels_command(path, st.raw_attrs, stages=','.join(missing))}")
        has_points = "points" in a.modalities
        if not has_points and cfg["model"]["net3d"]:
            raise StoreMismatch(f"{path}: the store has no points (a 2D-only dataset); train the 2D network "
                                "alone with a configuration whose model.net3d is null, e.g. --config nuimages")
        if for_training:
            _drop_absent_latent_features(st, cfg)
        needed = TRAINING_ARRAYS + (latent_feature_arrays(cfg) if for_training else ())
        absent = [n for n in needed if n not in st and (has_points or schema.spec(n).modality != "points")]
        if absent:
            stages = sorted({schema.spec(n).stage for n in absent}, key=schema.STAGE_ORDER.index)
            raise StoreMismatch(f"{path}: missing array(s) {', '.join(absent)}; run "
                                f"{labels_command(path, st.raw_attrs, stages=','.join(stages))}")
        names = list(a.class_names)
        if d["class_names"] is None:
            d["class_names"] = names
        elif list(d["class_names"]) != names:
            diff = [f"{i}: store '{x}' vs configuration '{y}'" for i, (x, y) in
                    enumerate(zip(names, d["class_names"])) if x != y]
            raise StoreMismatch(f"{path}: class list does not match data.class_names ({len(names)} vs "
                                f"{len(d['class_names'])} classes; {'; '.join(diff[:3]) or 'length differs'})")
        embed = np.asarray(st.array("clip/text_embed")[:], dtype=np.float32)
        sha = text_embed_sha256(embed)
        if d["text_embed_sha256"] is None:
            d["text_embed_sha256"] = sha
        elif d["text_embed_sha256"] != sha:
            raise StoreMismatch(f"{path}: clip/text_embed (sha256 {sha[:12]}...) differs from the text "
                                f"embeddings of the configuration (data.text_embed_sha256 "
                                f"{d['text_embed_sha256'][:12]}...): another CLIP model or prompt set")
        dims = {name: int(st.array(f"{name}/feat").shape[1]) for name in ("sam", "clip") if f"{name}/feat" in st}
        this = {"class_names": names, "text_embed": torch.from_numpy(embed), "feature_dims": dims,
                "point_channels": int(st.array("points/feat").shape[1]) if has_points else 0}
        if info is None:
            info = this
        else:
            for k in ("feature_dims",) + (("point_channels",) if cfg["model"]["net3d"] else ()):
                if info[k] != this[k]:
                    raise StoreMismatch(f"{path}: {k} {this[k]} differs from {paths[0]} ({info[k]})")
    return info


def default_eval_stores(train_paths) -> list[str]:
    """Held-out stores for the evaluation during training: the val store beside each training store
    (``<dataset>-train.zarr`` -> ``<dataset>-val.zarr``) when every one exists; else the training stores."""
    val = []
    for p in map(Path, train_paths):
        stem = p.name[: -len(schema.STORE_SUFFIX)] if p.name.endswith(schema.STORE_SUFFIX) else p.name
        if not stem.endswith("-train"):
            return [str(q) for q in train_paths]
        cand = p.with_name(stem[: -len("-train")] + "-val" + schema.STORE_SUFFIX)
        if not cand.exists():
            return [str(q) for q in train_paths]
        val.append(str(cand))
    return val


class _BatchForward(torch.nn.Module):
    """``model(batch)`` for :func:`torch.optim.swa_utils.update_bn`, which calls its module on each batch."""

    def __init__(self, model: torch.nn.Module, device: torch.device, amp: bool):
        super().__init__()
        self.model, self.device, self.amp = model, device, amp

    def forward(self, batch: dict):
        b = batch_to(batch, self.device)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            return self.model(b["rgb"], b["voxel_feat"], b["voxel_index"], b["inverse"], len(b["point_offset"]) - 1)


def recalibrate_batchnorm(model: torch.nn.Module, store_paths, cfg: dict, device: torch.device, amp: bool = False,
                          num_images: int | None = None) -> dict:
    """Re-estimate every BatchNorm's running statistics of both networks on training images.

    torchvision's MobileNetV3 uses BatchNorm momentum 0.01, so after a short run the running statistics are
    still mostly their initial values: evaluated in eval mode such a net predicts little but the majority
    classes. ``torch.optim.swa_utils.update_bn`` resets them and takes the cumulative average over forward
    passes in train mode without gradients. The frames are spread evenly over the stores, read without
    augmentation (the evaluation's view of an image) with ``data.images_per_frame`` images each, in batches
    of ``data.batch_size`` frames, until ``num_images`` (``eval.bn_recalibration_images``) images are seen.
    Deterministic: the same frames every time, and no global random state is consumed.

    Returns ``{"images": n, "frames": m}`` (zeros when disabled).
    """
    from torch.optim.swa_utils import update_bn
    want = int(cfg["eval"]["bn_recalibration_images"] if num_images is None else num_images)
    if want <= 0:
        return {"images": 0, "frames": 0}
    n_want = int(cfg["data"]["images_per_frame"])
    ds = CacheFrameDataset(store_paths, cfg, train=False, images_per_frame=n_want)
    per_frame = []
    for s, f in ds.index:
        offs = ds.meta[s]["offsets"]["images"]
        n_avail = int(offs[f + 1] - offs[f])
        per_frame.append(n_avail if n_want <= 0 else min(n_avail, n_want))
    mean_images = max(1.0, float(np.mean(per_frame))) if per_frame else 1.0
    n_frames = min(len(ds), max(1, math.ceil(want / mean_images)))
    frames = np.unique(np.linspace(0, len(ds) - 1, n_frames).round().astype(np.int64)).tolist()
    batch = int(cfg["data"]["batch_size"])
    loader = DataLoader(torch.utils.data.Subset(ds, frames), batch_size=batch, drop_last=len(frames) > batch,
                        shuffle=False, num_workers=int(cfg["data"]["num_workers"]), collate_fn=collate_offsets,
                        worker_init_fn=worker_init, generator=torch.Generator().manual_seed(0))
    cpu_state = torch.get_rng_state()  # dropout in train mode draws from torch's generator: leave it untouched
    try:
        update_bn(loader, _BatchForward(model, device, amp))
    finally:
        torch.set_rng_state(cpu_state)
    used = frames[: len(loader) * batch] if loader.drop_last else frames
    return {"images": int(sum(per_frame[i] for i in used)), "frames": len(used)}


def diff_configs(a: dict, b: dict, prefix: str = "", ignore=RESUMABLE_KEYS) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_configs(va, vb, key + ".", ignore)
        elif va != vb and key not in ignore:
            out.append(f"{key}: {va!r} -> {vb!r}")
    return out


# -- distributed --------------------------------------------------------------------------------------
def setup_distributed(device: str | None) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def _seed_everything(seed: int, epoch: int, rank: int) -> torch.Generator:
    torch.manual_seed(seed * 1_000_003 + epoch * 1009 + rank)
    np.random.seed((seed * 7919 + epoch * 31 + rank) % (2 ** 32))
    return torch.Generator().manual_seed(seed * 999_983 + epoch * 131 + rank * 7 + 1)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill during the save never leaves a truncated checkpoint behind


def _truncate_metrics(path: Path, global_step: int, epoch: int) -> None:
    """On resume, drop metric lines a killed run wrote after its last checkpoint."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("step", 0) <= global_step and rec.get("epoch", -1) <= epoch:
            keep.append(line)
    path.write_text("".join(l + "\n" for l in keep))


class Trainer:
    def __init__(self, cfg: dict, cache_paths, out_dir, eval_paths=None, device: str | None = None,
                 resume: bool = False, progress: bool = True, init_from: str | Path | None = None):
        """``init_from``: a checkpoint of another run to start from (``--init-from``): its weights, its
        optimizer state where the parameters match, its epoch and step; this run's own configuration. The
        parent is recorded in ``config.yaml`` (``init_from``)."""
        self.cfg = cfg
        self.out = Path(out_dir)
        self.rank, self.world, self.device = setup_distributed(device)
        self.cache_paths = [str(p) for p in cache_paths]
        self.eval_paths = [str(p) for p in (eval_paths or default_eval_stores(self.cache_paths))]
        self.info = check_stores(self.cache_paths, cfg)
        from .evaluate import store_teacher
        self.teacher = store_teacher(self.cache_paths[0])
        check_stores(self.eval_paths, cfg, for_training=False)
        from .evaluate import store_label
        self.eval_label = store_label(self.eval_paths)
        self.eval_held_out = not (set(map(os.path.abspath, self.eval_paths))
                                  & set(map(os.path.abspath, self.cache_paths)))
        self.progress = progress and self.rank == 0
        self.amp = bool(cfg["schedule"]["amp"]) and self.device.type == "cuda"
        self.ckpt_dir = self.out / "checkpoints"
        self.start_epoch, self.global_step = 0, 0
        self.bn_recalibration = {"images": 0, "frames": 0}
        if init_from is not None:  # after check_stores: the class list etc. are filled in as in the parent
            cfg["init_from"] = describe_parent(init_from, cfg)
        self._prepare_run_dir(resume)

        in_ch = self.info["point_channels"] + (3 if cfg["data"]["use_xyz"] else 0)
        torch.manual_seed(int(cfg["seed"]))  # the initial weights: the same on every rank and every run
        self.model = build_model(cfg, in_ch, self.info["text_embed"], self.info["feature_dims"], self.device)
        self.dataset = CacheFrameDataset(self.cache_paths, cfg, train=True)
        # one sampler for 1 and N processes: deterministic shuffles by (seed, epoch)
        self.sampler = EpochSampler(DistributedSampler(self.dataset, num_replicas=self.world, rank=self.rank,
                                                       shuffle=True, seed=int(cfg["seed"])), len(self.dataset))
        d = cfg["data"]
        # a last batch of one frame of one image would break DeepLabV3's pooled BatchNorm in train mode
        self.loader = DataLoader(self.dataset, batch_size=int(d["batch_size"]), sampler=self.sampler,
                                 drop_last=len(self.sampler) >= int(d["batch_size"]),
                                 num_workers=int(d["num_workers"]), collate_fn=collate_offsets,
                                 worker_init_fn=worker_init, pin_memory=self.device.type == "cuda",
                                 persistent_workers=int(d["num_workers"]) > 0,
                                 # its own generator: drawing the workers' base seed from torch's global one
                                 # would shift the dropout masks by the number of loader restarts
                                 generator=torch.Generator().manual_seed(int(cfg["seed"])))
        s = cfg["schedule"]
        self.steps_per_epoch = len(self.loader)
        if s["max_steps_per_epoch"]:
            self.steps_per_epoch = min(self.steps_per_epoch, int(s["max_steps_per_epoch"]))
        total = max(1, self.steps_per_epoch * int(s["epochs"]))
        if s["optimizer"] == "adamw":
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=float(s["lr"]),
                                               weight_decay=float(s["weight_decay"]))
        else:
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=float(s["lr"]), momentum=float(s["momentum"]),
                                             weight_decay=float(s["weight_decay"]))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        if cfg["init_from"] and not (self.ckpt_dir / "last.pth").exists():
            self._init_from_parent(cfg["init_from"])  # a fork's first start (or a resume before its checkpoint)
        elif resume:
            self._load_checkpoint()
        self.ddp_model = self.model
        if self.world > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.writer = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.out / "tb"), purge_step=self.global_step or None)

    # -- run directory / checkpoints ------------------------------------------------------------
    def _prepare_run_dir(self, resume: bool) -> None:
        dumped = self.out / "config.yaml"
        if resume and dumped.exists():
            import yaml
            before = backfill_added_keys(yaml.safe_load(dumped.read_text()))  # a run dumped before a key existed
            diffs = diff_configs(before, self.cfg)
            if diffs:
                raise ConfigError(f"--resume with a configuration that differs from {dumped}: "
                                    + "; ".join(diffs))
        elif not resume and (self.ckpt_dir / "last.pth").exists():
            raise RunDirError(f"{self.out} already holds a run; pass --resume to continue it or choose "
                              "another --out")
        if self.rank == 0:
            dump_config(self.cfg, dumped)

    def _save_checkpoint(self, epoch: int) -> None:
        if self.rank != 0:
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = {"epoch": epoch, "global_step": self.global_step, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "config": self.cfg,
                 "bn_recalibration": self.bn_recalibration, "feature_dims": self.info["feature_dims"],
                 # what `cns-cli predict` needs without the training store: the heads' class embeddings, the
                 # point channels the 3D net reads, and the teacher (CLIP text tower) of the training store
                 "text_embed": self.info["text_embed"].cpu(), "point_channels": self.info["point_channels"],
                 "train_stores": self.cache_paths, "teacher": self.teacher}
        # last.pth first: an epoch file on disk always implies a last.pth at least as new
        _atomic_save(state, self.ckpt_dir / "last.pth")
        _atomic_save(state, self.ckpt_dir / f"epoch_{epoch + 1:03d}.pth")
        keep = int(self.cfg["schedule"]["keep_checkpoints"])
        if keep > 0:  # full-size checkpoints are ~0.5 GB each: keep the newest few
            for old in sorted(self.ckpt_dir.glob("epoch_*.pth"))[:-keep]:
                old.unlink()

    def _load_checkpoint(self) -> None:
        path = self.ckpt_dir / "last.pth"
        if not path.exists():  # --resume before the first checkpoint: start from scratch
            if self.rank == 0:
                _truncate_metrics(self.out / "metrics.jsonl", 0, -1)
            return
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.global_step = int(state["epoch"]) + 1, int(state["global_step"])
        self.bn_recalibration = state.get("bn_recalibration", self.bn_recalibration)
        if self.rank == 0:
            _truncate_metrics(self.out / "metrics.jsonl", self.global_step, int(state["epoch"]))

    def _init_from_parent(self, parent: dict) -> None:
        """Start from another run's checkpoint (a fork): Table 2 rows that differ only in stage 2 share one
        stage-1 run. Weights whose name and shape match are loaded (a head this configuration lacks is
        dropped, one it adds keeps its initialisation); the optimizer state is loaded when the parameters are
        the same, else SGD starts with empty momentum; the learning rate continues on this run's schedule at
        the parent's step."""
        from data_cache.store import file_digest
        path = parent["checkpoint"]
        if not Path(path).exists():
            raise ConfigError(f"--init-from checkpoint {path} does not exist")
        if file_digest(path) != parent["sha256"]:
            raise ConfigError(f"--init-from checkpoint {path} changed since this run recorded it "
                              f"(sha256 {parent['sha256'][:12]}...)")
        state = torch.load(path, map_location=self.device, weights_only=False)
        own = self.model.state_dict()
        bad = [k for k, v in state["model"].items() if k in own and own[k].shape != v.shape]
        if bad:
            raise ConfigError(f"--init-from {path}: weights of another shape for {', '.join(bad[:5])} "
                              "(another network or store)")
        result = self.model.load_state_dict(state["model"], strict=False)
        if not result.missing_keys and not result.unexpected_keys:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.global_step = int(state["epoch"]) + 1, int(state["global_step"])
        if self.start_epoch >= int(self.cfg["schedule"]["epochs"]):
            raise ConfigError(f"--init-from {path}: the parent has done {self.start_epoch} epochs, this "
                              f"configuration has schedule.epochs={self.cfg['schedule']['epochs']}")
        self.scheduler.last_epoch = self.global_step
        for group, base, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * fn(self.global_step)
        self.bn_recalibration = state.get("bn_recalibration", self.bn_recalibration)
        if self.rank == 0:  # a fork killed before its first checkpoint: drop the lines it wrote
            _truncate_metrics(self.out / "metrics.jsonl", self.global_step, self.start_epoch - 1)

    def _log(self, record: dict) -> None:
        if self.rank != 0:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.writer is not None:
            prefix = record["type"]
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    self.writer.add_scalar(f"{prefix}/{k}", v, record.get("step", self.global_step))

    # -- one step (Eq. 5-7 are called from here) ------------------------------------------------
    def training_step(self, batch: dict, stage: int, generator: torch.Generator) -> dict:
        cfg = self.cfg
        batch = batch_to(batch, self.device)
        L = len(cfg["data"]["class_names"])
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            out = self.ddp_model(batch["rgb"], batch["voxel_feat"], batch["voxel_index"], batch["inverse"],
                                 len(batch["point_offset"]) - 1)
        lc = cfg["labels"]
        with torch.no_grad():  # each net's own prediction: the argmax of this very forward pass
            pred2d = out["logits2d"].argmax(1) if stage == 2 and "logits2d" in out else None
            pred3d = out["logits3d"].argmax(1) if stage == 2 and "logits3d" in out else None
            gated = stage == 2 and lc["switch_gate"] == "confidence"  # its softmax probability, when gated by it
            conf2d = out["logits2d"].float().softmax(1).amax(1) if gated and "logits2d" in out else None
            conf3d = out["logits3d"].float().softmax(1).amax(1) if gated and "logits3d" in out else None
        sources = LabelSources(batch, pred2d, pred3d, L, refine=bool(lc["refine"]), gate=lc["switch_gate"],
                               confidence=(conf2d, conf3d), threshold=lc["gate_confidence"])
        allowed2d, allowed3d = allowed_sources(cfg, stage)
        per_pair = point_target_mode(cfg) == "pairs"
        target2d, target3d, choices = switch_targets(sources, batch, allowed2d, allowed3d, generator,
                                                     unit=cfg["labels"]["switch"],
                                                     point_targets=point_target_mode(cfg))
        lw = cfg["loss"]
        losses = cotraining_loss(out.get("logits2d"), target2d, out.get("logits3d"), target3d,
                                 lw["weight_2d"], lw["weight_3d"], lw["class_balance"],
                                 pair_point=batch["pair_point"] if per_pair else None)
        losses.update(latent_losses(out, batch, lw["latent_target"]))
        losses["loss"] = losses["loss"] + lw["weight_latent"] * (losses["latent2d"] + losses.get("latent3d", 0))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"]).backward()
        if cfg["schedule"]["grad_clip"]:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(cfg["schedule"]["grad_clip"]))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        res = {k: float(v.detach()) for k, v in losses.items()}
        res["choices"] = choices
        return res

    def train(self, stop_after_epochs: int | None = None) -> list[dict]:
        from tqdm import tqdm
        cfg, s = self.cfg, self.cfg["schedule"]
        epochs, warmup = int(s["epochs"]), int(s["warmup_epochs"])
        eval_results = []
        for epoch in range(self.start_epoch, epochs):
            stage = 1 if epoch < warmup else 2
            generator = _seed_everything(int(cfg["seed"]), epoch, self.rank)
            self.sampler.set_epoch(epoch)  # the epoch travels inside the indices to the (persistent) workers
            self.model.train()
            bar = tqdm(total=self.steps_per_epoch, disable=not self.progress, leave=False,
                       desc=f"epoch {epoch + 1}/{epochs} stage {stage}", dynamic_ncols=True)
            wait = busy = first_wait = 0.0
            frames = 0
            t_last = time.perf_counter()
            for i, batch in enumerate(self.loader):
                if i >= self.steps_per_epoch:
                    break
                t_data = time.perf_counter()
                res = self.training_step(batch, stage, generator)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                t_done = time.perf_counter()
                wait += t_data - t_last
                busy += t_done - t_data
                if i == 0:
                    first_wait = t_data - t_last
                t_last = t_done
                frames += len(batch["point_offset"]) - 1
                self.global_step += 1
                rate = frames / max(wait + busy, 1e-9)
                bar.set_postfix(loss=f"{res['loss']:.3f}", frames_s=f"{rate:.2f}")
                bar.update(1)
                if self.global_step % int(s["log_interval"]) == 0 or i == self.steps_per_epoch - 1:
                    ch = res["choices"]
                    shares = {f"share{dim}_{name}": v for dim in ("2d", "3d")
                              for name, v in ch.get(f"share{dim}", {}).items()}
                    self._log({"type": "train", "epoch": epoch, "step": self.global_step, "stage": stage,
                               "lr": self.scheduler.get_last_lr()[0], "frames_per_s": rate,
                               "data_wait_share": wait / max(wait + busy, 1e-9),
                               **{k: v for k, v in res.items() if k != "choices"}, **shares,
                               **{f"targets{dim}": ",".join(ch[dim]) for dim in ("2d", "3d") if dim in ch}})
            bar.close()
            self.last_epoch_timing = {"wait_s": wait, "busy_s": busy, "frames": frames, "first_wait_s": first_wait,
                                      "steps": min(i + 1, self.steps_per_epoch)}
            interval = int(cfg["eval"]["interval"])
            last = epoch == epochs - 1
            do_eval = bool(interval and (epoch + 1) % interval == 0) or (last and cfg["eval"]["at_end"])
            if do_eval or last:  # before the checkpoint, so a resumed run holds the same statistics
                self.bn_recalibration = recalibrate_batchnorm(self.model, self.cache_paths, cfg, self.device, self.amp)
            self._save_checkpoint(epoch)
            if do_eval:
                eval_results.append(self.evaluate(epoch))
            if self.world > 1:
                dist.barrier()
            if stop_after_epochs is not None and epoch + 1 >= stop_after_epochs:
                break
        if self.world > 1:
            self.check_replicas_in_sync()
        if self.writer is not None:
            self.writer.flush()
        return eval_results

    def check_replicas_in_sync(self) -> None:
        """DDP keeps one model on every rank; a divergence (e.g. a rank skipping a step) is an error."""
        flat = torch.cat([p.detach().float().reshape(-1) for p in self.model.parameters()])
        checksum = torch.stack([flat.sum(), (flat * (torch.arange(len(flat), device=flat.device) % 97)).sum()])
        gathered = [torch.zeros_like(checksum) for _ in range(self.world)]
        dist.all_gather(gathered, checksum)
        if any(not torch.allclose(g, gathered[0]) for g in gathered):
            raise RuntimeError(f"DDP replicas diverged: parameter checksums {[g.tolist() for g in gathered]}")

    def evaluate(self, epoch: int) -> dict | None:
        if self.rank != 0:
            return None
        from .evaluate import evaluate
        res = evaluate(self.model, self.eval_paths, self.cfg, self.device, with_baselines=False)
        rec = {"type": "eval", "epoch": epoch, "step": self.global_step, "eval_stores": self.eval_label,
               "held_out": self.eval_held_out, "bn_recalibration_images": self.bn_recalibration["images"]}
        for key, row in res["rows"].items():
            rec[f"miou_{key}"] = row["miou"]
        self._log(rec)
        return res


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
