"""The backend token lives in QGIS's authentication database: typed into the dock, read by the
task and by the Processing algorithm from there, and never written to QgsSettings or the log."""
from __future__ import annotations

import threading

import pytest

from qgis_testlib import fill_dock, show_canvas  # noqa: E402
from qgis_testlib import CELL, EPSG, SCENE_CELLS

pytestmark = pytest.mark.qgis
TOKEN = "refound-test-token-7f3a9c1e5b"  # noqa: S105 - a test secret


def _settings_text() -> str:
    from qgis.core import QgsSettings

    s = QgsSettings()
    return "\n".join(f"{k}={s.value(k)}" for k in s.allKeys())


@pytest.fixture
def log_messages(qgis_app):
    from qgis.core import QgsApplication

    got = []

    def keep(message, tag, level):
        got.append(f"{tag}: {message}")

    QgsApplication.messageLog().messageReceived.connect(keep)
    yield got
    QgsApplication.messageLog().messageReceived.disconnect(keep)


def test_token_round_trip_and_update(auth_db, clean_settings):
    from refound_qgis import auth

    cfg = auth.remember_token(TOKEN)
    assert auth.token_for(cfg) == TOKEN
    assert auth.remember_token("second-token-value") == cfg  # the same config is updated
    assert auth.token_for(cfg) == "second-token-value"
    assert TOKEN not in _settings_text() and "second-token-value" not in _settings_text()
    with pytest.raises(Exception, match="does not exist"):
        auth.token_for("nosuch1")


def test_old_plain_token_moves_to_the_auth_database(auth_db, clean_settings):
    from refound_qgis import auth, settings

    settings.set_value("backend_token", TOKEN)
    auth.migrate_plain_token()
    assert TOKEN not in _settings_text()
    assert auth.token_for(settings.value("backend_authcfg")) == TOKEN


@pytest.fixture
def server(qgis_app, checkpoints):
    pytest.importorskip("torch")
    from refound_core.backend.server import BackendServer
    from refound_core.inference.predictor import Predictor

    srv = BackendServer(Predictor(str(checkpoints["population"]), device="cpu"), token=TOKEN)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_dock_runs_remote_with_the_token_from_the_auth_database(qtbot, iface, auth_db, clean_settings, project,
                                                                 scene_layers, server, log_messages):
    from qgis_testlib import scene_extent

    from refound_qgis import auth, settings
    from refound_qgis.dock import RefoundDock

    canvas = show_canvas(qtbot, iface, EPSG, scene_extent())
    dock = RefoundDock(iface)
    qtbot.addWidget(dock)
    pois, img = scene_layers
    fill_dock(dock, pois, img, task="population", backend="remote", device=None)
    dock.backend_url_edit.setText(server.url)
    dock.backend_token_edit.setText(TOKEN)
    try:
        with qtbot.waitSignal(dock.analysis_finished, timeout=120_000) as blocker:
            dock.run_button.click()
        layer, shown = blocker.args[0], [blocker.args[1]]
        assert layer is not None, (blocker.args, log_messages)
        assert layer.featureCount() == SCENE_CELLS ** 2
        cfg = settings.value("backend_authcfg")
        assert cfg and auth.token_for(cfg) == TOKEN
        assert dock.backend_token_edit.text() == ""  # not shown back
        # A wrong token in the database is refused by the server (so the token really is read from there).
        auth.remember_token("not-the-token-at-all")
        with qtbot.waitSignal(dock.analysis_finished, timeout=120_000) as blocker:
            dock.run_button.click()
        assert blocker.args[0] is None and "401" in blocker.args[1]
        shown.append(blocker.args[1])
    finally:
        dock.shutdown()
    assert TOKEN not in _settings_text()
    # neither the QGIS log nor the panel's messages (status line, message bar) carry the token
    assert not any(TOKEN in m for m in log_messages + shown + [dock.status_label.text()])


def test_processing_takes_an_auth_config_not_a_token(auth_db, clean_settings, processing_ready, project, scene,
                                                     server, log_messages):
    import processing
    from qgis.core import QgsApplication, QgsProcessingParameterAuthConfig

    import refound_qgis
    from refound_qgis import auth

    plugin = refound_qgis.classFactory(None)
    plugin.initProcessing()
    try:
        alg = QgsApplication.processingRegistry().algorithmById("refound:predict_population")
        assert isinstance(alg.parameterDefinition("BACKEND_AUTHCFG"), QgsProcessingParameterAuthConfig)
        assert alg.parameterDefinition("BACKEND_TOKEN") is None
        cfg = auth.remember_token(TOKEN)
        params = {"EXTENT": f"{scene['pois']}|layername=pois", "POIS": f"{scene['pois']}|layername=pois",
                  "NAME_FIELD": "title", "CATEGORY_FIELD": "kind", "IMAGERY": str(scene["imagery"]),
                  "BACKEND": 3, "BACKEND_URL": server.url, "BACKEND_AUTHCFG": cfg, "CELL_SIZE": CELL,
                  "OUTPUT": "TEMPORARY_OUTPUT"}
        res = processing.run("refound:predict_population", params)
        assert res["OUTPUT"].featureCount() > 0
        assert TOKEN not in repr(params)  # what Processing keeps in its history is the config id
    finally:
        plugin.unload()
    assert TOKEN not in _settings_text() and not any(TOKEN in m for m in log_messages)
