"""The pre-training engine: one loop from a single CPU process to many GPUs (paper 4.2-4.3, A.2.1).

What it does, in order:

1. joins torchrun's process group if there is one (:mod:`training.pretrain.distributed`);
2. opens the dataset and its teacher cache (:mod:`training.pretrain.data`), builds the backbone
   (``refound_core.model.refound.ReFound``) for the chosen preset and the heads of the enabled
   objectives (``refound_core.losses``);
3. AdamW (beta 0.9/0.999, weight decay 0.01 except on norms, biases and embeddings), peak lr with
   linear warm-up then linear decay to zero (A.2.1: 5e-5, 5 warm-up epochs, 300 epochs, batch 80);
4. trains with gradient accumulation, gradient clipping, bf16 autocast where the hardware runs it
   natively (``refound_core.model.precision``), optional ``torch.compile``; a step whose loss or
   gradient is not finite is skipped, and too many in a row stop the run with a clear message;
5. saves a resumable training state every ``save_every`` steps, atomically, and at the end the
   model checkpoint (``refound_core.model.checkpoint.save_checkpoint``) with the visual-token
   codebook and the dataset's tokenizer and category vocabulary.

Folder written under ``--out CKPT``::

    CKPT/config.json, model.safetensors, tokenizer/, category_vocab.json, codebook.safetensors,
         provenance.json      the final checkpoint (load_checkpoint(CKPT))
    CKPT/training/pretrain_config.json   resolved configuration (defaults < file < flags)
    CKPT/training/log.jsonl, log.csv, tb/  every loss term of every step
    CKPT/training/state/step-XXXXXXXX/   resumable states; latest.json points at the newest

Resume (``--resume``) restores weights, optimizer, the step counter, every RNG and the position
inside the epoch; data order and masks are functions of (seed, epoch, index), so a run killed
with SIGKILL and resumed logs the same losses as an uninterrupted one. The position is kept as
regions of the epoch consumed by all processes together (``ResumableSampler``), so a run may also
resume with a different number of processes, as torch elastic allows: weights and optimizer are
the same on every rank, the rest of the epoch's permutation is dealt to the new ranks, ranks
without a saved RNG stream get a fresh one seeded from (seed, step, rank), and the global batch
(``--batch-size`` x processes) changes with the count (the run says so; the schedule keeps its steps).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from refound_core.config_keys import unknown_keys
from refound_core.errors import InputError
from refound_core.losses import LossConfig, PretrainHeads, compute_losses
from training.pretrain import distributed as D
from training.pretrain.data import (PretrainCollator, PretrainData, PretrainDataset, ResumableSampler, _seed_of,
                                    default_workers, make_loader)
from training.pretrain.logging import TrainLogger

RUN_SUBDIR, STATE_SUBDIR, LATEST = "training", "state", "latest.json"
CONFIG_NAME = "pretrain_config.json"
STATE_FORMAT = 1


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


@dataclass
class TrainConfig:
    """Everything a pre-training run depends on. Defaults are the paper's (A.2.1) where it gives one.

    ``steps`` (optimizer steps) or ``epochs`` sets the length; ``warmup_steps`` overrides
    ``warmup_epochs``. ``batch_size`` is per optimizer step and per rank (the paper's 80 is the
    global batch of one step: with N ranks use ``--batch-size 80/N`` or ``--grad-accum``).
    ``model``: ModelConfig overrides (e.g. ``{"use_moge": false}`` = "w/o MoGE").
    ``losses``: LossConfig fields (switches, weights, masking ratios, temperature).
    """

    data: object = ""  # a dataset folder, or a list of them (a combined corpus)
    out: str = ""
    preset: str = "base"
    teachers: object = None  # None, one cache folder, or one per dataset
    steps: Optional[int] = None
    epochs: Optional[float] = None
    batch_size: int = 80
    lr: float = 5e-5
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: Optional[int] = None
    warmup_epochs: float = 5.0
    grad_accum: int = 1
    clip: float = 1.0
    save_every: int = 1000
    keep_states: int = 2
    log_every: int = 10
    compile: bool = False
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    workers: int = -1
    max_nonfinite: int = 10
    tensorboard: bool = True
    find_unused_parameters: bool = True
    model: dict = field(default_factory=dict)
    losses: dict = field(default_factory=dict)
    init: Optional[str] = None  # continue pre-training from this checkpoint's backbone (--init)
    photometric_aug: float = 0.0  # strength of the student-image colour jitter (training/pretrain/augment.py)

    def __post_init__(self):
        self.betas = tuple(self.betas)

    def loss_config(self) -> LossConfig:
        return LossConfig.from_dict(self.losses)

    def data_folders(self) -> list:
        """``data`` as a list: one folder, or several pre-trained on at once (``--data`` repeated)."""
        return [str(d) for d in self.data] if isinstance(self.data, (list, tuple)) else [str(self.data)]

    def teacher_folders(self) -> list:
        """One teacher cache (or None: the dataset's only one) per :meth:`data_folders` entry."""
        given = self.teachers if isinstance(self.teachers, (list, tuple)) else [self.teachers]
        folders = self.data_folders()
        if given == [None]:
            return [None] * len(folders)
        if len(given) != len(folders):
            raise InputError(f"{len(given)} --teachers for {len(folders)} --data: give one teacher cache per "
                             "dataset, in the same order, or none (each dataset's only cache)")
        return [str(t) for t in given]

    def validate(self) -> None:
        if not self.data:
            raise InputError("no dataset given: pass --data DS (a folder written by `refound build-dataset`)")
        if not self.out:
            raise InputError("no output folder given: pass --out CKPT")
        if (self.steps is None) == (self.epochs is None):
            raise InputError("give the run length as exactly one of --steps N or --epochs N "
                             "(the paper: --epochs 300)")
        if self.steps is not None and self.steps < 1 or self.epochs is not None and self.epochs <= 0:
            raise InputError("--steps / --epochs must be positive")
        for name in ("batch_size", "grad_accum"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (math.isfinite(float(self.lr)) and self.lr > 0):  # NaN passes `lr <= 0`
            raise InputError(f"--lr must be a positive number, got {self.lr}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise InputError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        try:
            self.loss_config()
        except (TypeError, ValueError) as exc:
            raise InputError(f"bad loss settings: {exc}") from None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["losses"] = self.loss_config().to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        unknown, known = unknown_keys(cls, d)
        if unknown:
            raise InputError(f"unknown pre-training settings {unknown}; known: {known}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------
class PretrainModule(nn.Module):
    """Backbone + pre-training heads; ``forward(batch)`` returns :func:`compute_losses`' dict.

    One module so that DDP wraps a single forward. With ``compile`` only the backbone is
    compiled, kept outside the module tree so parameter names stay those of ``ReFound``.
    """

    def __init__(self, backbone: nn.Module, heads: PretrainHeads, loss_cfg: LossConfig, compile: bool = False):
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.loss_cfg = loss_cfg
        object.__setattr__(self, "_encode", torch.compile(backbone, dynamic=True) if compile else backbone)

    def forward(self, batch: dict) -> dict:
        out = self._encode(token_ids=batch["token_ids"], word_pos=batch["word_pos"], poi_pos=batch["poi_pos"],
                           grid_pos=batch["grid_pos"], category_ids=batch["category_ids"],
                           poi_mask=batch["poi_mask"], image=batch["image"], has_pois=batch["has_pois"],
                           has_image=batch["has_image"], masked_patches=batch.get("masked_patches"))
        return compute_losses(out, batch, self.heads, self.loss_cfg)


def param_groups(module: nn.Module, weight_decay: float) -> list:
    """AdamW groups: no decay on norms, biases, embeddings and token-like parameters.

    timm's ``param_groups_weight_decay`` already exempts every 1-D parameter (norm weights,
    biases, the mask token); its ``no_weight_decay_list`` adds the embedding tables (2-D, so
    not caught by the shape rule) and the backbone's own ``no_weight_decay()`` names.
    """
    from timm.optim import param_groups_weight_decay

    skip = set()
    for name, mod in module.named_modules():
        if isinstance(mod, nn.Embedding):
            skip.update(f"{name}.{p}" if name else p for p, _ in mod.named_parameters(recurse=False))
    backbone = getattr(module, "backbone", None)
    if backbone is not None and hasattr(backbone, "no_weight_decay"):
        skip.update(f"backbone.{n}" for n in backbone.no_weight_decay())
    return param_groups_weight_decay(module, weight_decay=weight_decay, no_weight_decay_list=sorted(skip))


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then linear decay to 0 at ``total`` (A.2.1).

    Step ``s`` (0-based) of the warm-up uses ``peak * (s + 1) / warmup``, so the first step
    already learns (Hugging Face's schedule starts at exactly 0).
    """
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    return peak * max(0.0, (total - step) / span)


def precision_choice(pref: str, device: torch.device):
    from refound_core.model.precision import PrecisionChoice, choose_precision

    if pref == "fp32":
        return PrecisionChoice(device.type, "float32", "float32 requested (--precision fp32)")
    choice = choose_precision(device)
    if pref == "bf16" and not choice.enabled:
        return PrecisionChoice(device.type, "bfloat16", "bf16 requested (--precision bf16), emulated here")
    return choice


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# Resumable training state
def _rng_state(device: torch.device) -> dict:
    state = {"torch_cpu": torch.get_rng_state(),
             "numpy": torch.from_numpy(np.asarray(np.random.get_state()[1], dtype=np.int64))}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(tensors: dict, extra: dict, device: torch.device) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["torch_cuda"], device)
    np_state = extra.get("numpy")
    if np_state is not None:
        np.random.set_state((np_state[0], tensors["numpy"].numpy().astype(np.uint32), *np_state[1:]))
    if extra.get("python") is not None:
        random.setstate((extra["python"][0], tuple(extra["python"][1]), extra["python"][2]))


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_state(run_dir: Path, step: int, module: nn.Module, optimizer, counters: dict, cfg: TrainConfig,
               info: D.DistInfo) -> Path:
    """Write ``state/step-XXXXXXXX`` atomically (temp folder, then rename) and point latest.json at it.

    Weights and RNG tensors go to safetensors; the optimizer state to ``optimizer.pt`` (our own
    file, read back with ``torch.load(weights_only=True)``); counters and config to JSON. Every
    rank stores its own RNG state (different dropout streams).
    """
    from safetensors.torch import save_file

    root = run_dir / STATE_SUBDIR
    name = f"step-{step:08d}"
    tmp = root / f".{name}.tmp"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    D.barrier(info)
    np_state = np.random.get_state()
    py_state = random.getstate()
    save_file({k: v.contiguous() for k, v in _rng_state(info.device).items()}, str(tmp / f"rng-rank{info.rank}.safetensors"))
    _atomic_json(tmp / f"rng-rank{info.rank}.json", {"numpy": [np_state[0], *np_state[2:]],
                                                     "python": [py_state[0], list(py_state[1]), py_state[2]]})
    D.barrier(info)
    if info.is_main:
        state = {k: v.detach().contiguous().cpu().clone() for k, v in module.state_dict().items()}
        save_file(state, str(tmp / "weights.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        _atomic_json(tmp / "state.json", {"format": STATE_FORMAT, "step": step, "world_size": info.world_size,
                                          "counters": counters, "config": cfg.to_dict()})
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_json(root / LATEST, {"step": step, "dir": name})
        kept = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in kept[:-max(1, cfg.keep_states)]:
            shutil.rmtree(old, ignore_errors=True)
    D.barrier(info)
    return root / name


def latest_state(run_dir: Path) -> Optional[Path]:
    root = run_dir / STATE_SUBDIR
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = json.loads(pointer.read_text(encoding="utf-8"))["dir"]
    path = root / name
    return path if (path / "state.json").is_file() else None


def load_state(path: Path, module: nn.Module, optimizer, info: D.DistInfo) -> dict:
    """Restore weights, optimizer and this rank's RNG from a state folder; returns state.json."""
    from safetensors.torch import load_file

    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if meta.get("format") != STATE_FORMAT:
        raise InputError(f"training state {path} has format {meta.get('format')}, expected {STATE_FORMAT}")
    if meta["world_size"] != info.world_size and "epoch" not in meta.get("counters", {}):
        raise InputError(f"training state {path} was written by {meta['world_size']} processes by an older version "
                         f"that kept the data position per process; this run has {info.world_size}: resume it "
                         "with the same number of processes")
    weights = load_file(str(path / "weights.safetensors"), device=str(info.device))
    module.load_state_dict(weights, strict=True)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=info.device, weights_only=True))
    rng_file = path / f"rng-rank{info.rank}.safetensors"
    if rng_file.is_file():
        extra = json.loads((path / f"rng-rank{info.rank}.json").read_text(encoding="utf-8"))
        _set_rng_state(load_file(str(rng_file)), extra, info.device)
    else:  # a rank the saved run did not have (resumed with more processes): a fresh, seeded stream
        seed = _seed_of(int(meta["config"].get("seed", 0)), int(meta["step"]), info.rank)
        torch.manual_seed(seed)
        np.random.seed(seed % (1 << 32))
        random.seed(seed)
    return meta


# ----------------------------------------------------------------------------------------------
def _prepare_out(cfg: TrainConfig, resume: bool) -> Path:
    out = Path(cfg.out)
    run_dir = out / RUN_SUBDIR
    has_state = latest_state(run_dir) is not None
    if resume and not has_state:
        raise InputError(f"--resume: {out} holds no training state to resume (expected {run_dir / STATE_SUBDIR}/"
                         f"{LATEST}); start without --resume")
    if not resume:
        if has_state or (run_dir / "log.jsonl").exists():
            raise InputError(f"{out} already holds a pre-training run; pass --resume to continue it or choose "
                             "another --out")
        if out.exists() and any(p.name != RUN_SUBDIR for p in out.iterdir()):
            raise InputError(f"--out {out} exists and is not empty; choose a new folder for the checkpoint")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _check_resumable(saved: dict, cfg: TrainConfig) -> None:
    """Settings that define the model or the data order must not change on --resume."""
    fixed = ("preset", "model", "losses", "batch_size", "grad_accum", "seed", "data", "teachers")
    now = cfg.to_dict()
    changed = [k for k in fixed if json.dumps(saved.get(k), sort_keys=True) != json.dumps(now.get(k), sort_keys=True)]
    if changed:
        raise InputError(f"--resume with changed settings {changed}; the saved run used "
                         + ", ".join(f"{k}={saved.get(k)!r}" for k in changed)
                         + ". Resume with the same settings (the step count and lr may change)")


def _load_init(cfg: TrainConfig):
    """The ``--init`` checkpoint (backbone only). Its architecture replaces ``--preset``/``model``."""
    from refound_core.model.checkpoint import CheckpointError, load_checkpoint

    if cfg.model:
        raise InputError(f"--init {cfg.init}: the architecture comes from the checkpoint; drop the model "
                         f"settings {sorted(cfg.model)} (or start from scratch without --init)")
    try:
        return load_checkpoint(cfg.init, with_head=False)
    except (CheckpointError, FileNotFoundError, OSError) as exc:
        raise InputError(f"--init {cfg.init} is not a loadable ReFound checkpoint ({exc}); pass the folder "
                         "written by `refound pretrain`") from None


def _init_provenance(init) -> dict:
    """Where a continued pre-training started: the checkpoint, its weights' identity, and what it
    had been trained on with which teachers (so the chain of teachers stays visible)."""
    from refound_core.model.checkpoint import checkpoint_identity, teachers_of

    prov = init.provenance or {}
    return {"checkpoint": str(Path(init.path).resolve()), "identity": checkpoint_identity(init.path),
            "training_data": (prov.get("training_data") or {}).get("folder"), "teachers": teachers_of(prov)}


def _final_checkpoint(out: Path, backbone: nn.Module, data: PretrainData, provenance: dict) -> Path:
    """The model checkpoint in ``out`` (next to ``training/``), via save_checkpoint.

    save_checkpoint writes a complete folder atomically; we build it as a sibling and move its
    entries into ``out`` one by one, ``config.json`` last, so ``out`` is a loadable checkpoint
    only once every file is in place, and the run folder ``training/`` stays where it is.
    """
    from refound_core.model.checkpoint import CONFIG_FILE, save_checkpoint

    tmp = out.parent / f".{out.name}.final-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    vocab = data.vocab_file
    save_checkpoint(tmp, backbone, tokenizer_dir=data.tokenizer_dir,
                    category_vocab=str(vocab) if vocab is not None else None,
                    codebook={"centroids": torch.from_numpy(np.asarray(data.targets.codebook.centroids))},
                    extra_files={"codebook_meta.json": {"normalize": bool(data.targets.codebook.normalize),
                                                        "source": data.targets.codebook.source,
                                                        "num_codes": int(data.targets.num_codes)}},
                    provenance=provenance)
    entries = sorted(tmp.iterdir(), key=lambda p: p.name == CONFIG_FILE)
    old_config = out / CONFIG_FILE
    if old_config.exists():
        old_config.unlink()  # a previous final checkpoint: invalid until the new config lands
    for entry in entries:
        dest = out / entry.name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(entry, dest)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


@dataclass
class TrainResult:
    out: Path
    steps: int
    last: dict
    skipped: int
    is_main: bool = True


def train(cfg: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Run (or resume) pre-training; see the module docstring."""
    cfg.validate()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after the tokenizer ran
    info = D.init_distributed(cfg.device)
    try:
        return _train(cfg, info, resume)
    finally:
        D.cleanup(info)


def _train(cfg: TrainConfig, info: D.DistInfo, resume: bool) -> TrainResult:
    from refound_core.model.config import preset
    from refound_core.model.refound import ReFound

    out = Path(cfg.out)
    run_dir = out / RUN_SUBDIR
    error = None
    if info.is_main:
        try:
            _prepare_out(cfg, resume)
        except InputError as exc:
            error = str(exc)
    error = D.broadcast_object(error, info)
    if error:
        raise InputError(error)

    loss_cfg = cfg.loss_config()
    init = _load_init(cfg) if cfg.init else None
    try:
        model_cfg = init.config if init is not None else preset(cfg.preset, **cfg.model)
    except (TypeError, ValueError) as exc:
        raise InputError(f"bad model settings for preset {cfg.preset!r}: {exc}") from None
    dense = "dvfm_patch" in loss_cfg.active()
    data = PretrainData.combine(
        PretrainData.open(folder, model_cfg.patches_per_side, teachers, loss_cfg.teacher_targets, patches=dense)
        for folder, teachers in zip(cfg.data_folders(), cfg.teacher_folders()))
    if init is not None:
        data.adopt_vocabulary(init.files)
    model_cfg = model_cfg.replace(vocab_size=data.vocab_size, num_categories=data.num_categories)
    featurizer = data.featurizer(model_cfg)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    backbone = ReFound(model_cfg)
    if init is not None and not resume:
        backbone.load_state_dict(init.model.state_dict())  # heads stay fresh: they fit this run's teachers
    if dense and "patch_dim" not in data.dims:
        raise InputError(f"--dvfm-patch-weight needs per-patch teacher features, but the teacher cache "
                         f"{data.teacher_folder} has none (built before 2026-12-08, or larger than the 2 GiB "
                         "spill limit): run `refound teachers` again on that dataset (it writes a new cache) "
                         "or drop the flag")
    heads = PretrainHeads(model_cfg, loss_cfg, proj_dim=loss_cfg.dvlfm_proj_dim or None, **data.dims)
    device = info.device
    module = PretrainModule(backbone, heads, loss_cfg, compile=cfg.compile).to(device)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  eps=cfg.adam_eps, **({"fused": True} if fused else {}))
    precision = precision_choice(cfg.precision, device)

    tok = data.tokenizer
    if not 0.0 <= float(cfg.photometric_aug) <= 2.0:
        raise InputError(f"--photometric-aug {cfg.photometric_aug} must lie in [0, 2] "
                         "(0 = off, 1 = the ranges documented in training/pretrain/augment.py)")
    dataset = PretrainDataset(data, featurizer, seed=cfg.seed, photometric_aug=cfg.photometric_aug,
                              patches=dense)
    collator = PretrainCollator(featurizer, model_cfg.image_size, model_cfg.patches_per_side, loss_cfg,
                                vocab_size=model_cfg.vocab_size, mask_id=tok.mask_id,
                                special_ids=(tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id), seed=cfg.seed)
    sampler = ResumableSampler(len(dataset), num_replicas=info.world_size, rank=info.rank, seed=cfg.seed)
    per_epoch = sampler.num_samples // cfg.batch_size // cfg.grad_accum
    if per_epoch < 1:
        raise InputError(f"dataset {', '.join(cfg.data_folders())} has {len(dataset)} regions: fewer than one "
                         "optimizer step of "
                         f"{cfg.batch_size} x {cfg.grad_accum} regions per process x {info.world_size} processes; "
                         "lower --batch-size / --grad-accum or use more data")
    total = int(cfg.steps) if cfg.steps is not None else int(math.ceil(cfg.epochs * per_epoch))
    warmup = int(cfg.warmup_steps) if cfg.warmup_steps is not None else int(round(cfg.warmup_epochs * per_epoch))
    workers = default_workers(device, info.world_size) if cfg.workers < 0 else int(cfg.workers)

    step, counters = 0, {"skipped": 0, "skipped_in_a_row": 0, "epoch": 0, "consumed": 0}
    if resume:
        path = latest_state(run_dir)
        saved = load_state(path, module, optimizer, info)
        _check_resumable(saved["config"], cfg)
        step, counters = int(saved["step"]), dict(saved["counters"])
        if "epoch" not in counters:  # a state of the older format: same world size (checked above)
            counters["epoch"], in_epoch = divmod(step, per_epoch)
            counters["consumed"] = in_epoch * cfg.grad_accum * cfg.batch_size * info.world_size
        if saved["world_size"] != info.world_size and info.is_main:
            print(f"resuming a run of {saved['world_size']} process(es) with {info.world_size}: the global batch "
                  f"becomes {cfg.batch_size * cfg.grad_accum * info.world_size} regions per step (was "
                  f"{cfg.batch_size * cfg.grad_accum * saved['world_size']}); the schedule keeps its {total} steps",
                  flush=True)
    else:
        torch.manual_seed(cfg.seed + 1 + info.rank)  # dropout: a different stream per rank
        np.random.seed((cfg.seed + info.rank) % (1 << 32))
        random.seed(cfg.seed + info.rank)

    logger = TrainLogger(run_dir, enabled=info.is_main, total_steps=total, start_step=step,
                         log_every=cfg.log_every, tensorboard=cfg.tensorboard)
    resolved = {**cfg.to_dict(), "resolved": {
        "model": model_cfg.to_dict(), "world_size": info.world_size, "device": str(device),
        "precision": f"{precision.dtype_name} ({precision.reason})", "workers": workers,
        "steps_per_epoch": per_epoch, "total_steps": total, "warmup_steps": warmup,
        "global_batch": cfg.batch_size * cfg.grad_accum * info.world_size,
        "objectives": list(loss_cfg.active()), "teacher_cache": str(data.teacher_folder)}}
    if info.is_main:
        _atomic_json(run_dir / CONFIG_NAME, resolved)
        if resume:
            logger.truncate_after(step)
        logger.message(f"pre-training {model_cfg.name} ({sum(p.numel() for p in backbone.parameters()) / 1e6:.1f} M "
                       f"params) on {device} x{info.world_size}, {precision.dtype_name}; objectives "
                       f"{'+'.join(loss_cfg.active())}; step {step}/{total}, {per_epoch} steps/epoch, "
                       f"warm-up {warmup}")
        if warmup >= total:
            logger.message(f"warning: the warm-up ({warmup} steps) is not shorter than the run ({total} steps), so "
                           "the learning rate never reaches its peak; pass --warmup-steps")

    ddp = None
    if info.enabled:
        # find_unused_parameters: the P/S experts of the fusion layers exist (official layout)
        # but never run, and the mask embedding is idle without MGDM.
        ddp = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters)
    runner = ddp or module
    params = [p for p in module.parameters() if p.requires_grad]
    last: dict = {}
    try:
        step_regions = cfg.batch_size * cfg.grad_accum * info.world_size  # regions per step, all ranks
        while step < total:
            epoch, consumed = int(counters["epoch"]), int(counters["consumed"])
            sampler.set_start(consumed)
            loader = make_loader(dataset, collator, sampler, batch_size=cfg.batch_size, workers=workers,
                                 device=device, epoch=epoch)
            batches = iter(loader)
            left = len(sampler) // (cfg.batch_size * cfg.grad_accum)  # whole steps left in this epoch
            for done_in_epoch in range(1, left + 1):
                if step >= total:
                    break
                last = _train_step(step, epoch, batches, runner, ddp, optimizer, params, cfg, precision,
                                   info, warmup, total, counters)
                step += 1
                counters["consumed"] = consumed + done_in_epoch * step_regions
                if done_in_epoch == left:  # the epoch is complete: the next step starts the next one
                    counters["epoch"], counters["consumed"] = epoch + 1, 0
                logger.record(step, last)
                if counters["skipped_in_a_row"] >= cfg.max_nonfinite:
                    raise NonFiniteLossError(
                        f"the loss or gradient was not finite in {counters['skipped_in_a_row']} consecutive steps "
                        f"(up to step {step}; {counters['skipped']} skipped in total; last terms: "
                        + ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k in loss_cfg.active() or k == "loss")
                        + "). Lower --lr, raise --warmup-steps, try --precision fp32, or check the teacher cache "
                        "for NaN/inf values")
                if cfg.save_every > 0 and step % cfg.save_every == 0 and step < total:
                    save_state(run_dir, step, module, optimizer, counters, cfg, info)
            if left == 0:  # fewer regions left than one step (a resume with more processes)
                counters["epoch"], counters["consumed"] = epoch + 1, 0
            del batches, loader
        save_state(run_dir, step, module, optimizer, counters, cfg, info)  # a later --resume can extend the run
        if info.is_main:
            prov = {**data.provenance(), "pretraining": {"steps": step, "objectives": list(loss_cfg.active()),
                                                         "teacher_targets": loss_cfg.teacher_targets,
                                                         "photometric_aug": float(cfg.photometric_aug),
                                                         "config": str(run_dir / CONFIG_NAME)}}
            if init is not None:
                prov["pretraining"]["init"] = _init_provenance(init)
            _final_checkpoint(out, backbone, data, prov)
            logger.message(f"saved checkpoint {out} after {step} steps ({counters['skipped']} skipped)")
        D.barrier(info)
    finally:
        logger.close()
    return TrainResult(out=out, steps=step, last=last, skipped=counters["skipped"], is_main=info.is_main)


def _train_step(step, epoch, batches, runner, ddp, optimizer, params, cfg: TrainConfig, precision,
                info: D.DistInfo, warmup: int, total: int, counters: dict) -> dict:
    """One optimizer step over ``grad_accum`` micro-batches; returns the logged metrics."""
    from refound_core.model.precision import autocast

    t0 = time.perf_counter()
    lr = lr_at(step, cfg.lr, warmup, total)
    for group in optimizer.param_groups:
        group["lr"] = lr
    waited = 0.0
    sums: dict = {}
    regions = 0
    for micro in range(cfg.grad_accum):
        tw = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - tw
        regions += int(batch["token_ids"].shape[0])
        batch = _to_device(batch, info.device)
        sync = contextlib.nullcontext() if ddp is None or micro == cfg.grad_accum - 1 else ddp.no_sync()
        with sync:
            with autocast(info.device, precision):
                terms = runner(batch)
            (terms["loss"] / cfg.grad_accum).backward()
        for k, v in terms.items():
            v = v.detach().float()
            sums[k] = v if k not in sums else sums[k] + v
    max_norm = cfg.clip if cfg.clip and cfg.clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    keys = sorted(sums)
    vec = torch.stack([sums[k] / cfg.grad_accum for k in keys] + [grad_norm.detach().float().to(sums["loss"].device)])
    bad = (~torch.isfinite(vec[[keys.index("loss"), len(keys)]])).any().float().reshape(1)
    vec = torch.cat([vec, bad])
    if info.enabled:
        D.all_reduce_sum(vec, info)
        vec[:-1] /= info.world_size
    vec = vec.cpu()
    skip = bool(vec[-1] > 0)
    if skip:
        counters["skipped"] += 1
        counters["skipped_in_a_row"] += 1
    else:
        optimizer.step()
        counters["skipped_in_a_row"] = 0
    optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - t0
    metrics = {k: float(vec[i]) for i, k in enumerate(keys)}
    metrics.update(epoch=epoch, lr=lr, grad_norm=float(vec[len(keys)]), skipped=int(skip),
                   regions_per_s=regions * info.world_size / max(elapsed, 1e-9),
                   data_wait=waited / max(elapsed, 1e-9), step_time=elapsed)
    return metrics
