"""Where the model runs: the run-time choice, the HTTP runner, and a real local backend process."""
from __future__ import annotations

import math
import os
import sys

import pytest
from qgis_testlib import CELL, EPSG, IMAGE_COLS, SCENE_CELLS, scene_extent

pytestmark = pytest.mark.qgis


@pytest.fixture
def no_torch(monkeypatch):
    """Pretend torch does not import in QGIS's Python."""
    from refound_qgis import backend

    monkeypatch.setattr(backend, "_TORCH_STATE", {"ok": False, "detail": "ModuleNotFoundError: No module named 'torch'"})


def test_auto_without_torch_needs_an_environment(qgis_app, no_torch):
    from refound_core.errors import InputError
    from refound_qgis.backend import resolve_backend

    with pytest.raises(InputError, match="no backend environment is configured"):
        resolve_backend("auto")
    with pytest.raises(InputError, match="PyTorch does not import"):
        resolve_backend("inprocess")
    with pytest.raises(InputError, match="URL"):
        resolve_backend("remote", backend_token="t")
    with pytest.raises(InputError, match="holds no Python interpreter"):
        resolve_backend("local", backend_python=os.path.dirname(os.__file__))


def test_auto_with_torch_runs_in_process(qgis_app):
    pytest.importorskip("torch")
    from refound_qgis.backend import resolve_backend

    assert resolve_backend("auto") == ("inprocess", None)


def test_python_of_environment_finds_the_venv_interpreter(qgis_app, tmp_path):
    from refound_core.errors import InputError
    from refound_qgis.backend import python_of_environment

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text("#!/bin/sh\n")
    py.chmod(0o755)
    assert python_of_environment(str(venv)) == str(py)
    assert python_of_environment(str(py)) == str(py)
    with pytest.raises(InputError, match="does not exist"):
        python_of_environment(str(tmp_path / "nope"))
    # Never QGIS's sys.executable implicitly (SETUP-NOTES pitfall 7): empty means "not configured".
    with pytest.raises(InputError, match="No backend Python environment"):
        python_of_environment("")


class _StubClient:
    """Records requests; the second batch's caller cancels."""

    def __init__(self, on_call):
        self.calls, self.on_call, self.canceled = [], on_call, 0

    def predict(self, chunk, task=None):
        self.calls.append(len(chunk))
        self.on_call(len(self.calls))
        return [{"cell_id": s.cell_id, "value": 1.0, "sufficient": True, "poi_count": 0, "image_coverage": 0.0}
                for s in chunk]

    def cancel(self):
        self.canceled += 1


def test_remote_predictor_cancel_stops_within_one_batch(qgis_app):
    """The backend's model behind the predictor protocol (what run_analysis drives for the dock's
    local / remote backends): a cancel stops before the next request goes out."""
    from refound_core.backend.remote import RemotePredictor
    from refound_core.data.sample import RegionSample
    from refound_core.inference.predictor import AnalysisCanceled

    samples = [RegionSample(f"{EPSG}/256/{i}_0", (i * CELL, 0.0, (i + 1) * CELL, CELL), EPSG) for i in range(10)]
    flag = {"cancel": False}
    info = {"task": "population", "kind": "regression"}
    runner = RemotePredictor(batch_size=3, description="stub", client=_StubClient(lambda n: flag.update(cancel=n >= 2)))
    runner._info = info
    with pytest.raises(AnalysisCanceled):
        list(runner.predict_samples(samples, "population", is_canceled=lambda: flag["cancel"]))
    assert runner.client.calls == [3, 3]  # the batch after the cancel never went out
    runner2 = RemotePredictor(batch_size=4, description="stub", client=_StubClient(lambda n: None))
    runner2._info = info
    got = list(runner2.predict_samples(samples, "population", is_canceled=lambda: False))
    assert [r.cell_id for r in got] == [s.cell_id for s in samples]
    assert all(tuple(r.bounds) == s.bounds for r, s in zip(got, samples))
    runner2.cancel()
    assert runner2.client.canceled == 1


@pytest.mark.slow
def test_local_backend_process_matches_in_process(qgis_app, auth_db, project, scene_layers, checkpoints):
    """A real `refound serve` from this venv (the configured environment): same values as in QGIS,
    then the same server used as a 'running server' with its URL and token."""
    pytest.importorskip("torch")
    from qgis.core import QgsCoordinateReferenceSystem

    from refound_qgis import auth, backend, layer_io
    from refound_qgis.task import AnalysisParams, execute

    pois, img = scene_layers
    base = dict(task="population", extent=scene_extent(), extent_crs=QgsCoordinateReferenceSystem(EPSG),
                checkpoint_dir=str(checkpoints["root"]), device="cpu", batch_size=8,
                pois=layer_io.PoiInput.from_layer(pois, "title", "kind"), imagery=layer_io.ImageryInput.from_layer(img))
    local = AnalysisParams(backend="local", backend_python=sys.prefix, **base)
    try:
        got_local = execute(local)
        assert got_local.backend == "local" and len(got_local.cells) == SCENE_CELLS ** 2
        be = next(iter(backend._LOCAL.values()))
        assert be.alive() and be.url.startswith("http://127.0.0.1:")
        remote = AnalysisParams(backend="remote", backend_url=be.url,
                                backend_authcfg=auth.store_token(be.token), **base)
        got_remote = execute(remote)
        wrong = AnalysisParams(backend="remote", backend_url=be.url,
                               backend_authcfg=auth.store_token("not-the-token"), **base)
        from refound_core.errors import InputError

        with pytest.raises(InputError, match="401"):
            execute(wrong)
        with open(be.log_path, encoding="utf-8") as fh:
            assert be.token not in fh.read()  # the log is readable by people, never the token
    finally:
        procs = [b.proc for b in backend._LOCAL.values()]
        folders = [b.folder for b in backend._LOCAL.values()]
        backend.stop_local_backends()
    assert all(p is None or p.poll() is not None for p in procs)
    assert folders and not any(os.path.exists(f) for f in folders)  # token file and log removed
    inproc = execute(AnalysisParams(backend="inprocess", **base))
    want = {c.cell_id: c.value for c in inproc.cells if c.sufficient}
    assert len(want) == IMAGE_COLS * SCENE_CELLS
    for got in (got_local, got_remote):
        vals = {r.cell_id: r.value for r in got.cells if r.sufficient}
        assert vals.keys() == want.keys()
        for k, v in want.items():
            assert vals[k] == pytest.approx(v, rel=1e-4, abs=1e-4)
        assert all(math.isnan(r.value) for r in got.cells if not r.sufficient)


HEADLESS = """
import sys
from refound_qgis.backend import LocalBackend, _LOCAL
be = LocalBackend(sys.executable, sys.argv[1], "cpu").start()
_LOCAL["k"] = be
print(be.proc.pid, be.folder, flush=True)
"""  # then the interpreter ends without unloading the plugin, as qgis_process does


def test_headless_run_leaves_no_backend_process_or_folder(qgis_app, checkpoints):
    import subprocess
    import time

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", HEADLESS, str(checkpoints["population"])], capture_output=True,
                         text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    pid, folder = res.stdout.split()[-2:]
    deadline = time.monotonic() + 15
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{pid}") and not os.path.exists(folder)


PARTIAL = """
from refound_core.errors import InputError
from refound_qgis.backend import resolve_backend
try:
    resolve_backend("auto")
except InputError as exc:
    print("INPUT-ERROR", exc)
"""


def test_partial_refound_core_is_never_used_for_inference(qgis_app, tmp_path):
    """The plugin's cut-down refound_core (no predictor) first on sys.path, torch importable:
    auto must not choose in-process inference (which would fail with ModuleNotFoundError) but
    say what to configure."""
    import shutil
    import subprocess

    pytest.importorskip("torch")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    shutil.copytree(os.path.join(repo, "refound_core"), tmp_path / "refound_core")
    (tmp_path / "refound_core" / "inference" / "predictor.py").unlink()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path)] + sys.path))
    res = subprocess.run([sys.executable, "-c", PARTIAL], capture_output=True, text=True, timeout=120, env=env,
                         cwd=tmp_path)
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "INPUT-ERROR" in res.stdout and "bundled copy" in res.stdout and "backend" in res.stdout, res.stdout
