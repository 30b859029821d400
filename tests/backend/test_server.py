"""The loopback backend: auth, limits, validation, predict/embed parity, cancel, crash handling."""
from __future__ import annotations

import json
import math
import os
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.inference._inference_fixtures import CATEGORIES, CRS, WORDS
from refound_core.backend import protocol
from refound_core.backend.client import BackendCanceled, BackendClient, BackendError
from refound_core.backend.server import BackendServer, check_bind
from refound_core.data.sample import RegionSample
from refound_core.errors import InputError

REPO = Path(__file__).resolve().parents[2]


def _samples(n=8, seed=5):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x0, y0 = 500000.0 + 256 * i, 3000000.0
        k = [0, 2, 5, 9][i % 4]
        xy = np.column_stack([x0 + rng.uniform(1, 255, k), y0 + rng.uniform(1, 255, k)])
        img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) if i % 2 else None
        out.append(RegionSample(f"c{i}", (x0, y0, x0 + 256, y0 + 256), CRS,
                                [" ".join(rng.choice(WORDS, 2)) for _ in range(k)],
                                [CATEGORIES[j % 4] for j in range(k)], xy, img, 1.0 if img is not None else 0.0))
    return out


def _raw(server, path, body=None, ctype=protocol.JSON_CONTENT_TYPE, token=True, method=None):
    headers = {"Content-Type": ctype}
    if token:
        headers["Authorization"] = f"Bearer {server.token}"
    req = urllib.request.Request(server.url + path, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_every_request_needs_the_token(server):
    for path in ("/health", "/info"):
        code, body = _raw(server, path, token=False)
        assert code == 401 and "token" in body["error"]["message"]
    code, _ = _raw(server, "/predict", b"{}", token=False)
    assert code == 401
    with pytest.raises(BackendError) as err:
        BackendClient(server.url, "wrong-token", timeout=10).health()
    assert err.value.status == 401 and "token" in str(err.value)
    assert BackendClient(server.url, server.token).health()["status"] == "ok"


def test_info_describes_model_device_and_versions(server):
    info = BackendClient(server.url, server.token).info()
    assert info["model"] == "refound_tiny" and info["task"] == "urban_village" and info["kind"] == "binary"
    assert info["device"] == "cpu" and info["versions"]["torch"] and info["protocol"] == protocol.PROTOCOL_VERSION


@pytest.mark.parametrize("frame", [True, False], ids=["frame", "json-base64"])
def test_predict_matches_in_process_predictor(server, backend_predictor, frame):
    samples = _samples()
    direct = {r.cell_id: r for r in backend_predictor.predict_samples(samples)}
    got = BackendClient(server.url, server.token).predict(samples, task="urban_village", frame=frame)
    assert [g["cell_id"] for g in got] == [s.cell_id for s in samples]
    for g in got:
        d = direct[g["cell_id"]]
        assert g["sufficient"] == d.sufficient and g["poi_count"] == d.poi_count
        if d.sufficient:
            assert math.isclose(g["value"], d.value, abs_tol=1e-5)
        else:
            assert g["value"] is None


def test_embed_returns_vectors(server, backend_predictor):
    samples = _samples(4)
    got = BackendClient(server.url, server.token).embed(samples)
    h = backend_predictor.config.hidden_size
    direct = {r.cell_id: r for r in backend_predictor.embed_samples(samples)}
    for g in got:
        assert len(g["fused"]) == len(g["h_P"]) == h
        d = direct[g["cell_id"]]
        if d.sufficient:
            np.testing.assert_allclose(g["fused"], d.fused, atol=1e-5)
        else:
            assert all(math.isnan(v) for v in g["fused"])


def test_body_size_limit_gives_413(server):
    big = [{"cell_id": "a", "bounds": [0, 0, 1, 1], "crs": CRS,
            "image": (bytes(1024 * 1024 * 3), (1024, 1024, 3))}]
    with pytest.raises(BackendError) as err:
        BackendClient(server.url, server.token, timeout=20).predict(big)
    assert err.value.status == 413 and "limit" in str(err.value)


def _frame_with_image(ref_overrides, data=b"\x00" * (4 * 4 * 3)):
    ref = {"dtype": "uint8", "shape": [4, 4, 3], "offset": 0, "nbytes": len(data), **ref_overrides}
    header = {"samples": [{"cell_id": "a", "bounds": [0, 0, 256, 256], "crs": CRS, "pois": [], "image": ref}]}
    return protocol.pack_frame(header, [data])


@pytest.mark.parametrize("body,ctype,needle", [
    (b"this is not json", protocol.JSON_CONTENT_TYPE, "not valid JSON"),
    (b"[1, 2]", protocol.JSON_CONTENT_TYPE, "JSON object"),
    (json.dumps({"samples": [{"cell_id": "a", "bounds": [5, 0, 1, 1], "crs": CRS}]}).encode(),
     protocol.JSON_CONTENT_TYPE, "inverted"),
    (json.dumps({"samples": [{"cell_id": "a", "bounds": [0, 0, 1, 1], "crs": CRS, "pois": [["n", "c", 1.0]]}]}).encode(),
     protocol.JSON_CONTENT_TYPE, "[name, category, x, y]"),
    (json.dumps({"task": "weather", "samples": []}).encode(), protocol.JSON_CONTENT_TYPE, "weather"),
    (_frame_with_image({"dtype": "float32"}), protocol.FRAME_CONTENT_TYPE, "dtype must be 'uint8'"),
    (_frame_with_image({"shape": [4, 3, 4]}), protocol.FRAME_CONTENT_TYPE, "[H, W, 3]"),
    (_frame_with_image({"shape": [8, 8, 3]}), protocol.FRAME_CONTENT_TYPE, "outside the payload"),
    (_frame_with_image({"offset": -1}), protocol.FRAME_CONTENT_TYPE, "outside the payload"),
    (b"XXXX" + struct.pack("<I", 2) + b"{}", protocol.FRAME_CONTENT_TYPE, "RFND"),
    (b"{}", "application/x-python-pickle", "Content-Type"),
])
def test_malformed_input_is_a_400_with_a_message(server, body, ctype, needle):
    code, resp = _raw(server, "/predict", body, ctype)
    assert code in (400, 415)
    assert needle in resp["error"]["message"], resp


def test_binds_loopback_only_unless_remote_is_explicit(backend_predictor):
    for host in ("127.0.0.1", "::1", "localhost"):
        check_bind(host, False, None)
    with pytest.raises(InputError, match="--allow-remote"):
        check_bind("0.0.0.0", False, None)
    with pytest.raises(InputError, match="--token"):
        check_bind("0.0.0.0", True, None)
    check_bind("0.0.0.0", True, "a-long-explicit-token-123")
    with pytest.raises(InputError, match="127.0.0.1"):
        BackendServer(backend_predictor, "0.0.0.0", 0)


def test_cancel_stops_the_running_request(backend_predictor):
    srv = BackendServer(backend_predictor, "127.0.0.1", 0, batch_delay_s=0.25)
    srv.start_in_thread()
    try:
        client = BackendClient(srv.url, srv.token, timeout=30)
        outcome = {}

        def call():
            t0 = time.perf_counter()
            try:
                client.predict(_samples(32))  # 8+ batches of 4 at >= 0.25 s each
                outcome["result"] = "finished"
            except BackendCanceled:
                outcome["result"] = "canceled"
            outcome["seconds"] = time.perf_counter() - t0

        t = threading.Thread(target=call)
        t.start()
        deadline = time.monotonic() + 20
        while not srv.model_lock.locked():  # the request is in the model (not a fixed sleep: CI may be slow)
            assert time.monotonic() < deadline, "the predict request never reached the model"
            time.sleep(0.01)
        time.sleep(0.3)  # about one batch in
        t_cancel = time.perf_counter()
        assert client.cancel()["canceled"] is True
        t.join(timeout=20)
        assert outcome["result"] == "canceled"  # not "finished": 8 batches would take >= 2 s
        assert time.perf_counter() - t_cancel < 1.5  # within about one batch of the cancel
        assert len(client.predict(_samples(2))) == 2  # the server keeps serving
    finally:
        srv.shutdown()
        srv.server_close()


def test_client_needs_only_the_standard_library():
    code = ("import sys, importlib.abc\n"
            "class B(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in {'torch', 'numpy', 'qgis', 'PyQt5'}: raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, B())\n"
            "from refound_core.backend.client import BackendClient, BackendError\n"
            "from refound_core.backend import protocol\n"
            "body, ctype = protocol.encode_samples([{'cell_id': 'a', 'bounds': [0, 0, 1, 1], 'crs': 'EPSG:3857',\n"
            "    'poi_names': ['x'], 'poi_categories': ['c'], 'poi_xy': [(0.5, 0.5)], 'image': (bytes(12), (2, 2, 3)),\n"
            "    'image_coverage': 1.0}])\n"
            "h, p = protocol.unpack_frame(body)\n"
            "_, s, _ = protocol.parse_samples_request(h, p)\n"
            "print(ctype, s[0].image.shape)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "(2, 2, 3)" in res.stdout


SERVE = ("import argparse, sys\nfrom refound_core.inference.commands import serve\n"
         "p = argparse.ArgumentParser(); serve.add_arguments(p)\nsys.exit(serve.run(p.parse_args(sys.argv[1:])))\n")


@pytest.mark.slow
def test_backend_killed_mid_request_raises_not_hangs(backend_checkpoint, tmp_path):
    token_file = tmp_path / "token"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-c", SERVE, "--checkpoint", str(backend_checkpoint), "--device", "cpu",
                             "--batch-size", "1", "--debug-batch-delay", "0.3", "--token-file", str(token_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        ready = None
        deadline = time.time() + 90
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("REFOUND_BACKEND_READY "):
                ready = json.loads(line.split(" ", 1)[1])
                break
        assert ready is not None, proc.stderr.read()[-3000:] if proc.poll() is not None else "no ready line"
        assert ready["url"].startswith("http://127.0.0.1:")
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        token = token_file.read_text().strip()
        assert token == ready["token"] and len(token) >= 32
        client = BackendClient(ready["url"], token, timeout=60)
        assert client.health()["status"] == "ok"

        outcome = {}

        def call():
            t0 = time.perf_counter()
            try:
                client.predict(_samples(40))
                outcome["error"] = None
            except BackendError as exc:
                outcome["error"] = str(exc)
            outcome["seconds"] = time.perf_counter() - t0

        t = threading.Thread(target=call)
        t.start()
        time.sleep(1.0)
        proc.kill()
        t.join(timeout=30)
        assert not t.is_alive(), "client hung after the backend died"
        assert outcome["error"] and "closed the connection" in outcome["error"], outcome
        assert outcome["seconds"] < 15
        with pytest.raises(BackendError, match="cannot reach"):
            client.health()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
