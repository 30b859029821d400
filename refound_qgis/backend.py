"""Where the model runs, decided at run time (never at import: the plugin loads without torch).

* ``inprocess``: torch imports in QGIS's own Python -> ``refound_core``'s analysis function runs
  right here (simplest; what the tests use).
* ``local``: a backend process ``<venv>/bin/python -m training.cli serve ...`` started from the
  Python environment the user configured (never ``sys.executable``: inside the QGIS GUI that is
  not QGIS's interpreter, SETUP-NOTES pitfall 7), talked to over loopback with a per-process token.
* ``remote``: an already running ``refound serve`` at a URL, with its token.
* ``auto``: ``inprocess`` when torch imports, else ``local`` when an environment is configured,
  else an actionable error.

The HTTP side is ``refound_core.backend.remote.RemotePredictor`` (over the stdlib-only client): the
same predictor protocol as the in-process model, so ``run_analysis`` drives either; no torch in QGIS.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

from refound_core.errors import InputError

from .settings import tr

_TORCH_STATE: dict = {}


def torch_in_qgis() -> tuple:
    """``(True, version)`` when torch imports in this Python, else ``(False, reason)`` (cached)."""
    if "ok" not in _TORCH_STATE:
        try:
            import importlib
            import importlib.util
            import sys

            # torch -> torch._dynamo imports Triton, whose bundled LLVM segfaults next to the
            # libLLVM that Mesa's OpenGL driver has already loaded in the QGIS desktop (not in
            # qgis_process or offscreen). Triton only serves torch.compile, which inference
            # never uses, so it is hidden from this process.
            if "triton" not in sys.modules:
                sys.modules["triton"] = None
            torch = importlib.import_module("torch")
            # The plugin zip ships a cut-down refound_core without the model code; when it is the
            # copy on sys.path, importing the predictor would fail mid-run (ModuleNotFoundError):
            # then in-process inference is "not usable here" and auto picks the local backend.
            if any(importlib.util.find_spec(m) is None for m in ("refound_core.inference.predictor",
                                                                   "refound_core.inference.pipeline")):
                raise ImportError("this refound_core (the plugin's bundled copy) has no model code; use the "
                                  "local backend with an environment where refound is installed")
            _TORCH_STATE.update(ok=True, detail=str(getattr(torch, "__version__", "?")))
        except Exception as exc:  # noqa: BLE001 - any failure means "not usable here"
            _TORCH_STATE.update(ok=False, detail=f"{type(exc).__name__}: {exc}")
    return _TORCH_STATE["ok"], _TORCH_STATE["detail"]


def python_of_environment(path: str) -> str:
    """The interpreter of a configured environment: a venv/conda folder or a python executable."""
    path = (path or "").strip()
    if not path:
        raise InputError(tr("No backend Python environment is configured; in the ReFound panel pick the venv "
                            "folder where PyTorch and refound are installed (docs/PLUGIN.md), or choose "
                            "'Running server' with its URL and token."))
    if os.path.isdir(path):
        for rel in (("bin", "python"), ("bin", "python3"), ("Scripts", "python.exe"), ("python.exe",)):
            cand = os.path.join(path, *rel)
            if os.path.isfile(cand):
                return cand
        raise InputError(tr("The folder {path} holds no Python interpreter (bin/python or Scripts/python.exe); "
                            "pick the environment's root folder.").format(path=path))
    if os.path.isfile(path) and os.access(path, os.X_OK):
        return path
    raise InputError(tr("The backend Python {path} does not exist or is not executable.").format(path=path))


# ------------------------------------------------------------------------------------ local backend
class LocalBackend:
    """One ``refound serve`` process on 127.0.0.1, owned by this plugin (docs/BACKEND.md).

    Started with the configured interpreter; its ``REFOUND_BACKEND_READY {json}`` line gives the
    URL and the per-process token (which serve also writes to a 0600 file in a private folder:
    the token never appears on a command line). Stopped by :func:`stop_local_backends` (plugin
    unload) or when it dies.
    """

    READY = "REFOUND_BACKEND_READY "

    def __init__(self, python: str, checkpoint: str, device: str = "auto", batch_size: int = 0,
                 startup_timeout: float = 180.0):
        self.python = python
        self.checkpoint = checkpoint
        self.device = device
        self.batch_size = batch_size
        self.startup_timeout = startup_timeout
        self.token = ""
        self.url = ""
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = ""
        self.folder = ""
        self._log = None

    def command(self, token_file: str) -> list:
        cmd = [self.python, "-m", "training.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--checkpoint", os.path.abspath(self.checkpoint), "--device", self.device or "auto",
               "--token-file", token_file]
        if self.batch_size:
            cmd += ["--batch-size", str(int(self.batch_size))]
        return cmd

    def start(self) -> "LocalBackend":
        self.folder = tempfile.mkdtemp(prefix="refound-backend-")  # 0700
        token_file = os.path.join(self.folder, "token")
        self.log_path = os.path.join(self.folder, "backend.log")
        env = dict(os.environ)
        # QGIS's own Python paths must not leak into the backend's interpreter (another numpy...).
        for var in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"):
            env.pop(var, None)
        env["PYTHONUNBUFFERED"] = "1"
        log = self._log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        try:
            self.proc = subprocess.Popen(self.command(token_file), stdout=subprocess.PIPE, stderr=log, env=env,
                                         text=True, cwd=self.folder)
        except OSError as exc:
            log.close()  # else a ResourceWarning "unclosed file" lands in QGIS's log
            self._log = None
            raise InputError(tr("The backend could not be started with {py}: {err}").format(py=self.python, err=exc)) from None
        ready: dict = {}

        def read_stdout():
            for line in self.proc.stdout:
                if line.startswith(self.READY) and not ready:
                    try:
                        ready.update(json.loads(line[len(self.READY):]))
                    except ValueError:
                        ready["error"] = line
                secret = str(ready.get("token") or "")
                if secret:  # the log is for people: never the token
                    line = line.replace(secret, "<token>")
                if not log.closed:
                    log.write(line)
                    log.flush()

        threading.Thread(target=read_stdout, name="refound-backend-stdout", daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        while not ready:
            if self.proc.poll() is not None:
                raise InputError(tr("The backend stopped at start-up (exit {rc}); see {log}. Check that refound "
                                    "and PyTorch are installed in {py} (`{py} -m training.cli doctor`).")
                                 .format(rc=self.proc.returncode, log=self.log_path, py=self.python))
            if time.monotonic() > deadline:
                self.stop(keep_folder=True)
                raise InputError(tr("The backend did not start within {s:g} s; see {log}.")
                                 .format(s=self.startup_timeout, log=self.log_path))
            time.sleep(0.1)
        self.url = str(ready.get("url") or "")
        self.token = str(ready.get("token") or "")
        if not self.token and os.path.isfile(token_file):
            with open(token_file, encoding="utf-8") as fh:
                self.token = fh.read().strip()
        if not self.url.startswith("http://") or not self.token:
            self.stop(keep_folder=True)
            raise InputError(tr("The backend's ready line could not be read; see {log}.").format(log=self.log_path))
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, keep_folder: bool = False) -> None:
        """Stop the process; remove its folder (token file, log) unless ``keep_folder`` (a failed
        start, whose log the error message points to)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.folder and not keep_folder:  # token file and log: nothing of the run stays in /tmp
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = ""


_LOCAL: dict = {}
_LOCAL_LOCK = threading.Lock()


def local_backend(python: str, checkpoint: str, device: str, batch_size: int = 0) -> LocalBackend:
    """The running local backend for this (interpreter, checkpoint, device), started when needed."""
    key = (python, os.path.abspath(checkpoint), device)
    with _LOCAL_LOCK:
        be = _LOCAL.get(key)
        if be is not None and be.alive():
            return be
        for other in list(_LOCAL.values()):  # one model in memory at a time
            other.stop()
        _LOCAL.clear()
        be = LocalBackend(python, checkpoint, device, batch_size).start()
        _LOCAL[key] = be
        return be


def stop_local_backends() -> None:
    with _LOCAL_LOCK:
        for be in _LOCAL.values():
            be.stop()
        _LOCAL.clear()


# A headless run (qgis_process, a script) ends without unloading the plugin: the backends it
# started stop with the interpreter instead of living on as orphans (~1 GB each).
atexit.register(stop_local_backends)


def describe_choice(backend: str) -> str:
    ok, detail = torch_in_qgis()
    if backend == "auto":
        return tr("in QGIS (torch {v})").format(v=detail) if ok else tr("local backend process")
    return backend


def _remote(url: str, token: str, description: str, batch_size: int, embeddings: tuple):
    from refound_core.backend.remote import RemotePredictor

    model = RemotePredictor(url, token, batch_size=batch_size or 16, embeddings=embeddings, description=description)
    model.describe()  # health and /info now: an unusable backend is one clear message before any work
    return model


def resolve_backend(backend: str, backend_python: str = "", backend_url: str = "", backend_token: str = "",
                    checkpoint: str = "", device: str = "auto", batch_size: int = 0,
                    embeddings: tuple = ("fused",)):
    """``("inprocess", None)`` (the caller loads the core Predictor) or ``(kind, RemotePredictor)``
    for the configured choice: the backend's model behind the same predictor protocol. InputError
    when the choice cannot work here (with what to configure instead)."""
    backend = (backend or "auto").strip().lower()
    if backend not in ("auto", "inprocess", "local", "remote"):
        raise InputError(tr("Unknown backend '{b}'; choose auto, inprocess, local or remote.").format(b=backend))
    if backend == "remote":
        if not backend_url:
            raise InputError(tr("The running-server backend needs the URL printed by `refound serve`."))
        if not backend_token:
            raise InputError(tr("The running-server backend needs the token from the server's token file."))
        return "remote", _remote(backend_url, backend_token, tr("server at {url}").format(url=backend_url),
                                 batch_size, embeddings)
    ok, detail = torch_in_qgis()
    if backend == "inprocess" or (backend == "auto" and ok):
        if not ok:
            raise InputError(tr("PyTorch does not import in QGIS's Python ({why}); choose the local backend and "
                                "point it at a Python environment with PyTorch (docs/PLUGIN.md).").format(why=detail))
        return "inprocess", None
    if backend == "auto" and not backend_python:
        raise InputError(tr("PyTorch is not available in QGIS's Python ({why}) and no backend environment is "
                            "configured: pick the venv with PyTorch and refound in the ReFound panel "
                            "(Backend environment), or run `refound serve` and use 'Running server'.")
                         .format(why=detail))
    python = python_of_environment(backend_python)
    be = local_backend(python, checkpoint, device, batch_size)
    return "local", _remote(be.url, be.token, tr("local backend {py}").format(py=python), batch_size, embeddings)


def sys_python_note() -> str:
    """For diagnostics: the interpreter QGIS embeds vs sys.executable (pitfall 7)."""
    return json.dumps({"sys.executable": sys.executable, "sys.prefix": sys.prefix})
