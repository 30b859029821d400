"""The plugin loads and unloads cleanly in QGIS (mocked iface), and imports without torch."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from qgis_testlib import REPO

pytestmark = pytest.mark.qgis

ALGORITHM_IDS = {"refound:create_region_grid", "refound:predict_urban_villages", "refound:predict_population",
                 "refound:predict_commercial_activeness", "refound:compute_region_embeddings",
                 "refound:train_task_head", "refound:find_similar_regions", "refound:cluster_regions",
                 "refound:embedding_colours", "refound:compare_embeddings"}


def _registered_ids():
    from qgis.core import QgsApplication

    return {a.id() for a in QgsApplication.processingRegistry().algorithms() if a.provider().id() == "refound"}


def test_plugin_loads_and_unloads_cleanly(iface, clean_settings):
    from qgis.core import QgsApplication

    import refound_qgis

    plugin = refound_qgis.classFactory(iface)
    plugin.initGui()
    try:
        assert QgsApplication.processingRegistry().providerById("refound") is not None
        assert _registered_ids() == ALGORITHM_IDS
        iface.addToolBarIcon.assert_called_once_with(plugin.analyze_action)
        menu_actions = [c.args[1] for c in iface.addPluginToMenu.call_args_list]
        assert plugin.analyze_action in menu_actions and plugin.panel_action in menu_actions
        assert plugin.setup_action in menu_actions  # "Set up model backend…"
        assert plugin.analyze_action.text() == "Analyze extent"
        iface.addDockWidget.assert_called_once()
        assert iface.addDockWidget.call_args.args[1] is plugin.dock
        # The panel action and the dock stay in sync.
        assert plugin.dock.isHidden()
        plugin.panel_action.setChecked(True)
        assert not plugin.dock.isHidden()
        plugin.panel_action.setChecked(False)
        assert plugin.dock.isHidden()
        analyze = plugin.analyze_action
        dock = plugin.dock
    finally:
        plugin.unload()
    assert QgsApplication.processingRegistry().providerById("refound") is None
    assert _registered_ids() == set()
    iface.removeToolBarIcon.assert_called_once_with(analyze)
    removed = [c.args[1] for c in iface.removePluginMenu.call_args_list]
    assert analyze in removed and len(removed) == len(menu_actions)
    iface.removeDockWidget.assert_called_once_with(dock)
    assert plugin.dock is None and plugin.provider is None


def test_processing_only_start_without_iface(qgis_app):
    """qgis_process calls classFactory(None) and initProcessing() only."""
    from qgis.core import QgsApplication

    import refound_qgis

    plugin = refound_qgis.classFactory(None)
    plugin.initProcessing()
    plugin.initGui()  # harmless without an iface
    assert _registered_ids() == ALGORITHM_IDS
    plugin.unload()
    assert QgsApplication.processingRegistry().providerById("refound") is None


BLOCKED_IMPORT = textwrap.dedent("""
    import sys, importlib, importlib.abc, pkgutil
    BLOCK = {"torch", "torchvision", "timm", "transformers", "rasterio", "pyproj", "geopandas", "pyogrio",
             "shapely", "safetensors"}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in BLOCK:
                raise ImportError('blocked by test: ' + name)
    sys.meta_path.insert(0, Block())
    sys.path.append('/usr/share/qgis/python/plugins')
    from qgis.testing import start_app
    app = start_app()
    import refound_qgis
    for m in pkgutil.walk_packages(refound_qgis.__path__, 'refound_qgis.'):
        importlib.import_module(m.name)
    from refound_qgis.processing.provider import RefoundProvider
    from qgis.core import QgsApplication
    plugin = refound_qgis.classFactory(None)
    plugin.initProcessing()
    algs = sorted(a.id() for a in QgsApplication.processingRegistry().algorithms() if a.provider().id() == 'refound')
    plugin.unload()
    loaded = sorted(m for m in sys.modules if m.split('.')[0] in BLOCK)
    print('ALGS', len(algs), 'HEAVY', loaded)
""")


def test_plugin_imports_without_torch_and_heavy_geo_packages():
    res = subprocess.run([sys.executable, "-c", BLOCKED_IMPORT], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ, "QT_QPA_PLATFORM": "offscreen"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"ALGS {len(ALGORITHM_IDS)} HEAVY []" in res.stdout, res.stdout[-2000:]
