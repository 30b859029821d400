"""A tiny HTTP file server with Range support, for /vsicurl/ tests.

Hand-written because ``python -m http.server`` ignores ``Range`` headers (it always sends the
whole file), and GDAL's /vsicurl/ needs 206 partial responses to read a COG as windows.
"""
from __future__ import annotations

import contextlib
import http.server
import re
import threading
from pathlib import Path


def _handler(root: Path, log: list):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _file(self):
            p = (root / self.path.lstrip("/").split("?")[0]).resolve()
            return p if p.is_file() and root in p.parents else None

        def do_HEAD(self):  # noqa: N802 - http.server's naming
            p = self._file()
            if p is None:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(p.stat().st_size))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            log.append((self.path, 200))

        def do_GET(self):  # noqa: N802
            p = self._file()
            if p is None:
                self.send_response(404)
                self.end_headers()
                log.append((self.path, 404))
                return
            data = p.read_bytes()
            m = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if m:
                start = int(m.group(1))
                end = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
                body = data[start:end + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            else:
                body = data
                self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            self.wfile.write(body)
            log.append((self.path, 206 if m else 200))

    return Handler


@contextlib.contextmanager
def serve(root):
    """``(port, log)`` of a server for ``root`` on 127.0.0.1, for the ``with`` block's duration."""
    log: list = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(Path(root).resolve(), log))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server.server_address[1], log
    finally:
        server.shutdown()
        server.server_close()
