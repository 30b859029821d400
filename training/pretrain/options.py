"""The options of ``refound pretrain`` and how they resolve into a ``TrainConfig`` dict
(defaults < saved run config with --resume < --config file < flags).

Here, beside the pre-training engine, so that the ablation driver (``training.finetune.ablation``)
resolves a variant's settings exactly as the command does without importing the command layer.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

S = argparse.SUPPRESS
ABLATION_FLAGS = ("dlfm", "dvfm", "dvlfm", "dist", "mgdm", "cmsa")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=("tiny", "small", "base"), default=S,
                   help="model size (base = the paper's 12 x 768; default base)")
    p.add_argument("--data", metavar="DS", action="append", default=S,
                   help="region dataset folder (`refound build-dataset` / `build-corpus`); repeat to pre-train on "
                        "several at once (e.g. a POI city and image-only real imagery; their teacher caches must "
                        "share one codebook: `refound teachers --codebook`)")
    p.add_argument("--teachers", metavar="CACHE", action="append", default=S,
                   help="teacher cache folder DS/teacher_cache/<hash> (default: the one matching the preset); "
                        "with several --data, one per dataset in the same order")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=S, help="optimizer steps to train")
    length.add_argument("--epochs", type=float, default=S, help="epochs to train (paper: 300)")
    p.add_argument("--out", metavar="CKPT", required=False, default=S,
                   help="output folder: the checkpoint, plus training/ with logs and resumable states")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest state")
    p.add_argument("--init", metavar="CKPT", default=S,
                   help="start from this pre-trained checkpoint's backbone (continued pre-training, e.g. on your "
                        "own imagery): its architecture, tokenizer and category vocabulary; fresh heads, "
                        "optimizer and schedule")
    p.add_argument("--config", metavar="FILE", default=S, help="YAML or JSON file with settings (below flags)")
    for name in ABLATION_FLAGS:
        what = "all three distillations (w/o Dist)" if name == "dist" else (
            "MGDM and CMSA, no masking (w/o MGDM)" if name == "mgdm" else name.upper())
        p.add_argument(f"--no-{name}", action="store_true", default=S, help=f"ablation: drop {what}")
    p.add_argument("--no-moge", action="store_true", default=S,
                   help="ablation w/o MoGE: one shared FFN in every layer")
    p.add_argument("--batch-size", type=int, default=S, help="regions per step per process (paper: 80)")
    p.add_argument("--lr", type=float, default=S, help="peak learning rate (paper: 5e-5)")
    warm = p.add_mutually_exclusive_group()
    warm.add_argument("--warmup-steps", type=int, default=S, help="linear warm-up length in steps")
    warm.add_argument("--warmup-epochs", type=float, default=S, help="linear warm-up length in epochs (paper: 5)")
    p.add_argument("--grad-accum", type=int, default=S, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--clip", type=float, default=S, help="gradient-norm clipping, 0 = off (default 1.0)")
    p.add_argument("--save-every", type=int, default=S, help="steps between resumable states (default 1000)")
    p.add_argument("--log-every", type=int, default=S, help="steps between terminal lines (default 10)")
    p.add_argument("--compile", action="store_true", default=S, help="torch.compile the backbone")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=S, help="default auto (GPU if present)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=S,
                   help="auto = bf16 autocast on GPUs/CPUs with native bf16, else fp32")
    p.add_argument("--photometric-aug", type=float, default=S, metavar="STRENGTH",
                   help="recolour the student's image (brightness, contrast, saturation, white balance, gamma) "
                        "while teacher targets stay those of the clean image; 0 = off (default), 1 = the ranges "
                        "in training/pretrain/augment.py, at most 2")
    p.add_argument("--dvfm-patch-weight", type=float, default=S, metavar="W",
                   help="weight of the dense DVFM term: each image patch imitates the visual teacher's feature "
                        "at that patch (not in the paper; docs/PRETRAINING.md choice 16); 0 = off (default); "
                        "needs a teacher cache written since 2026-12-08 (it stores the patch features)")
    p.add_argument("--seed", type=int, default=S, help="seed of weights, data order and masks (default 0)")
    p.add_argument("--workers", type=int, default=S, help="DataLoader worker processes per rank (-1 = auto)")


def _read_config_file(path) -> dict:
    from refound_core.errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--config {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        raise InputError(f"--config {path} is not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"--config {path} must hold a mapping of settings, got {type(data).__name__}")
    data.pop("resolved", None)  # a resolved config written by an earlier run can be reused as is
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``; ``model`` / ``losses`` sections merge key by key."""
    out = dict(base)
    for key, value in over.items():
        if key in ("model", "losses") and isinstance(value, dict):
            out[key] = {**(out.get(key) or {}), **value}
        else:
            out[key] = value
    # Run length and warm-up are each one choice: a higher level's choice replaces the other form.
    if over.get("steps") is not None and "epochs" not in over:
        out["epochs"] = None
    if over.get("epochs") is not None and "steps" not in over:
        out["steps"] = None
    if over.get("warmup_epochs") is not None and "warmup_steps" not in over:
        out["warmup_steps"] = None
    return out


def resolve_config(args) -> dict:
    """defaults < saved run config (--resume) < --config file < flags, as a TrainConfig dict."""
    from refound_core.errors import InputError
    from training.pretrain.engine import CONFIG_NAME, RUN_SUBDIR, TrainConfig

    cfg = TrainConfig().to_dict()
    given = vars(args)
    if given.get("resume"):
        if "out" not in given:
            raise InputError("--resume needs --out CKPT (the folder of the run to continue)")
        saved = Path(given["out"]) / RUN_SUBDIR / CONFIG_NAME
        if saved.is_file():
            cfg = _merge(cfg, _read_config_file(saved))
    if "config" in given:
        cfg = _merge(cfg, _read_config_file(given["config"]))
    flags = {}
    for key in ("preset", "data", "teachers", "steps", "epochs", "out", "batch_size", "lr", "warmup_steps",
                "warmup_epochs", "grad_accum", "clip", "save_every", "log_every", "compile", "device",
                "precision", "seed", "workers", "init", "photometric_aug"):
        if key in given:
            flags[key] = given[key]
    for key in ("data", "teachers"):  # repeatable flags: one value stays a plain string
        if isinstance(flags.get(key), list) and len(flags[key]) == 1:
            flags[key] = flags[key][0]
    losses = {name: False for name in ("dlfm", "dvfm", "dvlfm", "mgdm", "cmsa") if given.get(f"no_{name}")}
    if given.get("no_dist"):
        losses.update(dlfm=False, dvfm=False, dvlfm=False)
    if given.get("no_mgdm"):
        losses.update(cmsa=False)
    if "dvfm_patch_weight" in given:
        if given["dvfm_patch_weight"] < 0:
            raise InputError(f"--dvfm-patch-weight must be 0 (off) or positive, got {given['dvfm_patch_weight']}")
        losses["w_dvfm_patch"] = float(given["dvfm_patch_weight"])
    if losses:
        flags["losses"] = losses
    if given.get("no_moge"):
        flags["model"] = {"use_moge": False}
    return _merge(cfg, flags)
