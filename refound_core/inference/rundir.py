"""The run directory of a resumable region run: ``manifest.json`` and ``shards/``.

``manifest.json`` (written atomically by rank 0)::

    {"version": 1, "status": "running" | "complete",
     "fingerprint": {"task", "model_hash", "grid": {"crs", "cell_size", "ranges", "shard_cells"},
                     "inputs": {"pois", "imagery", "aoi", ...}, ...},
     "shards": [{"index", "file", "ranges", "cells"}, ...],
     "pending_at_start": [indices],      # the shards this invocation computes (ranks take r::world)
     "out": "...", "updated": "..."}

A shard is finished when its file exists (files are renamed into place complete, see
``shards.py``), so the manifest never has to be updated per shard by several ranks. Rerunning
the same command reads the manifest, checks the fingerprint (a changed model, task, grid or
input is refused with a message naming what changed; ``--fresh`` starts over) and computes only
the missing shards.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from refound_core.errors import InputError

MANIFEST = "manifest.json"
SHARDS = "shards"
VERSION = 1


def default_run_dir(out) -> Path:
    """``OUT.run`` beside the output (``city.gpkg`` -> ``city.gpkg.run/``)."""
    out = Path(out)
    return out.with_name(out.name + ".run")


def shard_path(run_dir, index: int) -> Path:
    return Path(run_dir) / SHARDS / f"s{int(index):05d}.parquet"


def file_hash(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def model_hash(checkpoint) -> Optional[str]:
    """sha256 over the checkpoint folder's files (names and contents): a retrained model differs."""
    if not checkpoint or not Path(checkpoint).is_dir():
        return None
    h = hashlib.sha256()
    root = Path(checkpoint)
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode())
        h.update(file_hash(p).encode())
    return h.hexdigest()[:16]


def input_stamp(path) -> Optional[dict]:
    """A file's identity (resolved path, size, modification time); a GDAL/remote path as given."""
    if path is None:
        return None
    p = Path(str(path))
    if str(path).startswith(("/vsi", "stac:")) or not p.exists():
        return {"path": str(path)}
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _changed(old: dict, new: dict, prefix: str = "") -> list:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def read_manifest(run_dir) -> Optional[dict]:
    p = Path(run_dir) / MANIFEST
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except ValueError:
        raise InputError(f"run directory {run_dir}: {MANIFEST} is damaged; pass --fresh to start over") from None


def write_manifest(run_dir, manifest: dict) -> None:
    p = Path(run_dir) / MANIFEST
    tmp = p.with_name(f".{p.name}.tmp")
    manifest = dict(manifest, updated=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(tmp, p)


def finished(run_dir, shards: list) -> set:
    """Indices of the shards whose file exists."""
    return {s["index"] for s in shards if shard_path(run_dir, s["index"]).exists()}


def prepare(run_dir, fingerprint: dict, shards: list, fresh: bool, out) -> dict:
    """Create or reopen ``run_dir`` for this fingerprint; returns the manifest written, whose
    ``pending_at_start`` lists the shards still to compute. InputError when the existing run was
    made with another model/task/grid/input (named), unless ``fresh``."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"run directory {run_dir} is a file; give a folder with --run-dir")
    old = None if fresh else read_manifest(run_dir)
    if old is not None and old.get("fingerprint") != fingerprint:
        what = ", ".join(_changed(old.get("fingerprint") or {}, fingerprint)) or "the run's settings"
        n = len(finished(run_dir, old.get("shards") or []))
        raise InputError(f"run directory {run_dir} holds {n} finished shard(s) of a different run ({what} "
                         "changed); pass --fresh to discard them and start over, or give another --run-dir")
    if fresh or old is None:
        shutil.rmtree(run_dir / SHARDS, ignore_errors=True)
    (run_dir / SHARDS).mkdir(parents=True, exist_ok=True)
    for stale in (run_dir / SHARDS).glob(".*.tmp"):  # partial shards of a killed run
        stale.unlink(missing_ok=True)
    done = finished(run_dir, shards)
    manifest = {"version": VERSION, "status": "running", "out": str(out), "fingerprint": fingerprint,
                "shards": [dict(s, file=str(shard_path(run_dir, s["index"]).relative_to(run_dir))) for s in shards],
                "pending_at_start": [s["index"] for s in shards if s["index"] not in done]}
    write_manifest(run_dir, manifest)
    return manifest
