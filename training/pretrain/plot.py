"""Loss curves of a pre-training run to a PNG (matplotlib, headless Agg backend).

One panel per loss term found in ``log.jsonl`` (total first, then the five objectives and their
sub-terms), raw values faint and a moving average on top, plus a panel with the learning rate.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from refound_core.errors import InputError
from training.pretrain.logging import LOG_JSONL, read_log

_ORDER = ("loss", "dlfm", "dvfm", "dvlfm", "mgdm", "mgdm_poi", "mgdm_img", "cmsa")
_SKIP = {"step", "epoch", "time", "lr", "regions_per_s", "data_wait", "step_time", "skipped", "grad_norm"}


def find_log(run_dir) -> Path:
    """``log.jsonl`` of a run: the folder given, or its ``training/`` subfolder (a checkpoint)."""
    run_dir = Path(run_dir)
    for cand in (run_dir, run_dir / "training"):
        if (cand / LOG_JSONL).exists():
            return cand / LOG_JSONL
    if run_dir.is_file() and run_dir.suffix == ".jsonl":
        return run_dir
    raise InputError(f"no {LOG_JSONL} in {run_dir} or {run_dir / 'training'}; pass the --out folder of "
                     "`refound pretrain` (or its training/ subfolder)")


def _smooth(values: list, window: int) -> list:
    out, acc, buf = [], 0.0, []
    for v in values:
        buf.append(v)
        acc += v
        if len(buf) > window:
            acc -= buf.pop(0)
        out.append(acc / len(buf))
    return out


def plot_log(run_dir, out_png, *, smooth: int = 0) -> Path:
    """Write the loss curves of ``run_dir`` to ``out_png`` (atomically) and return its path."""
    rows = read_log(find_log(run_dir))
    if not rows:
        raise InputError(f"the log in {run_dir} has no rows yet; wait for the first logged step")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("plot-log needs matplotlib; install the training extra: pip install refound[train]") from None

    keys = [k for k in rows[0] if k not in _SKIP and not k.endswith(("_acc", "_cos", "_rate", "_row", "_col"))]
    for r in rows[1:]:
        keys.extend(k for k in r if k not in keys and k not in _SKIP
                    and not k.endswith(("_acc", "_cos", "_rate", "_row", "_col")))
    keys.sort(key=lambda k: (_ORDER.index(k) if k in _ORDER else len(_ORDER), k))
    panels = keys + (["lr"] if any("lr" in r for r in rows) else [])
    window = smooth or max(1, len(rows) // 50)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, panels):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if pts:
            steps, vals = zip(*pts)
            ax.plot(steps, vals, color="tab:blue", alpha=0.3 if window > 1 else 1.0, linewidth=0.8)
            if window > 1:
                ax.plot(steps, _smooth(list(vals), window), color="tab:blue", linewidth=1.5)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"ReFound pre-training: {Path(run_dir).name}")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png
