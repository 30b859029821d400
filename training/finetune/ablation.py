"""The ablation study of paper 5.2.2 (Figure 3): pre-train one checkpoint per variant, evaluate each.

Variants (paper 5.2.2), each a set of ``refound pretrain`` flags, so an ablation is configuration
of the one pre-training engine, never a code fork:

=========  ===========  =====================================================================
name       paper        what is dropped
=========  ===========  =====================================================================
full       ReFound      nothing (all five objectives, MoGE Transformer)
no_moge    w/o MoGE     the MoGE experts: one shared FFN in every layer (``--no-moge``)
no_dlfm    w/o DLFM     distillation from the language foundation model
no_dvfm    w/o DVFM     distillation from the visual foundation model
no_dvlfm   w/o DVLFM    distillation from the visual-language foundation model
no_dist    w/o Dist     all three distillations (DLFM + DVFM + DVLFM)
no_mgdm    w/o MGDM     masked geospatial data modelling, and with it CMSA ("as it relies on
                        masked satellite image patches"), so no masking at all
no_cmsa    w/o CMSA     cross-modal spatial alignment only
=========  ===========  =====================================================================

Every variant uses the same corpus, seed, step count and settings; only its flags differ.
Checkpoints go to ``OUT/checkpoints/<variant>/``. A variant whose folder already holds a complete
checkpoint pre-trained with the same settings is reused, a run killed after a resumable state
was saved is resumed, and a run killed before any state is restarted; so ``refound ablate`` run
again after an interruption continues where it stopped. The evaluation protocol
(``training.finetune.evaluate.run_evaluation``: random thirds, best epoch on validation, N runs)
runs per variant into ``OUT/eval/<variant>/`` (also reused when nothing changed); the summary is
``OUT/ablation.md`` / ``ablation.json`` / ``ablation.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from refound_core.errors import InputError


@dataclass(frozen=True)
class Variant:
    name: str
    label: str          # as in the paper's Figure 3
    flags: tuple        # `refound pretrain` flags
    drops: str          # one line for tables and --help


VARIANTS = {v.name: v for v in (
    Variant("full", "ReFound", (), "nothing: five objectives + MoGE"),
    Variant("no_moge", "w/o MoGE", ("--no-moge",), "MoGE: one shared FFN per layer"),
    Variant("no_dlfm", "w/o DLFM", ("--no-dlfm",), "language-FM distillation"),
    Variant("no_dvfm", "w/o DVFM", ("--no-dvfm",), "visual-FM distillation"),
    Variant("no_dvlfm", "w/o DVLFM", ("--no-dvlfm",), "visual-language-FM distillation"),
    Variant("no_dist", "w/o Dist", ("--no-dist",), "all three distillations"),
    Variant("no_mgdm", "w/o MGDM", ("--no-mgdm",), "MGDM and CMSA (no masking)"),
    Variant("no_cmsa", "w/o CMSA", ("--no-cmsa",), "cross-modal spatial alignment"),
)}
DEFAULT_TASKS = ("urban_village", "population", "commercial")
MODE_METHOD = {"feature": "refound_feature", "finetune": "refound_ft"}
# Settings that do not change what a checkpoint is: a finished variant is reused across them.
_NOT_IDENTITY = ("out", "workers", "log_every", "tensorboard", "save_every", "keep_states", "device", "compile",
                 "find_unused_parameters")


@dataclass
class AblationSettings:
    """Inputs of :func:`run_ablation` (the ``refound ablate`` flags).

    ``pretrain_*`` settings left None take the engine's defaults (paper A.2.1). ``epochs`` None:
    40 feature-head epochs (paper Table 6) in feature mode, 10 fine-tuning epochs in finetune mode.
    """

    pretrain_data: str
    data: str
    out: str
    steps: int
    preset: str = "small"
    variants: Sequence[str] = tuple(VARIANTS)
    tasks: Sequence[str] = DEFAULT_TASKS
    mode: str = "feature"
    runs: int = 3
    epochs: Optional[int] = None
    device: str = "auto"
    seed: int = 0
    pretrain_batch_size: Optional[int] = None
    pretrain_lr: Optional[float] = None
    warmup_steps: Optional[int] = None
    teachers: Optional[str] = None
    precision: str = "auto"
    workers: int = -1
    save_every: Optional[int] = None
    pretrain_config: Optional[str] = None
    batch_size: int = 12
    lr: Optional[float] = None
    negative_ratio: Optional[float] = None

    def validate(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise InputError(f"--variants: unknown {unknown or 'empty list'}; choose from {','.join(VARIANTS)}")
        if len(set(self.variants)) != len(self.variants):
            raise InputError(f"--variants lists a variant twice: {','.join(self.variants)}")
        if self.mode not in MODE_METHOD:
            raise InputError(f"--mode must be feature or finetune, got {self.mode!r}")
        if int(self.steps) < 1:
            raise InputError(f"--steps must be at least 1, got {self.steps}")
        if int(self.runs) < 1:
            raise InputError(f"--runs must be at least 1, got {self.runs}")
        if self.epochs is not None and int(self.epochs) < 1:
            raise InputError(f"--epochs must be at least 1, got {self.epochs}")
        if not self.tasks:
            raise InputError("--tasks is empty; name at least one of urban_village, population, commercial")


# ----------------------------------------------------------------------------------------------
# Pre-training of one variant
def pretrain_argv(variant: str, s: AblationSettings, out: Path) -> list:
    """The ``refound pretrain`` command line of one variant (shared settings + its own flags)."""
    if variant not in VARIANTS:
        raise InputError(f"unknown ablation variant {variant!r}; choose from {', '.join(VARIANTS)}")
    argv = ["--preset", s.preset, "--data", str(Path(s.pretrain_data).resolve()), "--steps", str(int(s.steps)),
            "--out", str(Path(out).resolve()), "--seed", str(int(s.seed)), "--precision", s.precision,
            "--workers", str(int(s.workers))]
    if s.device in ("auto", "cpu", "cuda"):
        argv += ["--device", s.device]
    optional = {"--batch-size": s.pretrain_batch_size, "--lr": s.pretrain_lr, "--warmup-steps": s.warmup_steps,
                "--save-every": s.save_every, "--config": s.pretrain_config,
                "--teachers": str(Path(s.teachers).resolve()) if s.teachers else None}
    for flag, value in optional.items():
        if value is not None:
            argv += [flag, str(value)]
    return argv + list(VARIANTS[variant].flags)


def variant_train_config(variant: str, s: AblationSettings, out: Path):
    """The :class:`~training.pretrain.engine.TrainConfig` of one variant, resolved exactly as
    ``refound pretrain`` resolves its flags (defaults < --config file < flags)."""
    from training.pretrain import options as pretrain_cmd
    from training.pretrain.engine import TrainConfig

    parser = argparse.ArgumentParser(prog="refound pretrain")
    pretrain_cmd.add_arguments(parser)
    args = parser.parse_args(pretrain_argv(variant, s, out))
    try:
        return TrainConfig.from_dict(pretrain_cmd.resolve_config(args))
    except TypeError as exc:
        raise InputError(f"bad pre-training settings for variant {variant}: {exc}") from None


def _identity(d: dict) -> str:
    d = {k: v for k, v in d.items() if k not in _NOT_IDENTITY and k != "resolved"}
    return json.dumps(d, sort_keys=True, default=str)


def _differences(saved: dict, wanted: dict) -> list:
    keys = sorted((set(saved) | set(wanted)) - set(_NOT_IDENTITY) - {"resolved"})
    return [k for k in keys if json.dumps(saved.get(k), sort_keys=True, default=str)
            != json.dumps(wanted.get(k), sort_keys=True, default=str)]


def checkpoint_state(folder, cfg) -> tuple:
    """What ``folder`` holds for this variant: ``(state, detail)`` with state one of

    ``"missing"`` (nothing there), ``"complete"`` (a final checkpoint pre-trained with ``cfg``'s
    settings), ``"resumable"`` (a killed run of these settings with a saved training state),
    ``"restartable"`` (a killed run that saved nothing but logs) or ``"mismatch"`` (a run with
    other settings, or not a pre-training folder; ``detail`` says what differs).
    """
    from refound_core.model.checkpoint import CONFIG_FILE, MODEL_FILE
    from training.pretrain.engine import CONFIG_NAME, RUN_SUBDIR, latest_state

    folder = Path(folder)
    if not folder.exists() or not any(folder.iterdir()):
        return "missing", ""
    run_dir = folder / RUN_SUBDIR
    wanted = cfg.to_dict()
    final = (folder / CONFIG_FILE).is_file() and (folder / MODEL_FILE).is_file()
    saved_cfg = run_dir / CONFIG_NAME
    if final:
        if not saved_cfg.is_file():
            return "mismatch", f"{folder} holds a checkpoint without {RUN_SUBDIR}/{CONFIG_NAME} (not written by this command)"
        saved = json.loads(saved_cfg.read_text(encoding="utf-8"))
        diff = _differences(saved, wanted)
        steps_done = _steps_done(folder)
        if not diff and steps_done == int(cfg.steps):
            return "complete", ""
        if not diff:
            diff = [f"steps done {steps_done}"]
        return "mismatch", f"settings differ: {', '.join(diff)}"
    state = latest_state(run_dir)
    if state is not None:
        meta = json.loads((state / "state.json").read_text(encoding="utf-8"))
        diff = _differences(meta.get("config") or {}, wanted)
        return ("resumable", str(state)) if not diff else ("mismatch", f"saved run settings differ: {', '.join(diff)}")
    if all(p.name == RUN_SUBDIR for p in folder.iterdir()):
        return "restartable", "a run stopped before its first saved state"
    return "mismatch", f"{folder} holds files that are not a pre-training run"


def _steps_done(folder: Path) -> Optional[int]:
    try:
        prov = json.loads((folder / "provenance.json").read_text(encoding="utf-8"))
        return int(prov["pretraining"]["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ensure_pretrained(variant: str, s: AblationSettings, log: Callable[[str], None] = print) -> dict:
    """Pre-train ``variant`` into ``OUT/checkpoints/<variant>`` unless a matching checkpoint is there.

    Returns ``{"checkpoint", "status" ("trained" | "resumed" | "reused"), "seconds", "config"}``.
    """
    from training.pretrain import engine

    out = Path(s.out) / "checkpoints" / variant
    cfg = variant_train_config(variant, s, out)
    state, detail = checkpoint_state(out, cfg)
    if state == "mismatch":
        raise InputError(f"variant {variant}: {out} already holds a different run ({detail}). Use a new --out, "
                         f"or delete {out} to pre-train it again with the current settings")
    if state == "complete":
        log(f"ablate: {variant}: reusing the finished checkpoint {out}")
        return {"checkpoint": str(out), "status": "reused", "seconds": 0.0, "config": cfg.to_dict()}
    if state == "restartable":
        log(f"ablate: {variant}: {detail}; starting it again")
        shutil.rmtree(out)
    resume = state == "resumable"
    log(f"ablate: {variant}: {'resuming' if resume else 'pre-training'} ({VARIANTS[variant].label}; "
        f"flags {' '.join(VARIANTS[variant].flags) or '(none)'}) -> {out}")
    t0 = time.time()
    try:
        engine.train(cfg, resume=resume)
    except engine.NonFiniteLossError as exc:
        raise InputError(f"variant {variant}: pre-training stopped: {exc}") from None
    return {"checkpoint": str(out), "status": "resumed" if resume else "trained",
            "seconds": round(time.time() - t0, 1), "config": cfg.to_dict()}


# ----------------------------------------------------------------------------------------------
# Evaluation of one variant
def evaluate_variant(variant: str, checkpoint: str, dataset, tasks: list, s: AblationSettings, device: str,
                     log: Callable[[str], None] = print) -> tuple:
    """Run the evaluation protocol for one variant's checkpoint; ``(report, reused)``."""
    from refound_core.model.checkpoint import checkpoint_identity
    from training.finetune.evaluate import run_evaluation
    from training.finetune.methods import EvalContext

    method = MODE_METHOD[s.mode]
    out = Path(s.out) / "eval" / variant
    epochs = s.epochs if s.epochs is not None else (40 if s.mode == "feature" else 10)
    key = {"checkpoint": checkpoint_identity(checkpoint), "data": str(Path(dataset.folder).resolve()),
           "tasks": [t.to_dict() for t in tasks], "method": method, "runs": int(s.runs), "seed": int(s.seed),
           "epochs": int(epochs), "batch_size": int(s.batch_size), "lr": s.lr, "negative_ratio": s.negative_ratio}
    key_path, results = out / "ablation_key.json", out / "results.json"
    if key_path.is_file() and results.is_file():
        try:
            if json.loads(key_path.read_text(encoding="utf-8")) == key:
                log(f"ablate: {variant}: reusing the evaluation in {out}")
                return json.loads(results.read_text(encoding="utf-8")), True
        except ValueError:
            pass
    options = {"feature_epochs": int(epochs)} if s.mode == "feature" else {}
    ctx = EvalContext(dataset=dataset, checkpoint=str(checkpoint), device=device, epochs=int(epochs),
                      batch_size=int(s.batch_size), lr=s.lr, cache_dir=str(Path(s.out) / "embedding_cache"),
                      options=options)
    report = run_evaluation(ctx, tasks, [method], out, runs=int(s.runs), seed=int(s.seed),
                            negative_ratio=s.negative_ratio, log=lambda m: log(f"ablate: {variant}: {m}"))
    _write_text(key_path, json.dumps(key, indent=1))
    return report, False


# ----------------------------------------------------------------------------------------------
def run_ablation(s: AblationSettings, log: Callable[[str], None] = print) -> dict:
    """Pre-train and evaluate every variant; write ``ablation.md``, ``ablation.json``, ``ablation.png``."""
    import training.finetune.refound_methods  # noqa: F401 - registers refound_feature / refound_ft
    from refound_core.data.dataset import RegionDataset
    from training.device import resolve_device
    from training.finetune.evaluate import make_split
    from training.finetune.methods import labels_of
    from training.finetune.metrics import PRIMARY
    from training.finetune.tasks import get_task

    s.validate()
    out = Path(s.out)
    corpus = RegionDataset(s.pretrain_data)
    dataset = RegionDataset(s.data)
    tasks = [get_task(t) for t in s.tasks]
    for task in tasks:  # fail before hours of pre-training, not after
        make_split(labels_of(dataset, task), s.seed, s.negative_ratio, task.kind)
    device = resolve_device(s.device)
    out.mkdir(parents=True, exist_ok=True)

    method = MODE_METHOD[s.mode]
    report = {
        "settings": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in asdict(s).items()},
        "pretrain_data": _data_block(corpus), "data": _data_block(dataset),
        "mode": s.mode, "method": method, "device": device,
        "tasks": {}, "variants": {},
    }
    for name in s.variants:
        pre = ensure_pretrained(name, s, log)
        ev, reused = evaluate_variant(name, pre["checkpoint"], dataset, tasks, s, device, log)
        loss_cfg = pre["config"]["losses"]
        entry = {"label": VARIANTS[name].label, "flags": list(VARIANTS[name].flags), "drops": VARIANTS[name].drops,
                 "objectives": [o for o in ("dlfm", "dvfm", "dvlfm", "mgdm", "cmsa") if loss_cfg.get(o)],
                 "use_moge": bool(pre["config"]["model"].get("use_moge", True)),
                 "checkpoint": pre["checkpoint"], "pretraining": pre["status"],
                 "pretrain_seconds": pre["seconds"], "evaluation_reused": reused, "tasks": {}}
        for task in tasks:
            trep = ev["tasks"][task.name]
            res = trep["results"]["1.0"][method]
            primary = PRIMARY[task.kind]  # AUC / RMSE as in Figure 3
            entry["tasks"][task.name] = {"primary": primary, "summary": res["summary"], "runs": res["runs"]}
            report["tasks"].setdefault(task.name, {"kind": task.kind, "primary": primary,
                                                   "description": task.description, "sizes": trep["sizes"]})
        report["variants"][name] = entry
        _write_outputs(report, out)  # partial results survive a later interruption
    log(f"ablate: wrote {out / 'ablation.md'}, ablation.json, ablation.png")
    return report


def _data_block(ds) -> dict:
    return {"folder": str(Path(ds.folder).resolve()), "provenance": ds.meta.get("provenance"), "cells": len(ds),
            "crs": ds.crs, "cell_size": ds.cell_size}


def _write_outputs(report: dict, out: Path) -> None:
    _write_text(out / "ablation.json", json.dumps(report, indent=1, ensure_ascii=False, default=float))
    _write_text(out / "ablation.md", markdown_ablation(report))
    plot_ablation(report, out / "ablation.png")


def _provenance(block: dict) -> str:
    from training.finetune.evaluate import provenance_line

    return provenance_line({"data": block})


def markdown_ablation(report: dict) -> str:
    """Variant x task table of the primary metrics (mean ± std over runs), provenance first."""
    from training.finetune.metrics import HIGHER_IS_BETTER

    st = report["settings"]
    variants, tasks = report["variants"], report["tasks"]
    lines = ["# Ablation study (paper 5.2.2, Figure 3)", "",
             f"- pre-training corpus: {_provenance(report['pretrain_data'])} (`{report['pretrain_data']['folder']}`)",
             f"- downstream: {_provenance(report['data'])} (`{report['data']['folder']}`)",
             f"- pre-training: preset {st['preset']}, {st['steps']} steps, seed {st['seed']}, identical for every "
             f"variant except its flags",
             f"- evaluation: {report['mode']} ({report['method']}), random thirds (seed {st['seed']}), best epoch on "
             f"validation, test metrics, {st['runs']} runs (mean ± std), device {report['device']}", ""]
    head = [f"{t} {d['primary']} {'↑' if HIGHER_IS_BETTER[d['primary']] else '↓'}" for t, d in tasks.items()]
    lines += ["| variant | paper | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    best = {}
    for t, d in tasks.items():
        means = {v: e["tasks"][t]["summary"][d["primary"]]["mean"] for v, e in variants.items() if t in e["tasks"]}
        if len(means) > 1:
            pick = max if HIGHER_IS_BETTER[d["primary"]] else min
            best[t] = pick(means, key=means.get)
    for v, e in variants.items():
        cells = []
        for t, d in tasks.items():
            m = e["tasks"].get(t, {}).get("summary", {}).get(d["primary"])
            cell = "–" if m is None else f"{m['mean']:.4g} ± {m['std']:.2g}"
            cells.append(f"**{cell}**" if best.get(t) == v else cell)
        lines.append(f"| {v} | {e['label']} | " + " | ".join(cells) + " |")
    lines += ["", "Best mean per task in bold. Sizes (train/val/test): "
              + "; ".join(f"{t} {d['sizes']['train']}/{d['sizes']['val']}/{d['sizes']['test']}" for t, d in tasks.items()),
              "", "| variant | drops | objectives | MoGE | checkpoint |", "|---|---|---|---|---|"]
    for v, e in variants.items():
        lines.append(f"| {v} | {e['drops']} | {'+'.join(e['objectives']) or '(none)'} | "
                     f"{'yes' if e['use_moge'] else 'no'} | `{e['checkpoint']}` ({e['pretraining']}) |")
    return "\n".join(lines) + "\n"


def plot_ablation(report: dict, path: Path) -> Path:
    """One panel per task, one bar per variant with its std as error bar (paper Figure 3)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from training.finetune.metrics import HIGHER_IS_BETTER

    tasks = list(report["tasks"].items())
    names = list(report["variants"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.0, 0.55 * len(names) + 1.5) * len(tasks), 3.8),
                             squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, (tname, tinfo) in zip(axes[0], tasks):
        key = tinfo["primary"]
        rows = [(n, report["variants"][n]["tasks"][tname]["summary"][key]) for n in names
                if tname in report["variants"][n]["tasks"]]
        means = np.array([r[1]["mean"] for r in rows], dtype=float)
        stds = np.array([r[1]["std"] for r in rows], dtype=float)
        x = np.arange(len(rows))
        ax.bar(x, means, yerr=stds, capsize=3, color=[colours(list(VARIANTS).index(n) % 10) for n, _ in rows],  # one colour per variant
               edgecolor="black", linewidth=0.6)
        ax.set_xticks(x, [report["variants"][n]["label"] for n, _ in rows], rotation=40, ha="right", fontsize=8)
        lo, hi = float(np.min(means - stds)), float(np.max(means + stds))
        pad = 0.15 * (hi - lo) if hi > lo else max(abs(hi), 1e-3) * 0.05
        ax.set_ylim(lo - pad, hi + pad)  # zoomed, as in the paper, so differences are visible
        ax.set_ylabel(f"test {key} ({'higher' if HIGHER_IS_BETTER[key] else 'lower'} is better)")
        ax.set_title(f"{tname}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    st = report["settings"]
    fig.suptitle(f"Ablation ({report['mode']}, {st['preset']}, {st['steps']} steps, {st['runs']} runs) — "
                 f"{_provenance(report['data'])}", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
