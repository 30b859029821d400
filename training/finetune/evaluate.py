"""The paper's evaluation protocol (5.1.2-5.1.4, 5.2.5) as a function.

* Random thirds: train / validation / test. Run ``r`` draws its own split (seed ``seed + r``)
  *and* its own training seed, so the spread covers both; every split is saved in ``split.json``.
* Every method is trained on train, its best epoch selected on validation, scored on test (F1 at
  the threshold chosen on validation, which is reported).
* N runs, reported as mean +- std; all methods of one evaluation see the same N splits, so the
  pre-trained model is compared with each other method *paired* by split: mean difference, 95 %
  t-interval and the paired t-test's p-value (:func:`paired_comparison`).
* Optional data-scale analysis: the same with 100/75/50/25/10 % of the training split.
* Outputs: ``results.json`` (every run), ``results.md`` (tables with the data's provenance in the
  header), ``data_scale.png`` when several training fractions were run. Both are rewritten after
  every method, so a long evaluation shows its finished rows while it runs.
* ``runs.jsonl`` journals every finished run with a fingerprint of its settings: the same command
  run again (after a kill, or with a larger ``--runs``) reuses those runs instead of repeating
  hours of fine-tuning; any change of data, checkpoint or hyper-parameters starts afresh.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from refound_core.errors import InputError
from training.finetune.methods import REGISTRY, EvalContext, Split, labels_of
from training.finetune.metrics import HIGHER_IS_BETTER, task_metrics

PROTOCOL = "split-per-run/v2"  # v1 (one split, N training seeds) journals are not reused
#: the method every other one is compared with, first found in the evaluation's method list
REFERENCE_METHODS = ("refound_ft", "refound_feature")
from training.finetune.tasks import TaskSpec

METRIC_ORDER = {"binary": ["AUC", "AUPRC", "F1"], "regression": ["RMSE", "MAE", "R2"], "multiclass": ["accuracy", "macro_F1"]}


def make_split(y: np.ndarray, seed: int, negative_ratio: Optional[float] = None, kind: str = "regression") -> Split:
    """Random thirds of the labelled regions (paper 5.1.2). For binary tasks ``negative_ratio``
    keeps at most that many negatives per positive (the paper samples 5x as many negatives)."""
    rng = np.random.default_rng(seed)
    idx = np.flatnonzero(~np.isnan(y))
    if kind == "binary" and negative_ratio:
        pos, neg = idx[y[idx] > 0.5], idx[y[idx] <= 0.5]
        keep = min(len(neg), int(round(negative_ratio * len(pos))))
        idx = np.sort(np.concatenate([pos, rng.choice(neg, keep, replace=False)]))
    if len(idx) < 6:
        raise InputError(f"only {len(idx)} regions carry this label; the protocol needs at least 6 "
                         "(two per split). Use a larger extent or city")
    perm = rng.permutation(idx)
    a, b = len(perm) // 3, 2 * len(perm) // 3
    return Split(train=np.sort(perm[:a]), val=np.sort(perm[a:b]), test=np.sort(perm[b:]))


def subsample(split: Split, fraction: float, seed: int) -> Split:
    """The same split with only ``fraction`` of the training regions (paper 5.2.5)."""
    if fraction >= 1.0:
        return split
    n = max(2, int(round(fraction * len(split.train))))
    train = np.sort(np.random.default_rng([seed, 7]).permutation(split.train)[:n])
    return Split(train=train, val=split.val, test=split.test)


class RunJournal:
    """Finished runs of an output folder, one JSON line each, keyed by a fingerprint of everything
    that determines a run's result (data, checkpoint, budget, split seed, task, fraction, method,
    run index). Appending one line per run keeps what is done safe whenever the process dies; a
    line cut short by a kill is ignored."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.settings = settings
        self.done = {}
        self._cut = False  # the last line was cut short by a kill: start the next one on a new line
        if path.exists():
            text = path.read_text(encoding="utf-8")
            self._cut = bool(text) and not text.endswith("\n")
            for line in text.splitlines():
                try:
                    rec = json.loads(line)
                    self.done[rec["key"]] = rec["row"]
                except (ValueError, KeyError, TypeError):
                    continue

    def key(self, task: TaskSpec, labels: np.ndarray, fraction: float, method: str, run: int) -> str:
        """``labels`` (the task's column) count too: a label replaced by `add-label --overwrite` is new work."""
        blob = json.dumps({**self.settings, "task": task.to_dict(), "fraction": fraction, "method": method,
                           "run": run, "labels": hashlib.sha256(np.ascontiguousarray(labels, np.float64)).hexdigest()},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def get(self, key: str) -> Optional[dict]:
        return self.done.get(key)

    def add(self, key: str, row: dict) -> None:
        self.done[key] = row
        with open(self.path, "a", encoding="utf-8") as f:
            if self._cut:
                f.write("\n")
                self._cut = False
            f.write(json.dumps({"key": key, "row": row}, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())


def run_evaluation(ctx: EvalContext, tasks: Sequence[TaskSpec], methods: Sequence[str], out_dir, *,
                   runs: int = 5, seed: int = 0, fractions: Sequence[float] = (1.0,),
                   negative_ratio: Optional[float] = None, log: Callable[[str], None] = print) -> dict:
    from refound_core.model.checkpoint import checkpoint_identity  # imports torch: not at module import

    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        raise InputError(f"unknown method(s) {unknown}; available: {sorted(REGISTRY)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = ctx.dataset
    report = {"data": {"folder": str(ds.folder), "provenance": ds.meta.get("provenance"), "cells": len(ds),
                       "crs": ds.crs, "cell_size": ds.cell_size},
              "checkpoint": ctx.checkpoint, "teachers": _checkpoint_teachers(ctx.checkpoint), "runs": runs, "seed": seed, "epochs": ctx.epochs,
              "methods": {m: {"mode": REGISTRY[m].mode, "stands_in_for": REGISTRY[m].stands_in_for} for m in methods},
              "tasks": {}}
    journal = RunJournal(out / "runs.jsonl", {
        "data": str(Path(ds.folder).resolve()), "cells": len(ds),
        "checkpoint": checkpoint_identity(ctx.checkpoint) if ctx.checkpoint else None,
        "epochs": ctx.epochs, "warmup_epochs": ctx.warmup_epochs, "batch_size": ctx.batch_size, "lr": ctx.lr,
        "options": {k: v for k, v in ctx.options.items() if isinstance(v, (str, int, float, bool, type(None)))},
        "seed": seed, "negative_ratio": negative_ratio, "protocol": PROTOCOL})
    report["warmup_epochs"] = ctx.warmup_epochs
    report["feature_epochs"] = ctx.options.get("feature_epochs", 40)
    splits = {}
    reused = 0
    for task in tasks:
        y = labels_of(ds, task)
        run_splits = [make_split(y, seed + r, negative_ratio, task.kind) for r in range(runs)]
        splits[task.name] = {f"run{r}": sp.to_dict(ds.cell_ids) for r, sp in enumerate(run_splits)}
        task_rep = {"spec": task.to_dict(), "sizes": {k: int(len(getattr(run_splits[0], k)))
                                                      for k in ("train", "val", "test")},
                    "split_seeds": [seed + r for r in range(runs)], "results": {}, "paired": {}}
        for frac in fractions:
            subs = [subsample(sp, frac, seed + r) for r, sp in enumerate(run_splits)]
            task_rep.setdefault("train_sizes", {})[str(frac)] = int(len(subs[0].train))
            for m in methods:
                method = REGISTRY[m](ctx)
                rows = []
                for r in range(runs):
                    key = journal.key(task, y, frac, m, r)
                    row = journal.get(key)
                    if row is not None:
                        reused += 1
                        rows.append(row)
                        continue
                    t0 = time.time()
                    sub = subs[r]
                    res = method.run(task, sub, seed + 1000 * r + 1)
                    metrics = task_metrics(task.kind, y[sub.test], res.test_pred, y_val=y[sub.val],
                                           val_pred=res.val_pred)
                    rows.append({"run": r, "split_seed": seed + r, "best_epoch": res.best_epoch,
                                 "seconds": round(time.time() - t0, 1), **metrics})
                    journal.add(key, rows[-1])
                    log(f"[{task.name} {int(frac * 100)}% {m} run {r + 1}/{runs}] " +
                        " ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f" ({rows[-1]['seconds']} s)")
                task_rep["results"].setdefault(str(frac), {})[m] = {"runs": rows, "summary": summarise(rows, task.kind)}
                task_rep["paired"][str(frac)] = paired_table(task_rep["results"][str(frac)], task.kind)
                report["tasks"][task.name] = task_rep
                _write_outputs(out, report, splits, plot=False)
        report["tasks"][task.name] = task_rep
    if reused:
        log(f"reused {reused} finished run(s) from {out / 'runs.jsonl'}")
    _write_outputs(out, report, splits, plot=len(fractions) > 1)
    return report


def _checkpoint_teachers(checkpoint) -> Optional[str]:
    """The teachers the evaluated checkpoint was pre-trained with (one line), for every table."""
    if not checkpoint:
        return None
    from refound_core.model.checkpoint import PROVENANCE_FILE, teachers_line

    f = Path(checkpoint) / PROVENANCE_FILE
    return teachers_line(json.loads(f.read_text(encoding="utf-8")) if f.exists() else None)


def _write_outputs(out: Path, report: dict, splits: dict, plot: bool) -> None:
    _write_json(out / "split.json", splits)
    _write_json(out / "results.json", report)
    _write_text(out / "results.md", markdown_report(report))
    if plot:
        plot_data_scale(report, out / "data_scale.png")


def summarise(rows: list, kind: str) -> dict:
    keys = METRIC_ORDER[kind] + (["threshold"] if kind == "binary" else [])
    return {k: {"mean": float(np.mean([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows]))}
            for k in keys if all(k in r for r in rows)}


def paired_comparison(a, b, higher_is_better: bool) -> dict:
    """Method A against method B over the same splits: ``diff = A - B`` per split, its mean, the 95 %
    t-interval of the mean, the two-sided paired t-test's p-value (scipy's ``ttest_rel``) and
    whether A is better (the mean difference lies on the metric's good side and p < 0.05)."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    d = a[ok] - b[ok]
    n = int(len(d))
    out = {"n": n, "mean_diff": float(np.mean(d)) if n else float("nan"),
           "ci95": [float("nan"), float("nan")], "p": float("nan"), "a_better": False}
    if n < 2:
        return out
    sd = float(np.std(d, ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / np.sqrt(n)
    out["ci95"] = [out["mean_diff"] - half, out["mean_diff"] + half]
    if sd > 0:
        out["p"] = float(stats.ttest_rel(a[ok], b[ok]).pvalue)
    elif out["mean_diff"] != 0:
        out["p"] = 0.0  # the same non-zero difference on every split
    good = out["mean_diff"] > 0 if higher_is_better else out["mean_diff"] < 0
    out["a_better"] = bool(good and out["p"] < 0.05)
    return out


def paired_table(results: dict, kind: str) -> dict:
    """The reference method (pre-trained ReFound, :data:`REFERENCE_METHODS`) against every other
    method of ``results``, per metric, paired by run (= split). Empty without a reference."""
    ref = next((m for m in REFERENCE_METHODS if m in results), None)
    if ref is None:
        return {}
    by_run = {m: {r["run"]: r for r in res["runs"]} for m, res in results.items()}
    table = {"reference": ref, "against": {}}
    for other in results:
        if other == ref:
            continue
        runs = sorted(set(by_run[ref]) & set(by_run[other]))
        table["against"][other] = {
            k: paired_comparison([by_run[ref][r][k] for r in runs], [by_run[other][r][k] for r in runs],
                                 HIGHER_IS_BETTER[k])
            for k in METRIC_ORDER[kind]}
    return table

def provenance_line(report: dict) -> str:
    """Where the numbers come from: synthetic city (seed, size) or real data (which sources)."""
    prov = report["data"].get("provenance") or {}
    if prov.get("synthetic"):
        meta = prov.get("synthcity_meta") or {}
        bits = [f"data: SYNTHETIC city (refound synthcity, seed {prov.get('seed')}, "
                f"{meta.get('size_km', '?')} km, language {meta.get('language', '?')})"]
    elif "synthetic" in prov:
        srcs = ", ".join(f"{k}: {Path(v).name}" for k, v in (prov.get("sources") or {}).items())
        bits = [f"data: REAL ({srcs or 'sources not recorded'})"]
    else:
        bits = [f"data: {prov.get('kind') or prov.get('source') or 'unknown provenance'}"]
        if prov.get("seed") is not None:
            bits.append(f"seed {prov['seed']}")
    bits.append(f"{report['data']['cells']} cells of {report['data']['cell_size']:g} m ({report['data']['crs']})")
    return "; ".join(str(b) for b in bits)


def markdown_report(report: dict) -> str:
    lines = [f"# Evaluation: {', '.join(report['tasks'])}", "",
             f"- {provenance_line(report)}",
             f"- checkpoint: `{report['checkpoint']}`",
             f"- protocol: {report['runs']} runs, each its own random thirds split (seeds {report['seed']}.."
             f"{report['seed'] + report['runs'] - 1}) and training seed; best epoch on validation, test metrics "
             f"(mean ± std), F1 at the threshold chosen on validation; {_budget(report)}", ""]
    if report.get("teachers"):
        lines[-1:-1] = [f"- teachers of the checkpoint: {report['teachers']}"]
    for tname, trep in report["tasks"].items():
        kind = trep["spec"]["kind"]
        keys = METRIC_ORDER[kind]
        for frac, methods in trep["results"].items():
            lines.append(f"## {tname} ({trep['spec']['description'] or kind}), training data {float(frac) * 100:g}%"
                         f" — train/val/test {trep.get('train_sizes', {}).get(frac, trep['sizes']['train'])}"
                         f"/{trep['sizes']['val']}/{trep['sizes']['test']}")
            lines.append("")
            lines.append("| method | mode | " + " | ".join(f"{k} {'↑' if HIGHER_IS_BETTER[k] else '↓'}" for k in keys) + " |")
            lines.append("|---|---|" + "---|" * len(keys))
            for m, res in methods.items():
                cells = [f"{res['summary'][k]['mean']:.4g} ± {res['summary'][k]['std']:.2g}" for k in keys]
                lines.append(f"| {m} | {report['methods'][m]['mode']} | " + " | ".join(cells) + " |")
            lines.append("")
            lines += _paired_lines(trep.get("paired", {}).get(frac), kind)
    lines.append("Methods:")
    for m, d in report["methods"].items():
        lines.append(f"- `{m}` ({d['mode']}): {d['stands_in_for']}")
    return "\n".join(lines) + "\n"


def _paired_lines(paired: Optional[dict], kind: str) -> list:
    if not paired or not paired.get("against"):
        return []
    ref = paired["reference"]
    keys = METRIC_ORDER[kind]
    lines = [f"Paired by split: `{ref}` minus each method (mean difference [95 % CI], paired t-test p); "
             f"**bold** = `{ref}` better at p < 0.05.", "",
             "| against | " + " | ".join(f"Δ{k}" for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for other, comp in paired["against"].items():
        cells = []
        for k in keys:
            c = comp[k]
            txt = f"{c['mean_diff']:+.3g} [{c['ci95'][0]:+.3g}, {c['ci95'][1]:+.3g}] p={c['p']:.2g}"
            cells.append(f"**{txt}**" if c["a_better"] else txt)
        lines.append(f"| {other} | " + " | ".join(cells) + " |")
    return lines + [""]


def _budget(report: dict) -> str:
    """The epochs that applied to the methods of this report (fine-tuning and/or frozen-feature heads)."""
    modes = {d["mode"] for d in report["methods"].values()}
    parts = []
    if modes - {"feature-based"}:
        parts.append(f"fine-tuning epochs {report['epochs']}")
    if "feature-based" in modes:
        parts.append(f"feature-based head epochs {report.get('feature_epochs', 40)}")
    return ", ".join(parts) + f" (warm-up {report.get('warmup_epochs', 3)})"


def plot_data_scale(report: dict, path: Path) -> None:
    """Paper 5.2.5 / Figure 5: test metric against the share of training data, per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["tasks"].items())
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, (tname, trep) in zip(axes[0], tasks):
        key = METRIC_ORDER[trep["spec"]["kind"]][0]
        fracs = sorted(trep["results"], key=float)
        for m in report["methods"]:
            xs = [float(f) * 100 for f in fracs if m in trep["results"][f]]
            ms = [trep["results"][f][m]["summary"][key]["mean"] for f in fracs if m in trep["results"][f]]
            ss = [trep["results"][f][m]["summary"][key]["std"] for f in fracs if m in trep["results"][f]]
            ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=m)
        ax.set_xlabel("training data used (%)")
        ax.set_ylabel(f"test {key}")
        ax.set_title(tname)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(provenance_line(report), fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False, default=float), encoding="utf-8")
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
