"""One report to attach to a bug report: versions, where the model would run, device, model files.

Peers' users ask for exactly this (shared/docs/USERS.md items 1, 2, 10): which Python QGIS runs,
whether torch imports there, whether the backend answers, which GPU and how much memory, and
whether the checkpoint folder holds what it should.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from typing import Optional

from qgis.core import Qgis
from qgis.PyQt.QtWidgets import QApplication, QDialog, QDialogButtonBox, QPlainTextEdit, QPushButton, QVBoxLayout

from . import settings
from .settings import tr

CHECKPOINT_FILES = ("config.json", "model.safetensors", "head.safetensors", "provenance.json")


def _torch_report() -> dict:
    from .backend import torch_in_qgis

    ok, detail = torch_in_qgis()
    rep = {"importable": ok, "version" if ok else "reason": detail}
    if ok:
        import torch

        rep["cuda_build"] = torch.version.cuda
        rep["cuda_available"] = bool(torch.cuda.is_available())
        rep["gpus"] = []
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            p = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            rep["gpus"].append({"name": p.name, "memory_gib": round(total / 2 ** 30, 1),
                                "free_gib": round(free / 2 ** 30, 1), "capability": f"{p.major}.{p.minor}"})
    return rep


def _memory() -> dict:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            info = dict(line.split(":", 1) for line in fh)
        kib = lambda k: int(info[k].strip().split()[0])  # noqa: E731
        return {"total_gib": round(kib("MemTotal") / 2 ** 20, 1), "available_gib": round(kib("MemAvailable") / 2 ** 20, 1)}
    except (OSError, KeyError, ValueError):
        return {}


def checkpoint_report(folder: str) -> dict:
    """What a checkpoint folder (or a folder of checkpoints) holds, read without torch."""
    rep: dict = {"folder": folder or "", "exists": bool(folder) and os.path.isdir(folder)}
    if not rep["exists"]:
        return rep
    folders = [folder] if os.path.isfile(os.path.join(folder, "config.json")) else [
        os.path.join(folder, n) for n in sorted(os.listdir(folder))
        if os.path.isfile(os.path.join(folder, n, "config.json"))]
    rep["checkpoints"] = []
    for f in folders:
        entry = {"path": f, "files": {n: os.path.exists(os.path.join(f, n)) for n in CHECKPOINT_FILES}}
        try:
            with open(os.path.join(f, "config.json"), encoding="utf-8") as fh:
                meta = json.load(fh)
            entry["model"] = (meta.get("model") or {}).get("name")
            entry["task"] = (meta.get("task") or {}).get("name") if meta.get("head") else None
            entry["format_version"] = meta.get("format_version")
            for role, rel in (meta.get("files") or {}).items():
                entry["files"][role] = os.path.exists(os.path.join(f, rel))
        except (OSError, ValueError) as exc:
            entry["error"] = str(exc)
        rep["checkpoints"].append(entry)
    return rep


def backend_report(backend_settings: dict, probe_local: bool = True) -> dict:
    """Is the configured backend usable? (remote: /health; local: the environment's doctor)."""
    b = backend_settings or {}
    kind = b.get("backend") or "auto"
    rep = {"choice": kind}
    if kind == "remote":
        from refound_core.backend.client import BackendClient, BackendError

        try:
            from refound_core.errors import InputError

            from .auth import token_for

            try:
                token = token_for(b.get("backend_authcfg", ""))
            except InputError as exc:
                raise BackendError(str(exc)) from None
            client = BackendClient(b.get("backend_url", ""), token, timeout=5)
            rep["health"] = client.health()
            rep["reachable"] = True
            rep["info"] = client.info()
        except BackendError as exc:
            rep["reachable"] = False
            rep["error"] = str(exc)
        return rep
    if b.get("backend_python"):
        from refound_core.errors import InputError

        from .backend import python_of_environment

        try:
            py = python_of_environment(b["backend_python"])
            rep["python"] = py
            if probe_local:
                out = subprocess.run([py, "-m", "training.cli", "doctor", "--json"], capture_output=True, text=True,
                                     timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
                rep["doctor_rc"] = out.returncode
                try:
                    rep["doctor"] = json.loads(out.stdout)
                except ValueError:
                    rep["doctor_output"] = (out.stdout + out.stderr)[-2000:]
        except InputError as exc:
            rep["error"] = str(exc)
        except (OSError, subprocess.SubprocessError) as exc:
            rep["error"] = f"{type(exc).__name__}: {exc}"
    return rep


def collect(backend_settings: Optional[dict] = None, probe_local: bool = True) -> dict:
    b = backend_settings or {k: settings.value(k) for k in ("backend", "backend_python", "backend_url",
                                                            "backend_authcfg", "device", "checkpoint_dir")}
    try:
        import numpy

        numpy_version = numpy.__version__
    except ImportError:
        numpy_version = None
    try:
        import refound_core

        core = {"version": refound_core.__version__, "path": os.path.dirname(refound_core.__file__)}
    except ImportError:
        core = None
    safe = dict(b)
    if safe.get("backend_token"):
        safe["backend_token"] = "***"
    return {
        "qgis": Qgis.QGIS_VERSION,
        "python": platform.python_version(),
        "python_prefix": sys.prefix,
        "sys_executable": sys.executable,
        "platform": platform.platform(),
        "numpy": numpy_version,
        "refound_core": core,
        "torch_in_qgis": _torch_report(),
        "memory": _memory(),
        "settings": safe,
        "backend": backend_report(b, probe_local),
        "checkpoint": checkpoint_report(b.get("checkpoint_dir") or settings.default_checkpoint_dir()),
    }


def report_text(rep: dict) -> str:
    # ensure_ascii=False: paths and names such as "Łódź" stay readable, not "\u0141\u00f3d\u017a"
    return json.dumps(rep, indent=2, default=str, ensure_ascii=False)


class DiagnosticsDialog(QDialog):
    def __init__(self, parent=None, backend_settings: Optional[dict] = None, probe_local: bool = True):
        super().__init__(parent)
        self.setWindowTitle(tr("ReFound diagnostics"))
        self.resize(640, 520)
        layout = QVBoxLayout(self)
        self.text = QPlainTextEdit(self)
        self.text.setReadOnly(True)
        layout.addWidget(self.text)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close, self)
        copy = QPushButton(tr("Copy to clipboard"), self)
        buttons.addButton(copy, QDialogButtonBox.ButtonRole.ActionRole)
        copy.clicked.connect(lambda: QApplication.clipboard().setText(self.text.toPlainText()))
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)
        self.report = collect(backend_settings, probe_local)
        self.text.setPlainText(report_text(self.report))
