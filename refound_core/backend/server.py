"""``refound serve``: the model in its own process, behind a loopback HTTP server.

Why: installing torch into QGIS's own Python is the top complaint of QGIS deep-learning plugins,
and "GPU not used inside QGIS" the second (docs/BACKEND.md). The plugin can instead start this
server from a configured venv and talk to it with the stdlib-only client.

Security model (docs/BACKEND.md):
* binds 127.0.0.1 only; any other address is refused unless ``--allow-remote`` *and* an explicit
  ``--token`` are given;
* a random per-process token (``secrets.token_urlsafe``) is printed and written to a 0600 file;
  every request must carry ``Authorization: Bearer <token>`` (401 otherwise, compared in
  constant time);
* a request body size limit (413 before the body is read); every input is validated
  (``protocol.py``) and nothing received is ever unpickled or evaluated.

Endpoints: GET /health, GET /info, POST /predict, POST /embed, POST /cancel. One request uses the
model at a time (a lock); /cancel makes the running and waiting requests stop within one batch
and answer 409.

Stdlib ``http.server.ThreadingHTTPServer``: no extra dependency, and the protocol is small.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import sys
import tempfile
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

from refound_core.backend import protocol
from refound_core.errors import InputError

log = logging.getLogger("refound.backend")

LOOPBACK_NAMES = ("localhost",)
READY_PREFIX = "REFOUND_BACKEND_READY "


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, allow_remote: bool, token: Optional[str]) -> None:
    """Refuse a non-loopback address unless remote access was asked for with an explicit token."""
    if is_loopback(host):
        return
    if not allow_remote:
        raise InputError(f"refusing to listen on {host!r}: the backend binds 127.0.0.1 only; to accept remote "
                         "connections pass --allow-remote together with --token (and use a firewall or an SSH tunnel)")
    if not token:
        raise InputError(f"--allow-remote on {host!r} needs an explicit --token (at least 16 characters) so "
                         "remote clients are authenticated")
    if len(token) < 16:
        raise InputError("--token must be at least 16 characters long")


def write_token_file(token: str, path: Optional[str] = None) -> Path:
    """Write the token to a file only the current user can read (0600, created exclusively)."""
    if path is None:
        folder = Path(tempfile.mkdtemp(prefix="refound-backend-"))  # 0700
        path = folder / "token"
    path = Path(path)
    if path.exists():
        path.unlink()
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return path


CLIENT_TIMEOUT_S = 30.0  # seconds a connection may stay silent while sending its request


class _Canceled(Exception):
    pass


class BackendServer(ThreadingHTTPServer):
    """The HTTP server holding one :class:`~refound_core.inference.predictor.Predictor`.

    Args:
        predictor: a loaded Predictor.
        host, port: address (port 0 = any free port; read ``server.port``).
        token: the secret clients must send; None = a fresh random token.
        max_body_bytes: larger request bodies are refused with 413.
        allow_remote: permit a non-loopback ``host`` (then ``token`` must be given).
        batch_delay_s: debugging/testing only: sleep before each batch (makes /cancel observable).
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, predictor, host: str = "127.0.0.1", port: int = 0, token: Optional[str] = None,
                 max_body_bytes: int = protocol.DEFAULT_MAX_BODY_BYTES, allow_remote: bool = False,
                 batch_delay_s: float = 0.0):
        check_bind(host, allow_remote, token)
        self.predictor = predictor
        self.token = token or secrets.token_urlsafe(32)
        self.max_body_bytes = int(max_body_bytes)
        self.batch_delay_s = float(batch_delay_s)
        self.model_lock = threading.Lock()
        self._cancel_generation = 0
        self._gen_lock = threading.Lock()
        self.started = time.time()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.address_family = family
        super().__init__((host, int(port)), _Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        host = self.server_address[0]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def start_in_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="refound-backend", daemon=True)
        t.start()
        return t

    # -- cancel ---------------------------------------------------------------------------------
    def cancel_all(self) -> int:
        with self._gen_lock:
            self._cancel_generation += 1
            return self._cancel_generation

    def generation(self) -> int:
        with self._gen_lock:
            return self._cancel_generation

    def canceler(self, generation: int):
        def is_canceled() -> bool:
            if self.batch_delay_s:
                time.sleep(self.batch_delay_s)
            return self.generation() != generation
        return is_canceled


class _Handler(BaseHTTPRequestHandler):
    server: BackendServer
    protocol_version = "HTTP/1.1"
    server_version = "refound-backend"

    def setup(self):
        # A client that stalls mid-request is dropped after this many seconds, so a slow or stuck
        # client holds one thread for a bounded time (the others keep being served meanwhile).
        self.timeout = getattr(self.server, "client_timeout_s", CLIENT_TIMEOUT_S)
        super().setup()

    # -- plumbing -------------------------------------------------------------------------------
    def log_message(self, fmt, *args):  # quiet by default; routed to logging
        log.info("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: bytes, content_type: str = protocol.JSON_CONTENT_TYPE) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj, allow_nan=False).encode("utf-8"))

    def _error(self, status: int, code: str, message: str) -> None:
        self._json(status, {"error": {"code": code, "message": message}})

    def _authorized(self) -> bool:
        header = self.headers.get(protocol.TOKEN_HEADER, "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if given and hmac.compare_digest(given.encode("utf-8"), self.server.token.encode("utf-8")):
            return True
        self._error(401, "unauthorized", "missing or wrong token: send 'Authorization: Bearer <token>' with the "
                                         "token from the backend's token file")
        return False

    def _drain_and_close(self, remaining: int) -> None:
        """After an early answer (413), read away a bounded amount of the unread body so the
        client sees the response instead of a connection reset."""
        try:
            self.connection.settimeout(2.0)
            left = min(remaining, 4 * self.server.max_body_bytes + (1 << 20))
            while left > 0:
                chunk = self.rfile.read(min(65536, left))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _read_body(self) -> Optional[bytes]:
        length = self.headers.get("Content-Length")
        if length is None:
            self._error(411, "length_required", "request needs a Content-Length header")
            return None
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self._error(400, "bad_request", f"Content-Length {length!r} is not a non-negative integer")
            return None
        if n > self.server.max_body_bytes:
            self._error(413, "too_large", f"request body of {n} bytes exceeds the limit of "
                                          f"{self.server.max_body_bytes} bytes; send fewer cells per request")
            self._drain_and_close(n)
            return None
        return self.rfile.read(n)

    # -- routes ---------------------------------------------------------------------------------
    def do_GET(self):
        if not self._authorized():
            return
        if self.path == "/health":
            self._json(200, {"status": "ok", "protocol": protocol.PROTOCOL_VERSION, "pid": os.getpid(),
                             "busy": self.server.model_lock.locked(),
                             "uptime_s": round(time.time() - self.server.started, 1)})
        elif self.path == "/info":
            info = self.server.predictor.describe()
            info.update({"protocol": protocol.PROTOCOL_VERSION, "pid": os.getpid(),
                         "python": sys.version.split()[0], "tasks": [info["task"]] if info["task"] else [],
                         "max_body_bytes": self.server.max_body_bytes, "max_samples": protocol.MAX_SAMPLES})
            self._json(200, info)
        else:
            self._error(404, "not_found", f"no endpoint GET {self.path}; use /health or /info")

    def do_POST(self):
        if not self._authorized():
            try:
                self._drain_and_close(int(self.headers.get("Content-Length") or 0))
            except ValueError:
                pass
            return
        # the cancel generation at arrival: a /cancel that comes while this request's body is still
        # being read or decoded (a slow link, a loaded machine) cancels it too
        self._arrival_generation = self.server.generation()
        routes = {"/predict": self._predict, "/embed": self._embed, "/cancel": self._cancel}
        handler = routes.get(self.path)
        if handler is None:
            self._error(404, "not_found", f"no endpoint POST {self.path}; use /predict, /embed or /cancel")
            return
        body = self._read_body()
        if body is None:
            return
        try:
            handler(body)
        except protocol.ProtocolError as exc:
            self._error(exc.status, "bad_request", str(exc))
        except InputError as exc:
            self._error(400, "bad_input", str(exc))
        except _Canceled:
            self._error(409, "canceled", "request canceled by POST /cancel")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # noqa: BLE001 - reported to the client, logged here
            log.error("backend error: %s", traceback.format_exc())
            self._error(500, "internal", f"{type(exc).__name__}: {exc}")

    def _cancel(self, body: bytes) -> None:
        gen = self.server.cancel_all()
        self._json(200, {"canceled": True, "generation": gen})

    def _samples(self, body: bytes):
        header, payload = protocol.decode_body(body, self.headers.get("Content-Type", ""))
        task, wire, extras = protocol.parse_samples_request(header, payload)
        return task, [_to_region_sample(s) for s in wire], extras

    def _run_model(self, fn):
        from refound_core.inference.predictor import AnalysisCanceled

        gen = self._arrival_generation
        is_canceled = self.server.canceler(gen)
        with self.server.model_lock:
            if self.server.generation() != gen:
                raise _Canceled()
            try:
                return fn(is_canceled)
            except AnalysisCanceled:
                raise _Canceled() from None

    def _predict(self, body: bytes) -> None:
        task, samples, _ = self._samples(body)
        p = self.server.predictor
        task = p.check_task(task)
        t0 = time.perf_counter()
        results = self._run_model(lambda c: list(p.predict_samples(samples, task=task, is_canceled=c)))
        out = [{"cell_id": r.cell_id, "value": protocol.json_safe_number(r.value), "sufficient": r.sufficient,
                "poi_count": r.poi_count, "image_coverage": r.image_coverage, "image_used": bool(r.image_used),
                "values": None if r.values is None else [protocol.json_safe_number(v) for v in r.values],
                **_extra(r)} for r in results]
        self._json(200, {"task": task, "kind": p.kind, "results": out,
                         "seconds": round(time.perf_counter() - t0, 4)})

    def _embed(self, body: bytes) -> None:
        import numpy as np

        _, samples, extras = self._samples(body)
        p = self.server.predictor
        results = self._run_model(lambda c: list(p.embed_samples(samples, is_canceled=c)))
        h = p.config.hidden_size
        meta = [{"cell_id": r.cell_id, "sufficient": r.sufficient, "poi_count": r.poi_count,
                 "image_coverage": r.image_coverage, "image_used": bool(r.image_used), **_extra(r)} for r in results]
        frame = protocol.FRAME_CONTENT_TYPE in (self.headers.get("Accept") or "")
        arrays, buffers, offset = {}, [], 0
        for name in extras["return"]:
            mat = np.full((len(results), h), np.nan, dtype="<f4")
            for i, r in enumerate(results):
                v = getattr(r, name)
                if v is not None:
                    mat[i] = v
            data = mat.tobytes()
            arrays[name] = protocol.array_ref("float32", mat.shape, data, offset if frame else None)
            if frame:
                buffers.append(data)
                offset += len(data)
        header = {"protocol": protocol.PROTOCOL_VERSION, "hidden_size": h, "results": meta, "arrays": arrays}
        if frame:
            self._send(200, protocol.pack_frame(header, buffers), protocol.FRAME_CONTENT_TYPE)
        else:
            self._json(200, header)


def _extra(result) -> dict:
    """The per-cell outputs beyond the fixed ones (``results.extra_columns``), JSON-safe."""
    from refound_core.inference.results import extra_columns

    return {k: protocol.json_safe_number(v) if isinstance(v, float) else v for k, v in extra_columns(result).items()}


def _to_region_sample(s: protocol.WireSample):
    import numpy as np

    from refound_core.data.sample import RegionSample

    image = None
    if s.image is not None:
        image = np.frombuffer(s.image.data, dtype=np.uint8).reshape(s.image.shape)
    xy = np.asarray(s.poi_xy, dtype=np.float64).reshape(-1, 2)
    return RegionSample(cell_id=s.cell_id, bounds=s.bounds, crs=s.crs, poi_names=list(s.poi_names),
                        poi_categories=["" if c is None else c for c in s.poi_categories], poi_xy=xy,
                        image=image, image_coverage=s.image_coverage if image is not None else 0.0)


def serve(checkpoint, device: str = "auto", host: str = "127.0.0.1", port: int = 0, token: Optional[str] = None,
          allow_remote: bool = False, token_file: Optional[str] = None, batch_size: Optional[int] = None,
          max_body_bytes: int = protocol.DEFAULT_MAX_BODY_BYTES, batch_delay_s: float = 0.0,
          out=sys.stdout) -> int:
    """Load the checkpoint, bind, print the ready line, serve until interrupted/terminated."""
    import signal

    from refound_core.inference.predictor import Predictor

    check_bind(host, allow_remote, token)  # before the (slow) model load
    predictor = Predictor(checkpoint, device=device, batch_size=batch_size)
    server = BackendServer(predictor, host, port, token, max_body_bytes, allow_remote, batch_delay_s)
    path = write_token_file(server.token, token_file)
    ready = {"url": server.url, "token": server.token, "token_file": str(path), "pid": os.getpid(),
             "device": str(predictor.device), "task": predictor.task, "protocol": protocol.PROTOCOL_VERSION}
    print(f"ReFound backend listening on {server.url} (device {predictor.device}, task {predictor.task}); "
          f"token file {path}", file=out)
    print(READY_PREFIX + json.dumps(ready), file=out, flush=True)

    def _stop(signum, frame):  # SIGTERM from the plugin: shut down cleanly
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        try:
            path.unlink()
            if token_file is None:
                path.parent.rmdir()
        except OSError:
            pass
    return 0
