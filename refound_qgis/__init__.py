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
    (``<plugin>/ext/refound_core``, put there by scripts/build_plugin_zip.py).

    "Installed" includes an editable install (``pip install -e``, as ``make setup`` does) in a
    venv whose site-packages is on PYTHONPATH (the README's qgis_process recipe): PYTHONPATH
    folders are not site folders, so Python skips the ``.pth`` finder that makes such an install
    importable, and the cut-down bundled copy (no model code) would shadow it. The folder holding
    refound's own editable ``.pth`` is therefore added as a site folder first.
    """
    try:
        import refound_core  # noqa: F401
        return
    except ImportError:
        pass
    import glob
    import site

    for folder in list(sys.path):
        if folder and glob.glob(os.path.join(glob.escape(folder), "__editable__.refound-*.pth")):
            site.addsitedir(folder)
            try:
                import refound_core  # noqa: F401,F811
                return
            except ImportError:
                continue
    ext = os.path.join(_HERE, "ext")
    if os.path.isdir(os.path.join(ext, "refound_core")) and ext not in sys.path:
        sys.path.insert(0, ext)


_ensure_core_importable()


def classFactory(iface):  # noqa: N802 - QGIS's name
    from .plugin import RefoundPlugin

    return RefoundPlugin(iface)
