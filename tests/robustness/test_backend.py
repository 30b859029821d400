"""The backend under bad clients: malformed JSON, wrong/missing token, oversize or missing
Content-Length, a client that stalls, many at once -> the right HTTP status and message, and
the server keeps serving afterwards."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest


@pytest.fixture(scope="module")
def srv(bad):
    from refound_core.backend.server import BackendServer
    from refound_core.inference.predictor import Predictor

    server = BackendServer(Predictor(bad["ckpt"], device="cpu", batch_size=4), "127.0.0.1", 0,
                           max_body_bytes=64 * 1024)
    server.client_timeout_s = 1.0
    server.start_in_thread()
    yield server
    server.shutdown()
    server.server_close()


def call(srv, method, path, body=None, token=True, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=20)
    h = dict(headers or {})
    if token is True:
        h["Authorization"] = f"Bearer {srv.token}"
    elif token:
        h["Authorization"] = f"Bearer {token}"
    if body is not None and "Content-Type" not in h:
        h["Content-Type"] = "application/json"
    conn.request(method, path, body=body, headers=h)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    try:
        return r.status, json.loads(data or b"{}")
    except ValueError:
        return r.status, {"raw": data.decode("utf-8", "replace")}


def still_serving(srv):
    status, body = call(srv, "GET", "/health")
    assert status == 200 and body["status"] == "ok"


@pytest.mark.parametrize("method,path,body,token,status,needle", [
    ("POST", "/predict", b"{not json", True, 400, ""),
    ("POST", "/predict", b"[1, 2, 3]", True, 400, ""),
    ("POST", "/predict", b"{}", False, 401, "token"),
    ("POST", "/predict", b"{}", "wrong-token", 401, "token"),
    ("GET", "/info", None, False, 401, "token"),
    ("GET", "/info", None, "wrong-token", 401, "token"),
    ("POST", "/predict", b"x" * (128 * 1024), True, 413, "limit"),
], ids=["malformed_json", "json_not_an_object", "predict_no_token", "predict_wrong_token", "info_no_token",
        "info_wrong_token", "oversize_body"])
def test_bad_request_gets_status_and_message(srv, method, path, body, token, status, needle):
    code, reply = call(srv, method, path, body, token)
    assert code == status, reply
    assert reply["error"]["message"] and needle in reply["error"]["message"]
    still_serving(srv)


def test_missing_and_negative_content_length(srv):
    for length, status in ((None, 411), ("-5", 400)):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        head = f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {srv.token}\r\n"
        head += "" if length is None else f"Content-Length: {length}\r\n"
        s.sendall((head + "\r\n").encode())
        assert s.recv(64).split()[1] == str(status).encode()
        s.close()
    still_serving(srv)


def test_stalled_client_is_dropped_and_others_are_served_meanwhile(srv):
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n")  # headers never finished
    t0 = time.monotonic()
    still_serving(srv)  # another client is answered while the first one stalls
    assert time.monotonic() - t0 < 1.0
    s.settimeout(10)
    assert s.recv(1024) == b""  # the server closed the stalled connection (client_timeout_s = 1)
    assert time.monotonic() - t0 < 8.0
    s.close()
    still_serving(srv)


def test_concurrent_requests_all_answered(srv):
    results = []

    def worker(i):
        results.append(call(srv, "GET", "/info" if i % 2 else "/health", token=True if i % 3 else "bad")[0])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == sorted([200 if i % 3 else 401 for i in range(24)])
    still_serving(srv)
