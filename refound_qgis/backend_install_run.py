"""Carry out the backend set-up plan (:mod:`refound_qgis.backend_install`): run each step, parse
pip's output into progress, keep a log, cancel (kills pip), name the failure and what to do.

No Qt here: :mod:`refound_qgis.setup_task` calls :func:`install` from a QgsTask; tests call it
directly. A re-run repairs: a venv whose interpreter is missing or does not start is recreated, a
working one is kept and every pip step runs again (pip skips what is already right).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess  # nosec B404 - runs pip / venv / the backend's python with argument lists
import threading
import time
from typing import Callable, Optional

from . import backend_install as bi
from .backend_install import InstallOptions, translate

# (kind, markers in pip's output, what to tell the user); the first kind whose marker appears wins.
FAILURES = (
    ("disk", ("No space left on device", "[Errno 28]", "Disk quota exceeded"),
     "The disk is full: free some space (the set-up needs about {gib:g} GiB) or choose another folder, then run the set-up again."),
    ("permission", ("[Errno 13]", "Permission denied"),
     "No permission to write to {venv}: choose a folder you own, then run the set-up again."),
    ("network", ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
                 "Name or service not known", "ConnectTimeoutError", "Read timed out", "ProxyError", "SSLError",
                 "Could not fetch URL", "Network is unreachable", "Connection refused", "getaddrinfo failed"),
     ("The package index could not be reached (network, proxy or firewall). Check the connection (a proxy goes into "
      "pip's configuration), or use the offline option with a wheelhouse folder, then run the set-up again.")),
    ("not-found", ("No matching distribution found", "Could not find a version that satisfies"),
     ("pip found no matching package ({what}). With a wheelhouse, add the missing wheels to it (`pip download` on "
      "a machine with network, same Python version and platform); else check the Python version ({py}).")),
    ("hash", ("THESE PACKAGES DO NOT MATCH THE HASHES",), "A downloaded file was corrupted: run the set-up again."),
)


def classify_failure(output: str, rc: int, context: Optional[dict] = None) -> tuple:
    """``(kind, message)`` for a failed step from its output and return code."""
    ctx = {"gib": 6, "venv": "", "py": "", "what": ""}
    ctx.update(context or {})
    m = re.search(r"No matching distribution found for (\S+)", output or "")
    ctx["what"] = m.group(1) if m else ctx["what"] or translate("see the log")
    for kind, markers, msg in FAILURES:
        if any(mark in (output or "") for mark in markers):
            return kind, translate(msg).format(**ctx)
    tail = [ln for ln in (output or "").strip().splitlines() if ln.strip()][-1:] or [""]
    return "failed", translate("The step failed (exit {rc}): {last}").format(rc=rc, last=tail[0][-300:])


class PipProgress:
    """Progress within one pip step from its output lines: 'Collecting X', 'Downloading X (n MB)',
    'Requirement already satisfied', 'Installing collected packages', 'Successfully installed'."""

    def __init__(self, expected: int):
        self.expected = max(int(expected), 1)
        self.seen = 0
        self.fraction = 0.0
        self.text = ""

    def feed(self, line: str) -> bool:
        """True when the progress or the text changed."""
        line = line.strip()
        m = re.match(r"(Collecting|Requirement already satisfied:|Processing|Downloading|Looking in|Installing collected packages:"
                     r"|Successfully installed|Building wheel for|Using cached)\s*(.*)", line)
        if not m:
            return False
        what, rest = m.group(1), m.group(2)
        if what in ("Collecting", "Requirement already satisfied:", "Processing"):
            self.seen += 1
            # dependencies pip discovers are not known in advance: approach 80 % asymptotically
            self.fraction = max(self.fraction, 0.8 * min(1.0, self.seen / (self.expected * 1.5)))
            self.text = translate("Checking {what}").format(what=rest.split(" ")[0])
        elif what in ("Downloading", "Using cached"):
            self.text = translate("Downloading {what}").format(what=rest[:80])
        elif what == "Installing collected packages:":
            self.fraction = max(self.fraction, 0.85)
            self.text = translate("Installing {n} packages").format(n=len(rest.split(",")))
        elif what == "Successfully installed":
            self.fraction, self.text = 1.0, translate("Installed")
        else:
            self.text = line[:80]
        return True


def run_command(argv: list, log, on_line: Callable[[str], None], is_canceled: Callable[[], bool],
                env: Optional[dict] = None, cwd: Optional[str] = None) -> tuple:
    """Run ``argv``, log and report each output line; ``(rc, output)``. A cancel kills the process
    (and pip's children: its own process group) and gives rc ``None``."""
    log.write("$ " + " ".join(argv) + "\n")
    log.flush()
    kw = {"start_new_session": True} if os.name != "nt" else {}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                            errors="replace", **kw)  # nosec B603 - argument list, no shell
    lines: list = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            log.write(line)
            log.flush()
            on_line(line)

    reader = threading.Thread(target=read, name="refound-setup-output", daemon=True)
    reader.start()
    canceled = False
    while proc.poll() is None:
        if is_canceled():
            canceled = True
            _kill(proc)
            break
        time.sleep(0.1)
    proc.wait()
    reader.join(timeout=5)
    proc.stdout.close()
    if canceled:
        log.write("[canceled: process killed]\n")
        return None, "".join(lines)
    return proc.returncode, "".join(lines)


def _kill(proc) -> None:
    try:
        if os.name != "nt":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (OSError, ProcessLookupError):
        pass


def venv_health(venv_dir: str, env: Optional[dict] = None) -> tuple:
    """``("missing" | "broken" | "incomplete" | "ok", why)``."""
    if not os.path.exists(venv_dir):
        return "missing", ""
    py = bi.venv_python(venv_dir)
    if not os.path.isfile(os.path.join(venv_dir, "pyvenv.cfg")):
        return "broken", translate("no pyvenv.cfg")
    if not os.path.isfile(py):
        return "broken", translate("{py} is missing").format(py=py)
    try:
        res = subprocess.run([py, "-c", "import pip, sys; print(sys.version)"], capture_output=True, text=True,
                             timeout=120, env=env or bi.clean_env(), cwd=venv_dir)  # nosec B603
    except (OSError, subprocess.SubprocessError) as exc:
        return "broken", translate("{py} does not start: {e}").format(py=py, e=exc)
    if res.returncode != 0:
        return "broken", translate("{py} does not start or has no pip: {e}").format(py=py, e=res.stderr.strip()[-300:])
    if not os.path.isfile(os.path.join(venv_dir, bi.MARKER)):
        return "incomplete", translate("an earlier set-up did not finish")
    return "ok", ""


def remove_venv(venv_dir: str) -> None:
    """Delete a broken venv, only when it is one (pyvenv.cfg or our marker) or the folder is empty."""
    is_venv = any(os.path.exists(os.path.join(venv_dir, n)) for n in ("pyvenv.cfg", bi.MARKER, "bin", "Scripts"))
    if os.listdir(venv_dir) and not is_venv:
        raise ValueError(translate("{d} exists and is not a Python environment; choose another folder.").format(d=venv_dir))
    shutil.rmtree(venv_dir)


def _result(ok, kind, message, log_path, info, **kw) -> dict:
    out = {"ok": ok, "kind": kind, "message": message, "log": log_path, "python": info.get("python", ""),
           "torch_build": info.get("torch_build", ""), "note": info.get("note", "")}
    out.update(kw)
    return out


def install(opts: InstallOptions, report: Callable[[float, str], None] = lambda f, t: None,
            is_canceled: Callable[[], bool] = lambda: False, gpu: Optional[dict] = None) -> dict:
    """Set up or repair the venv; ``{"ok", "kind", "message", "log", "python", "doctor", ...}``.
    Never raises for a failed install: the message says what went wrong and what to do."""
    venv = os.path.abspath(opts.venv_dir)
    opts.venv_dir = venv
    log_path = opts.log_path or os.path.join(os.path.dirname(venv), "backend-setup.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    os.makedirs(os.path.dirname(venv), exist_ok=True)  # the steps run there (never in QGIS's cwd)
    info: dict = {}
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n===== ReFound backend set-up {time.strftime('%Y-%m-%d %H:%M:%S')} -> {venv}\n")
        try:
            steps, info = bi.plan(opts, gpu)
        except ValueError as exc:
            log.write(f"[refused] {exc}\n")
            return _result(False, "input", str(exc), log_path, info)
        log.write(json.dumps({k: v for k, v in info.items() if k != "gpu"}, default=str) + "\n")
        log.write(f"GPU: {info['gpu']}\nDecision: {info['note']}\n")
        env = bi.clean_env(opts.extra_env)
        state, why = venv_health(venv, env)
        log.write(f"venv state: {state} {why}\n")
        if state == "broken":
            report(0.0, translate("Repairing: {why}; recreating the environment").format(why=why))
            try:
                remove_venv(venv)
            except (OSError, ValueError) as exc:
                return _result(False, "input", str(exc), log_path, info)
        reuse = state in ("ok", "incomplete")
        free = bi.free_gib(venv)
        if free < info["needed_gib"]:
            msg = translate("Not enough free disk space at {d}: {free:.1f} GiB free, about {need:g} GiB needed. Free "
                            "some space or choose another folder.").format(d=venv, free=free, need=info["needed_gib"])
            log.write(msg + "\n")
            return _result(False, "disk", msg, log_path, info)
        done, doctor = 0.0, None
        for step in steps:
            if step.key == "venv" and reuse:
                done += step.weight
                if opts.reuse_python:
                    _write_reuse_pth(venv, opts.reuse_python, env, log)
                continue
            report(done, step.label)
            prog = PipProgress(step.requirements)

            def on_line(line, step=step, prog=prog, start=done):
                if step.argv[1:4] == ["-m", "pip", "install"] and prog.feed(line):
                    report(start + step.weight * prog.fraction, f"{step.label}: {prog.text}")

            log.write(f"--- {step.label}\n")
            try:
                rc, out = run_command(step.argv, log, on_line, is_canceled, env=env, cwd=os.path.dirname(venv))
            except OSError as exc:
                rc, out = 1, f"{type(exc).__name__}: {exc}"
                log.write(out + "\n")
            if rc is None:
                return _result(False, "canceled", translate("Set-up canceled; run it again to finish (the environment "
                                                            "is repaired then)."), log_path, info)
            if rc != 0:
                kind, msg = classify_failure(out, rc, {"gib": info["needed_gib"], "venv": venv,
                                                       "py": info["base_python"]})
                msg = translate("{label} failed: {msg} Log: {log}").format(label=step.label, msg=msg, log=log_path)
                log.write(f"[failed: {kind}] {msg}\n")
                return _result(False, kind, msg, log_path, info, step=step.key)
            if step.key == "venv" and opts.reuse_python:
                _write_reuse_pth(venv, opts.reuse_python, env, log)
            if step.key == "doctor":
                doctor = _parse_doctor(out)
            done += step.weight
        marker = {"refound": info["refound"], "torch_build": info["torch_build"], "wheelhouse": opts.wheelhouse,
                  "reuse_python": opts.reuse_python, "installed": time.strftime("%Y-%m-%dT%H:%M:%S")}
        tmp = os.path.join(venv, bi.MARKER + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(marker, fh, indent=2)
        os.replace(tmp, os.path.join(venv, bi.MARKER))
        report(1.0, translate("Backend ready"))
        summary = doctor_summary(doctor)
        log.write("[done] " + summary + "\n")
        return _result(True, "ok", translate("The model backend is ready: {s}").format(s=summary), log_path, info,
                       doctor=doctor, repaired=state != "missing")


def _write_reuse_pth(venv: str, python: str, env: dict, log) -> None:
    """Make ``python``'s packages visible in the new venv (after its own: its site-packages first)."""
    dirs = bi.site_dirs_of(python)
    py = bi.venv_python(venv)
    code = "import site, sys; print(site.getsitepackages()[0])"
    site_dir = subprocess.run([py, "-c", code], capture_output=True, text=True, env=env, timeout=60,
                              cwd=venv).stdout.strip()  # nosec B603 - the venv's interpreter
    with open(os.path.join(site_dir, bi.REUSE_PTH), "w", encoding="utf-8") as fh:
        fh.write("\n".join(dirs) + "\n")
    log.write(f"reusing the packages of {python}: {dirs}\n")


def _parse_doctor(out: str) -> Optional[dict]:
    start = out.find("{")
    try:
        return json.loads(out[start:]) if start >= 0 else None
    except ValueError:
        return None


def doctor_summary(doctor: Optional[dict]) -> str:
    if not doctor:
        return translate("refound doctor gave no report (see the log)")
    pk = doctor.get("packages") or {}
    dev = (doctor.get("device") or {}).get("summary", "")
    return f"refound {doctor.get('refound')}, torch {pk.get('torch')}; {dev}"
