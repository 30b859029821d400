"""Training log: every loss term of every optimizer step, to files and to the terminal.

* ``log.jsonl``: one JSON object per optimizer step (step, epoch, lr, every loss term and
  diagnostic, regions/s, data-wait share, wall time) -- the source of truth for ``plot-log``;
* ``log.csv``: the same rows as a table (columns fixed by the first row);
* TensorBoard scalars under ``tb/`` when the ``tensorboard`` package is installed (optional extra);
* terminal: a tqdm progress bar with the loss terms and regions/s when stderr is a TTY, plain
  lines every ``log_every`` steps otherwise (CI logs, ``nohup``).

Only rank 0 builds a real logger; the other ranks get one with ``enabled=False`` that does nothing.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

LOG_JSONL, LOG_CSV = "log.jsonl", "log.csv"
# Shown in the bar / plain lines (all terms go to the files).
_SHOWN = ("loss", "dlfm", "dvfm", "dvfm_patch", "dvlfm", "mgdm", "cmsa")  # dvfm_patch: only when on


def read_log(path) -> list:
    """Rows of a ``log.jsonl`` (a run folder or the file itself); a torn last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / LOG_JSONL
    rows = []
    if not path.exists():
        return rows
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                break  # the run was killed mid-write: everything before is intact
    return rows


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class TrainLogger:
    """See module docstring.

    Args:
        run_dir: folder of the log files.
        enabled: False on ranks other than 0 (then every method is a no-op).
        total_steps: for the progress bar.
        start_step: first step of this process (after ``--resume``).
        log_every: plain-line / bar-postfix period in steps.
        tensorboard: write TensorBoard scalars if the package is importable.
        stream: terminal stream (default stderr); a TTY gets the progress bar.
    """

    def __init__(self, run_dir, *, enabled: bool = True, total_steps: int = 0, start_step: int = 0,
                 log_every: int = 10, tensorboard: bool = True, stream=None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.log_every = max(1, int(log_every))
        self.total_steps = int(total_steps)
        self.stream = stream or sys.stderr
        self._bar = None
        self._tb = None
        self._csv_fields: Optional[list] = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / LOG_JSONL, "a", encoding="utf-8")
        csv_path = self.run_dir / LOG_CSV
        if csv_path.exists() and csv_path.stat().st_size:
            with open(csv_path, encoding="utf-8", newline="") as fh:
                self._csv_fields = next(csv.reader(fh), None)
        self._csv = open(csv_path, "a", encoding="utf-8", newline="")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
            except ImportError:
                self._tb = None  # optional extra: pip install refound[train]
        if hasattr(self.stream, "isatty") and self.stream.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=self.total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             file=self.stream, desc="pretrain")

    # -- writing ---------------------------------------------------------------------------------
    def record(self, step: int, metrics: dict) -> None:
        """Append one optimizer step. ``metrics``: plain floats/ints (step, epoch, lr, loss terms...)."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: (float(v) if isinstance(v, float) else v) for k, v in metrics.items()},
               "time": round(time.time(), 3)}
        self._jsonl.write(json.dumps(row, allow_nan=True) + "\n")
        self._jsonl.flush()
        self._write_csv(row)
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"pretrain/{key}", value, step)
        shown = {k: row[k] for k in _SHOWN if k in row}
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if step % self.log_every == 0 or step == self.total_steps:
                post = {k: _fmt(v) for k, v in shown.items()}
                post["reg/s"] = _fmt(row.get("regions_per_s", 0.0))
                self._bar.set_postfix(post, refresh=True)
        elif step % self.log_every == 0 or step == self.total_steps:
            parts = " ".join(f"{k}={_fmt(v)}" for k, v in shown.items())
            extra = (f" lr={row.get('lr', 0):.3g} reg/s={row.get('regions_per_s', 0):.1f} "
                     f"data_wait={100 * row.get('data_wait', 0):.0f}%")
            self.message(f"step {step}/{self.total_steps} {parts}{extra}")

    def _write_csv(self, row: dict) -> None:
        if self._csv_fields is None:
            self._csv_fields = list(row)
            csv.writer(self._csv).writerow(self._csv_fields)
        csv.writer(self._csv).writerow([row.get(k, "") for k in self._csv_fields])
        self._csv.flush()

    def message(self, text: str) -> None:
        """One line on the terminal (above the bar when there is one)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    # -- resume ----------------------------------------------------------------------------------
    def truncate_after(self, step: int) -> None:
        """Drop rows of steps > ``step`` (logged by a killed run after its last checkpoint), in
        both files, atomically; the resumed run then appends the same steps again."""
        if not self.enabled:
            return
        self._jsonl.close()
        self._csv.close()
        rows = [r for r in read_log(self.run_dir) if int(r.get("step", 0)) <= step]
        _atomic_write(self.run_dir / LOG_JSONL, "".join(json.dumps(r, allow_nan=True) + "\n" for r in rows))
        buf = io.StringIO()
        fields = self._csv_fields or (list(rows[0]) if rows else None)
        if fields and rows:
            writer = csv.writer(buf)
            writer.writerow(fields)
            for r in rows:
                writer.writerow([r.get(k, "") for k in fields])
        _atomic_write(self.run_dir / LOG_CSV, buf.getvalue())
        self._csv_fields = fields if rows else None
        self._jsonl = open(self.run_dir / LOG_JSONL, "a", encoding="utf-8")
        self._csv = open(self.run_dir / LOG_CSV, "a", encoding="utf-8", newline="")
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._jsonl.close()
        self._csv.close()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
