"""Plugin settings in QgsSettings under the prefix ``refound/``, and the one ``tr()``.

Everything the user picks in the dock (checkpoint folder, backend, device, cell size, batch size,
output path, field mapping per POI layer) is remembered here, so the next session starts where
the last one stopped. Keys are plain strings under ``refound/``; the POI field mapping is kept per
layer source (hashed, so a file path with slashes never becomes a settings group).
"""
from __future__ import annotations

import hashlib
import os

from qgis.core import QgsSettings
from qgis.PyQt.QtCore import QCoreApplication

PREFIX = "refound/"

# The four tasks of the dock and of Processing: (core task name, user-visible label).
# Core names are the keys of RegionSample.labels and of the checkpoint heads.
TASKS = (
    ("urban_village", "Urban villages (probability)"),
    ("population", "Population"),
    ("commercial", "Commercial activeness"),
    ("embedding", "Region embeddings"),
)

BACKENDS = (
    ("auto", "Automatic (in QGIS when PyTorch imports, else local backend)"),
    ("inprocess", "In QGIS (PyTorch in QGIS's Python)"),
    ("local", "Local backend process (Python environment with PyTorch)"),
    ("remote", "Running server (URL + token)"),
)

DEVICES = ("auto", "cuda", "cpu")

DEFAULTS = {
    "checkpoint_dir": "",
    "backend": "auto",
    "backend_python": "",   # a venv folder or a python executable (never sys.executable: SETUP-NOTES 7)
    "backend_url": "",
    "backend_authcfg": "",  # id of the QgsAuthManager config holding the server token (refound_qgis.auth)
    "device": "auto",
    "cell_size": 256.0,     # paper 5.1.1: 256 m x 256 m regions
    "batch_size": 16,
    "task": "population",
    "output_path": "",
    "max_cells": 20000,     # more cells are refused (dock: "Cell limit")
    "confirm_cells": 2000,  # more cells ask first (dock: "Ask above"); 0 never asks
}


def tr(text: str, context: str = "ReFound") -> str:
    """Translate a user-visible string (Qt Linguist context ``ReFound``)."""
    return QCoreApplication.translate(context, text)


def task_label(task: str) -> str:
    return tr(dict(TASKS).get(task, task))


def _settings() -> QgsSettings:
    return QgsSettings()


def value(key: str, default=None):
    """A setting with the type of its default (QgsSettings returns strings from INI files)."""
    if default is None:
        default = DEFAULTS.get(key)
    raw = _settings().value(PREFIX + key, default)
    if raw is None:
        return default
    try:
        if isinstance(default, bool):
            return raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except (TypeError, ValueError):
        return default
    return raw


def set_value(key: str, val) -> None:
    _settings().setValue(PREFIX + key, val)


def remove(key: str) -> None:
    _settings().remove(PREFIX + key)


def _layer_key(layer_source: str) -> str:
    return "layers/" + hashlib.sha1(layer_source.encode("utf-8"), usedforsecurity=False).hexdigest()[:16]  # a settings key, not a secret


def field_mapping(layer_source: str) -> tuple:
    """Remembered ``(name_field, category_field)`` for a POI layer source ('' when unknown)."""
    k = _layer_key(layer_source)
    return str(value(k + "/name_field", "") or ""), str(value(k + "/category_field", "") or "")


def set_field_mapping(layer_source: str, name_field: str, category_field: str) -> None:
    k = _layer_key(layer_source)
    set_value(k + "/name_field", name_field or "")
    set_value(k + "/category_field", category_field or "")


def plugin_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def bundled_checkpoint_dir() -> str:
    """The demo checkpoint shipped with the plugin, or '' when this build has none.

    Looked for in ``<plugin>/checkpoints/demo`` (zip built with ``--checkpoint``) and
    ``<repo>/checkpoints/demo`` (working tree); a folder counts when it is a checkpoint (holds a
    ``config.json``) or a folder of per-task checkpoints.
    """
    here = plugin_dir()
    for cand in (os.path.join(here, "checkpoints", "demo"),
                 os.path.join(os.path.dirname(here), "checkpoints", "demo")):
        if os.path.isfile(os.path.join(cand, "config.json")):
            return cand
        if os.path.isdir(cand) and any(os.path.isfile(os.path.join(cand, n, "config.json")) for n in os.listdir(cand)):
            return cand
    return ""


def default_checkpoint_dir() -> str:
    return str(value("checkpoint_dir") or "") or bundled_checkpoint_dir()
