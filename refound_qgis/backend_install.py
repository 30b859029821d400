"""The "Set up model backend" plan: which venv, which torch build, which pip commands (no Qt, no QGIS).

A venv in the QGIS profile folder (``<profile>/refound/backend-venv``) gets, in order: torch and
torchvision from the wheel index that matches the NVIDIA driver (``nvidia-smi`` -> CUDA version ->
``download.pytorch.org/whl/cuXXX``; the CPU index without a usable driver; PyPI on macOS), the
project's other pinned requirements (``requirements/pins.txt``; the zip carries a copy in
``backend/pins.txt``), then the ``refound`` package itself (from a wheelhouse or a source folder),
and finally ``refound doctor`` runs in it. :mod:`refound_qgis.backend_install_run` executes the
plan; :mod:`refound_qgis.setup_task` wraps it in a QgsTask. Everything here is plain Python so it is
tested without QGIS.

Offline: ``wheelhouse`` = a folder of wheels (``pip download`` / ``pip wheel`` on another machine);
every pip step then runs with ``--no-index --find-links DIR``. ``reuse_python``: the packages of
that interpreter are visible in the new venv (a ``.pth`` file listing its site-packages folders),
so pip finds torch & co. already satisfied and installs only what is missing (used by the tests
and for machines that already have a working torch; documented in docs/INSTALL.md).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess  # nosec B404 - runs nvidia-smi and the chosen interpreters with fixed arguments
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
TORCH_INDEX = "https://download.pytorch.org/whl/"
# CUDA builds download.pytorch.org publishes for the pinned torch (requirements/pins.txt), newest
# first: the newest one the driver supports is taken. Update together with the torch pin.
TORCH_CUDA_BUILDS = (((13, 0), "cu130"), ((12, 8), "cu128"), ((12, 6), "cu126"))
TORCH_PACKAGES = ("torch", "torchvision")
MARKER = "refound-backend.json"  # written into the venv when an install completed
REUSE_PTH = "refound-reuse-packages.pth"
# Rough free space an install needs (GiB): a CUDA torch with its nvidia-* wheels, a CPU torch,
# and a venv that reuses another interpreter's packages.
NEEDED_GIB = {"cuda": 8.0, "cpu": 3.0, "default": 6.0, "reuse": 0.5}

translate: Callable[[str], str] = lambda s: s  # the Qt side sets settings.tr  # noqa: E731


@dataclass
class Step:
    key: str          # venv | torch | pins | refound | check | doctor
    label: str
    argv: list
    weight: float     # share of the progress bar
    requirements: int = 0  # requirements named on the command line (progress within a pip step)


@dataclass
class InstallOptions:
    venv_dir: str
    base_python: str = ""       # interpreter the venv is made from (default: find_base_python())
    wheelhouse: str = ""        # offline: pip --no-index --find-links DIR
    refound_source: str = ""    # a source folder (setup.py) or a wheel; default: wheelhouse / checkout
    reuse_python: str = ""      # make that interpreter's packages visible in the venv (.pth)
    gpu: str = "auto"           # auto | cpu | cuXXX (a torch build tag)
    requirements: str = ""      # the pins file (default: pins_file())
    log_path: str = ""
    version: str = ""           # refound version wanted from a wheelhouse (default: metadata.txt)
    extra_env: dict = field(default_factory=dict)


def plugin_version() -> str:
    for cand in (os.path.join(HERE, "metadata.txt"), os.path.join(os.path.dirname(HERE), "metadata.txt")):
        if os.path.isfile(cand):
            with open(cand, encoding="utf-8") as fh:
                for line in fh:
                    if line.startswith("version="):
                        return line.split("=", 1)[1].strip()
    return ""


def pins_file() -> str:
    """The pinned requirements: the zip's ``backend/pins.txt`` or the working tree's."""
    for cand in (os.path.join(HERE, "backend", "pins.txt"), os.path.join(os.path.dirname(HERE), "requirements", "pins.txt")):
        if os.path.isfile(cand):
            return cand
    return ""


def source_checkout() -> str:
    """The repository this plugin folder sits in (a development checkout), or ''."""
    root = os.path.dirname(HERE)
    ok = all(os.path.exists(os.path.join(root, n)) for n in ("setup.py", "refound_core", "training"))
    return root if ok else ""


def read_pins(path: str) -> tuple:
    """``(torch requirements, other requirements)`` of a pins file (comments dropped)."""
    torch, other = [], []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            req = line.split("#", 1)[0].strip()
            if not req:
                continue
            name = re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower()
            (torch if name in TORCH_PACKAGES else other).append(req)
    return torch, other


# ------------------------------------------------------------------------------------ GPU
def parse_nvidia_smi(text: str) -> Optional[tuple]:
    """The CUDA version the driver supports, from ``nvidia-smi``'s banner ("CUDA Version: 12.4")."""
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def detect_gpu(runner=subprocess.run) -> dict:
    """``{"cuda": (12, 4) or None, "driver": "550.54", "gpus": [...], "detail": why}``."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {"cuda": None, "detail": translate("no NVIDIA driver found (nvidia-smi is not on PATH)")}
    try:
        banner = runner([exe], capture_output=True, text=True, timeout=30)  # nosec B603 - fixed argv
        query = runner([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                       capture_output=True, text=True, timeout=30)  # nosec B603 - fixed argv
    except (OSError, subprocess.SubprocessError) as exc:
        return {"cuda": None, "detail": translate("nvidia-smi failed: {e}").format(e=exc)}
    cuda = parse_nvidia_smi(banner.stdout)
    gpus = [ln.strip() for ln in (query.stdout or "").splitlines() if ln.strip()]
    driver = gpus[0].split(",")[1].strip() if gpus and "," in gpus[0] else ""
    if banner.returncode != 0 or cuda is None:
        return {"cuda": None, "gpus": gpus, "detail": translate("nvidia-smi gave no CUDA version: {out}")
                .format(out=(banner.stdout + banner.stderr).strip()[-300:])}
    return {"cuda": cuda, "driver": driver, "gpus": gpus, "detail": "CUDA {}.{}".format(*cuda)}


def torch_build(gpu: dict, choice: str = "auto", platform: str = sys.platform) -> tuple:
    """``(tag, index URL or '', note)``: tag ``cuXXX`` / ``cpu`` / ``default`` (PyPI's build)."""
    if choice not in ("", "auto"):
        return choice, "" if choice == "default" else TORCH_INDEX + choice, translate("chosen in the dialog")
    if platform == "darwin":  # PyPI's macOS wheels (Apple GPU through MPS); no CUDA builds exist
        return "default", "", translate("macOS: PyPI's torch (Apple GPU through MPS)")
    cuda = gpu.get("cuda")
    if cuda is None:
        return "cpu", TORCH_INDEX + "cpu", translate("CPU build: {why}").format(why=gpu.get("detail", ""))
    for need, tag in TORCH_CUDA_BUILDS:
        if tuple(cuda) >= need:
            return tag, TORCH_INDEX + tag, translate("driver supports CUDA {have}: torch build {tag}").format(
                have="{}.{}".format(*cuda), tag=tag)
    oldest = "{}.{}".format(*TORCH_CUDA_BUILDS[-1][0])
    return "cpu", TORCH_INDEX + "cpu", translate(
        "CPU build: the NVIDIA driver supports CUDA {have} only, the pinned torch needs {need} or newer "
        "(update the driver and run the set-up again to use the GPU)").format(have="{}.{}".format(*cuda), need=oldest)


# ------------------------------------------------------------------------------------ venv
def venv_python(venv_dir: str) -> str:
    if os.name == "nt":
        return os.path.join(venv_dir, "Scripts", "python.exe")
    return os.path.join(venv_dir, "bin", "python")


def clean_env(extra: Optional[dict] = None) -> dict:
    """The environment for the venv's processes: QGIS's Python paths must not leak in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def find_base_python(configured: str = "") -> str:
    """An interpreter that can make venvs (never ``sys.executable`` blindly: SETUP-NOTES pitfall 7)."""
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    cands = [configured] if configured else []
    base = sys.base_prefix
    cands += [os.path.join(base, "python.exe"), os.path.join(base, "python3.exe"),
              os.path.join(base, "bin", f"python{ver}"), os.path.join(base, "bin", "python3"),
              shutil.which(f"python{ver}") or "", shutil.which("python3") or ""]
    for cand in cands:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return ""


def site_dirs_of(python: str) -> list:
    """The site-packages / dist-packages folders of an interpreter (for ``reuse_python``)."""
    code = "import json, sys; print(json.dumps([p for p in sys.path if p.rstrip('/').endswith(('site-packages', 'dist-packages'))]))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, env=clean_env(),
                         cwd=os.path.expanduser("~"))  # nosec B603 - the user's chosen interpreter
    if out.returncode != 0:
        raise RuntimeError(translate("{py} did not run: {err}").format(py=python, err=out.stderr.strip()[-300:]))
    import json

    return [p for p in json.loads(out.stdout.strip().splitlines()[-1]) if os.path.isdir(p)]


def needed_gib(tag: str, opts: InstallOptions) -> float:
    return NEEDED_GIB["reuse"] if opts.reuse_python else NEEDED_GIB.get("cuda" if tag.startswith("cu") else tag, 6.0)


def free_gib(path: str) -> float:
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return shutil.disk_usage(p).free / 2 ** 30


# ------------------------------------------------------------------------------------ plan
def pip_argv(python: str, opts: InstallOptions, *args, index_url: str = "") -> list:
    argv = [python, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
    if opts.wheelhouse:
        argv += ["--no-index", "--find-links", os.path.abspath(opts.wheelhouse)]
    elif index_url:
        argv += ["--index-url", index_url]
    if opts.reuse_python and "--no-deps" not in args:
        # The venv's own pip/setuptools shadow the reused ones, so resolving the reused packages'
        # dependencies would fail: with reuse, pip checks the pinned packages themselves and the
        # reused interpreter answers for their dependencies (the check step imports them).
        argv.append("--no-deps")
    return argv + list(args)


def refound_requirement(opts: InstallOptions) -> str:
    """What pip installs as the refound package (a folder, a wheel, or ``refound==V`` from the wheelhouse)."""
    if opts.refound_source:
        if not os.path.exists(opts.refound_source):
            raise ValueError(translate("The refound source {p} does not exist.").format(p=opts.refound_source))
        return os.path.abspath(opts.refound_source)
    if opts.wheelhouse:
        version = opts.version or plugin_version()
        return f"refound=={version}" if version else "refound"
    checkout = source_checkout()
    if checkout:
        return checkout
    raise ValueError(translate(
        "No source for the refound package: pick a wheelhouse folder holding refound-{v}-py3-none-any.whl "
        "(built with `pip wheel --no-deps .` in the ReFound repository) or the repository folder itself "
        "(docs/INSTALL.md).").format(v=plugin_version() or "VERSION"))


def plan(opts: InstallOptions, gpu: Optional[dict] = None) -> tuple:
    """``(steps, info)``: the commands that set up (or repair) the venv, and what was decided."""
    pins = opts.requirements or pins_file()
    if not pins or not os.path.isfile(pins):
        raise ValueError(translate("The pinned requirements (requirements/pins.txt) are missing from this plugin "
                                   "build; reinstall the plugin."))
    torch_reqs, other_reqs = read_pins(pins)
    gpu = gpu if gpu is not None else detect_gpu()
    tag, index, note = torch_build(gpu, opts.gpu)
    base = find_base_python(opts.base_python)
    if not base:
        raise ValueError(translate("No Python interpreter to create the backend environment from was found; "
                                   "install Python 3.10+ and choose it as the base interpreter."))
    py = venv_python(opts.venv_dir)
    refound = refound_requirement(opts)
    steps = [
        Step("venv", translate("Creating the Python environment"), [base, "-m", "venv", opts.venv_dir], 0.05),
        Step("torch", translate("Installing PyTorch ({tag})").format(tag=tag),
             pip_argv(py, opts, *torch_reqs, index_url=index), 0.45, len(torch_reqs)),
        Step("pins", translate("Installing the pinned requirements"), pip_argv(py, opts, *other_reqs), 0.3,
             len(other_reqs)),
        # --force-reinstall: the venv gets exactly the plugin's refound (a repair replaces a broken one)
        Step("refound", translate("Installing the refound package"),
             pip_argv(py, opts, "--no-deps", "--force-reinstall", refound), 0.08, 1),
        Step("check", translate("Checking the environment"),
             [py, "-c", ("import refound_core, training.cli, torch; print('refound', refound_core.__version__, "
                         "'torch', torch.__version__)")], 0.02),
        Step("doctor", translate("Running refound doctor"), [py, "-m", "training.cli", "doctor", "--json"], 0.1),
    ]
    info = {"torch_build": tag, "torch_index": index, "gpu": gpu, "note": note, "base_python": base,
            "python": py, "refound": refound, "pins": pins, "wheelhouse": opts.wheelhouse,
            "reuse_python": opts.reuse_python, "needed_gib": needed_gib(tag, opts)}
    return steps, info
