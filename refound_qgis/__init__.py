"""ReFound for QGIS: urban region understanding from POI and imagery layers (Xiao et al., KDD 2024).

QGIS calls :func:`classFactory` with its interface (``None`` inside ``qgis_process``). Nothing here
imports torch: the model runs in QGIS's Python only when torch imports there, else in a backend
process (see ``refound_qgis.backend``).
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _ensure_core_importable():
    """Use the installed ``refound_core`` when there is one, else the copy bundled in the zip
    (``<plugin>/ext/refound_core``, put there by scripts/build_plugin_zip.py)."""
    try:
        import refound_core  # noqa: F401
    except ImportError:
        ext = os.path.join(_HERE, "ext")
        if os.path.isdir(os.path.join(ext, "refound_core")) and ext not in sys.path:
            sys.path.insert(0, ext)


_ensure_core_importable()


def classFactory(iface):  # noqa: N802 - QGIS's name
    from .plugin import RefoundPlugin

    return RefoundPlugin(iface)
