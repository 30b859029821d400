"""Client of the local ReFound backend (``refound serve``), standard library only.

The QGIS plugin imports this inside QGIS's own Python, where torch (and possibly numpy) is not
installed: it must stay free of third-party imports (tests/backend checks this with torch and
numpy blocked). Errors are raised as :class:`BackendError` with one actionable message; a backend
that dies or stops answering mid-request raises too (socket timeout), never hangs.

Example::

    client = BackendClient("http://127.0.0.1:8765", token=open(token_file).read().strip())
    client.health()
    results = client.predict(samples, task="urban_village")   # list of dicts, one per cell
"""
from __future__ import annotations

import http.client
import json
import socket
import urllib.error
import urllib.request
from typing import Optional

from refound_core.backend import protocol

DEFAULT_TIMEOUT_S = 600.0


class BackendError(RuntimeError):
    """The backend could not be reached, refused the request, or failed. ``status`` is the HTTP
    status when the backend answered (None when it did not)."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


class BackendCanceled(BackendError):
    """The request was canceled (POST /cancel) before it finished."""


class BackendClient:
    """Talks to one backend at ``url`` with its per-process ``token``.

    Args:
        url: ``http://127.0.0.1:PORT`` as printed by ``refound serve``.
        token: the token from the backend's 0600 token file.
        timeout: seconds to wait on the socket for each request (connect and each read); a killed
            or stuck backend raises BackendError after at most this long.
    """

    def __init__(self, url: str, token: str, timeout: float = DEFAULT_TIMEOUT_S):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = float(timeout)

    # ---------------------------------------------------------------- transport
    def _request(self, method: str, path: str, body: bytes = None, content_type: str = None,
                 timeout: float = None) -> tuple:
        headers = {protocol.TOKEN_HEADER: f"Bearer {self.token}", "Accept": protocol.FRAME_CONTENT_TYPE}
        if body is not None:
            headers["Content-Type"] = content_type or protocol.JSON_CONTENT_TYPE
        if not self.url.lower().startswith(("http://", "https://")):
            raise BackendError(f"backend URL {self.url!r} is not http(s): give the http://127.0.0.1:PORT the backend printed")
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        where = f"ReFound backend at {self.url}"
        try:
            # B310 is silenced below: the scheme is checked just above (http/https only, no file:)
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:  # noqa: S310  # nosec B310
                return resp.status, resp.headers.get("Content-Type", ""), resp.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read() if exc.fp is not None else b""
            message = _error_message(raw) or exc.reason
            if exc.code == 409 and "cancel" in str(message).lower():
                raise BackendCanceled(f"{where}: request canceled", status=exc.code) from None
            hint = {401: " (wrong or missing token: read it again from the backend's token file)",
                    413: " (request too large: send fewer cells per request)"}.get(exc.code, "")
            raise BackendError(f"{where} answered {exc.code}: {message}{hint}", status=exc.code) from None
        except (socket.timeout, TimeoutError):
            raise BackendError(f"{where} did not answer within {timeout or self.timeout:g} s; it may be stuck "
                               "or overloaded: restart it, or raise the timeout") from None
        except (http.client.RemoteDisconnected, http.client.IncompleteRead, ConnectionResetError,
                BrokenPipeError, http.client.BadStatusLine) as exc:
            raise BackendError(f"{where} closed the connection mid-request ({type(exc).__name__}); the "
                               "backend process probably stopped or crashed: check its log and restart it") from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise BackendError(f"{where} did not answer within {timeout or self.timeout:g} s") from None
            if isinstance(reason, (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)):
                raise BackendError(f"{where} closed the connection mid-request ({type(reason).__name__}); the "
                                   "backend process probably stopped or crashed: check its log and restart it") from None
            raise BackendError(f"cannot reach {where} ({reason}); is `refound serve` running and is the "
                               "URL the one it printed?") from None
        except OSError as exc:
            raise BackendError(f"{where}: connection failed ({exc}); the backend process probably stopped") from None

    def _json(self, method: str, path: str, body: dict = None, timeout: float = None) -> dict:
        data = None if body is None else json.dumps(body).encode("utf-8")
        _, ctype, raw = self._request(method, path, data, protocol.JSON_CONTENT_TYPE, timeout)
        return _decode_json(raw)

    # ---------------------------------------------------------------- endpoints
    def health(self) -> dict:
        """``{"status": "ok", ...}``; raises BackendError when the backend is not usable."""
        return self._json("GET", "/health", timeout=min(self.timeout, 10.0))

    def info(self) -> dict:
        """Model, task heads, device, precision and versions of the backend."""
        return self._json("GET", "/info", timeout=min(self.timeout, 30.0))

    def cancel(self) -> dict:
        """Cancel the running request(s); they stop within one batch and answer 409."""
        return self._json("POST", "/cancel", {}, timeout=min(self.timeout, 10.0))

    def predict(self, samples, task: Optional[str] = None, frame: bool = True) -> list:
        """Predictions for a list of RegionSample-like objects (or dicts).

        Returns one dict per sample, in order: ``cell_id``, ``value`` (None when not predicted),
        ``sufficient``, ``poi_count``, ``image_coverage``.
        """
        body, ctype = protocol.encode_samples(samples, task=task, frame=frame)
        _, _, raw = self._request("POST", "/predict", body, ctype)
        return _decode_json(raw)["results"]

    def embed(self, samples, which=protocol.EMBEDDING_NAMES, frame: bool = True) -> list:
        """Region representations (paper 4.3): one dict per sample with ``cell_id``,
        ``sufficient``, ``poi_count``, ``image_coverage`` and the requested vectors (``h_P``,
        ``h_S``, ``fused``) as lists of floats (NaN where the cell was not encoded)."""
        body, ctype = protocol.encode_samples(samples, frame=frame, extras={"return": list(which)})
        _, rtype, raw = self._request("POST", "/embed", body, ctype)
        return decode_embed_response(raw, rtype)


def decode_embed_response(raw: bytes, content_type: str) -> list:
    """Per-sample dicts from an /embed response (frame or JSON+base64)."""
    try:
        header, payload = protocol.decode_body(raw, content_type)
    except protocol.ProtocolError as exc:
        raise BackendError(f"malformed /embed response: {exc}") from None
    results = header["results"]
    for name, ref in header.get("arrays", {}).items():
        arr = protocol.read_array(ref, payload, f"response {name}", dtype="float32", ndim=2)
        flat, width = arr.to_list(), arr.shape[1]
        for i, r in enumerate(results):
            r[name] = flat[i * width:(i + 1) * width]
    return results


def _decode_json(raw: bytes) -> dict:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BackendError(f"backend answered something that is not JSON: {raw[:200]!r}") from None


def _error_message(raw: bytes) -> str:
    try:
        obj = json.loads(raw.decode("utf-8"))
        err = obj.get("error", {})
        return err.get("message", "") if isinstance(err, dict) else str(err)
    except Exception:  # noqa: BLE001 - any undecodable body: fall back to the HTTP reason
        return raw[:200].decode("utf-8", "replace")
