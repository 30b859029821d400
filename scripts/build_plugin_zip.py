#!/usr/bin/env python3
"""Build the installable QGIS plugin zip: ``dist/refound_qgis-<version>.zip``.

Layout (one top folder, as QGIS's "Install from ZIP" and plugins.qgis.org expect)::

    refound_qgis/
      metadata.txt          the repository's top-level metadata.txt (single source of the version)
      icon.png              drawn with QPainter at build time (refound_qgis/icon.py; no blob in git)
      LICENSE               when the repository has one
      backend/pins.txt      requirements/pins.txt, for the "Set up model backend" installer
      *.py, processing/     the plugin
      styles/*.qml          the default styles of the prediction layers (refound_core.inference.styles)
      i18n/                 translation placeholder (Qt .qm files go here)
      ext/refound_core/     the pure-Python parts of refound_core the plugin imports (see below)
      checkpoints/demo/     only with --checkpoint: a small demo checkpoint the panel offers

``ext/refound_core`` holds every refound_core module the plugin imports (at any depth) whose
module-level imports are the standard library, numpy or other such modules, so the plugin imports
in a bare QGIS; the plugin uses it only when no installed ``refound_core`` is importable. Modules
that need torch at import time are left out: the model then runs in a backend environment.

The project's URLs and contact (homepage, repository, tracker, email) live in ONE place,
``project.ini``; the builder writes them into the zip's metadata.txt. While one of them is a
placeholder (an ``example.invalid`` address) or missing, the build fails with a message saying
what to set, unless ``--local`` is given (a zip for your own "Install from ZIP", not for upload).

The rules of the official plugin repository are checked on the finished zip (required metadata,
no compiled files or caches, one top folder, file modes 0644, size under 20 MB, a Bandit scan at
medium severity and up that finds nothing); any problem fails the build.

Usage: ``python scripts/build_plugin_zip.py [--local] [--project project.ini] [--out-dir dist]
[--stage DIR] [--checkpoint CKPT]``.
"""
from __future__ import annotations

import argparse
import ast
import configparser
import io
import os
import shutil
import subprocess  # nosec B404 - runs bandit with this interpreter, fixed arguments
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLUGIN = "refound_qgis"
REQUIRED_METADATA = ("name", "qgisMinimumVersion", "description", "about", "version", "author", "email",
                     "repository", "tracker", "homepage")
PROJECT_KEYS = ("homepage", "repository", "tracker", "email")  # filled in from project.ini
# An address that cannot be real: RFC 2606 reserved names, or an unedited template.
PLACEHOLDER_MARKS = (".invalid", "example.com", "example.org", "example.net", "//example.", "todo", "changeme")
MAX_ZIP_BYTES = 20 * 1024 * 1024
FORBIDDEN_SUFFIXES = (".pyc", ".pyo", ".so", ".pyd", ".dll", ".dylib", ".exe")
FORBIDDEN_PARTS = ("__pycache__", ".git", ".pytest_cache", ".DS_Store")
# Third-party modules a shipped refound_core module may import at module level: numpy comes with
# QGIS (GDAL's Python bindings need it); everything else must be imported lazily.
LIGHT_THIRD_PARTY = {"numpy"}


# ------------------------------------------------------------------------------------ metadata
def read_metadata(path: Path = REPO / "metadata.txt") -> dict:
    cp = configparser.ConfigParser(interpolation=None)
    cp.optionxform = str  # keys are case-sensitive (qgisMinimumVersion)
    cp.read_string(path.read_text(encoding="utf-8"))
    if "general" not in cp:
        raise SystemExit(f"{path}: no [general] section")
    return dict(cp["general"])


def read_project(path: Path = REPO / "project.ini") -> dict:
    """The project's URLs and contact from ``project.ini`` (``[project]`` section)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path} is missing: it holds the plugin's homepage, repository, tracker and email")
    cp = configparser.ConfigParser(interpolation=None)
    cp.read_string(path.read_text(encoding="utf-8"))
    if "project" not in cp:
        raise SystemExit(f"{path}: no [project] section")
    return {k: cp["project"].get(k, "").strip() for k in PROJECT_KEYS}


def is_placeholder(value: str) -> bool:
    return not value.strip() or any(m in value.lower() for m in PLACEHOLDER_MARKS)


def placeholder_problems(meta: dict) -> list:
    return [f"metadata {k}={meta.get(k, '')!r} is a placeholder: set the real value in project.ini "
            "(or build with --local for a zip you install yourself)"
            for k in PROJECT_KEYS if is_placeholder(meta.get(k, ""))]


def metadata_text(repo: Path = REPO, project: Path | None = None) -> str:
    """metadata.txt as shipped: the repository's file plus the project.ini values."""
    text = (repo / "metadata.txt").read_text(encoding="utf-8").rstrip("\n") + "\n"
    values = read_project(project or repo / "project.ini")
    return text + "".join(f"{k}={values[k]}\n" for k in PROJECT_KEYS)


# ------------------------------------------------------------------------------------ core subset
def _module_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _imports(file: Path, package: str, top_level_only: bool) -> set:
    """Absolute names of the modules ``file`` imports (relative imports resolved)."""
    tree = ast.parse(file.read_text(encoding="utf-8"), str(file))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # module level includes try/if blocks, not function bodies
        stack, nodes = list(tree.body), []
        while stack:
            n = stack.pop()
            nodes.append(n)
            if isinstance(n, (ast.If, ast.Try, ast.With)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(n, field, []) or []:
                        stack.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])
    out = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            out.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - n.level + 1])
                mod = f"{base}.{n.module}" if n.module else base
            else:
                mod = n.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in n.names)  # "from pkg import module"
    return out


def _package_of(module: str, file: Path) -> str:
    return module if file.name == "__init__.py" else module.rpartition(".")[0]


def _module_name(f: Path, repo: Path) -> str:
    rel = f.relative_to(repo).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def _core_imports(module: str, repo: Path, top_level_only: bool) -> tuple:
    """``(refound_core modules, other top-level package names)`` imported by ``module``."""
    f = _module_file(module, repo)
    core, other = set(), set()
    for name in _imports(f, _package_of(module, f), top_level_only):
        top = name.split(".")[0]
        if top == "refound_core":
            if _module_file(name, repo):
                core.add(name)
        elif top not in sys.stdlib_module_names and top != "__future__":
            other.add(top)
    return core, other


def core_modules_needed(repo: Path = REPO) -> list:
    """refound_core modules to ship in ``ext/``.

    * everything the plugin imports at module level, with their module-level dependencies (the
      plugin must import in a bare QGIS; a test imports it with torch, pyproj... blocked);
    * modules the plugin imports lazily that need nothing beyond the standard library and numpy
      anywhere (the backend client and protocol). Modules that need torch when called (the
      predictor, the pipeline) are not shipped: in-process inference needs the installed package.
    """
    eager, lazy = set(), set()
    for f in (repo / PLUGIN).rglob("*.py"):
        mod = _module_name(f, repo)
        pkg = _package_of(mod, f)
        top = {n for n in _imports(f, pkg, True) if n.split(".")[0] == "refound_core" and _module_file(n, repo)}
        anywhere = {n for n in _imports(f, pkg, False) if n.split(".")[0] == "refound_core" and _module_file(n, repo)}
        eager |= top
        lazy |= anywhere - top
    memo: dict = {}

    def fully_light(module: str, seen=frozenset()) -> bool:
        if module not in memo:
            core, other = _core_imports(module, repo, top_level_only=False)
            memo[module] = not (other - LIGHT_THIRD_PARTY) and all(
                fully_light(c, seen | {module}) for c in core if c not in seen and c != module)
        return memo[module]

    roots = eager | {m for m in lazy if fully_light(m)}
    ship, todo = set(), sorted(roots)
    while todo:
        cur = todo.pop()
        if cur in ship:
            continue
        ship.add(cur)
        parts = cur.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # the packages' __init__
        todo.extend(_core_imports(cur, repo, top_level_only=True)[0])
    return sorted(ship)


# ------------------------------------------------------------------------------------ staging
def draw_icon_png(dest: Path) -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    sys.path.insert(0, str(REPO))
    from qgis.PyQt.QtGui import QGuiApplication

    from refound_qgis.icon import draw_icon

    app = QGuiApplication.instance() or QGuiApplication(["build_plugin_zip"])  # noqa: F841 - keep alive
    if not draw_icon(64).save(str(dest), "PNG"):
        raise SystemExit(f"could not write {dest}")


def write_styles(folder: Path) -> None:
    sys.path.insert(0, str(REPO))
    from refound_core.inference import styles

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "urban_village.qml").write_text(styles.qml_for_task("urban_village"), encoding="utf-8")
    # Regression styles get their class breaks from the data; these are templates over 0..100.
    for task in ("population", "commercial"):
        (folder / f"{task}.qml").write_text(styles.qml_for_task(task, [float(v) for v in range(101)]),
                                            encoding="utf-8")


def _copy_tree_py(src: Path, dst: Path) -> None:
    for f in sorted(src.rglob("*")):
        if f.is_dir() or any(p in FORBIDDEN_PARTS for p in f.parts) or f.suffix in FORBIDDEN_SUFFIXES:
            continue
        if f.suffix not in (".py", ".qml", ".txt", ".md", ".json", ".ts"):
            continue
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)


def stage(dest: Path, repo: Path = REPO, checkpoint: Path | None = None, project: Path | None = None) -> Path:
    """Write the plugin folder ``dest/refound_qgis`` (usable as QGIS_PLUGINPATH=dest).

    ``checkpoint``: a checkpoint folder (or a folder of per-task checkpoints) to bundle as the
    demo checkpoint (``checkpoints/demo``, what the panel offers by default); keep it small.
    """
    root = Path(dest) / PLUGIN
    if root.exists():
        shutil.rmtree(root)
    _copy_tree_py(repo / PLUGIN, root)
    (root / "metadata.txt").write_text(metadata_text(repo, project), encoding="utf-8")
    for name in ("LICENSE", "LICENSE.txt", "LICENSE.md"):
        if (repo / name).is_file():
            shutil.copy2(repo / name, root / name)
    (root / "backend").mkdir(exist_ok=True)  # what "Set up model backend" installs (refound_qgis/backend_install.py)
    shutil.copy2(repo / "requirements" / "pins.txt", root / "backend" / "pins.txt")
    draw_icon_png(root / read_metadata(repo / "metadata.txt").get("icon", "icon.png"))
    write_styles(root / "styles")
    i18n = root / "i18n"
    i18n.mkdir(exist_ok=True)
    (i18n / "README.txt").write_text(
        "Translations of the ReFound plugin: Qt .qm files named refound_<locale>.qm (e.g. refound_de.qm),\n"
        "context 'ReFound'. Create them with pylupdate5 / lrelease from the plugin's tr() strings;\n"
        "the plugin loads the one matching QGIS's locale at start-up.\n", encoding="utf-8")
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        has_config = (checkpoint / "config.json").is_file() or any(checkpoint.glob("*/config.json"))
        if not has_config:
            raise SystemExit(f"{checkpoint} is not a checkpoint folder (no config.json in it or its subfolders)")
        shutil.copytree(checkpoint, root / "checkpoints" / "demo",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    for module in core_modules_needed(repo):
        src = _module_file(module, repo)
        target = root / "ext" / src.relative_to(repo)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return root


# ------------------------------------------------------------------------------------ checks
def bandit_problems(folder: Path) -> list:
    """Bandit findings of medium severity and up in ``folder`` (the repository scans uploads)."""
    cmd = [sys.executable, "-m", "bandit", "-q", "-ll", "-r", str(folder), "-f", "custom",
           "--msg-template", "{relpath}:{line} {test_id} {severity} {msg}"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # nosec B603 - fixed argv
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"bandit could not run ({exc}): install requirements/dev.txt (`make setup`)"]
    if "No module named bandit" in res.stderr:
        return ["bandit is not installed: install requirements/dev.txt (`make setup`)"]
    if res.returncode not in (0, 1):
        return [f"bandit failed: {res.stderr.strip()[-500:]}"]
    found = [line for line in res.stdout.splitlines() if line.strip()]
    return [f"bandit: {line}" for line in found] or (["bandit reported issues"] if res.returncode else [])


def check_zip(path: Path, name: str = "", allow_placeholders: bool = False, scan: bool = True) -> list:
    """Problems with a plugin zip by the official repository's rules ([] = fine).

    ``name``: the file name the zip will have (default: its own). ``allow_placeholders``: accept
    example.invalid URLs (a --local zip). ``scan``: run Bandit over the unpacked zip.
    """
    problems = []
    name = name or Path(path).name
    size = path.stat().st_size
    if size >= MAX_ZIP_BYTES:
        problems.append(f"zip is {size / 2**20:.1f} MiB; plugins.qgis.org accepts less than 20 MiB")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        tops = {n.split("/")[0] for n in names}
        if tops != {PLUGIN}:
            problems.append(f"the zip must hold exactly one top folder {PLUGIN!r}, found {sorted(tops)}")
        for n in names:
            parts = n.split("/")
            if any(p in FORBIDDEN_PARTS for p in parts) or n.endswith(FORBIDDEN_SUFFIXES):
                problems.append(f"forbidden file in the zip: {n} (no compiled code, caches or VCS files)")
            info = zf.getinfo(n)
            mode = info.external_attr >> 16
            if mode & 0o170000 == 0o120000:
                problems.append(f"symbolic link in the zip: {n}")
            elif not n.endswith("/") and mode & 0o7777 != 0o644:
                problems.append(f"file mode {mode & 0o7777:o} of {n}: plugin files must be 0644 (no executables)")
        if f"{PLUGIN}/__init__.py" not in names:
            problems.append(f"{PLUGIN}/__init__.py is missing")
        if f"{PLUGIN}/metadata.txt" not in names:
            problems.append(f"{PLUGIN}/metadata.txt is missing")
            return problems
        cp = configparser.ConfigParser(interpolation=None)
        cp.optionxform = str
        cp.read_string(zf.read(f"{PLUGIN}/metadata.txt").decode("utf-8"))
        meta = dict(cp["general"]) if "general" in cp else {}
        for key in REQUIRED_METADATA:
            if not meta.get(key, "").strip():
                problems.append(f"metadata.txt lacks the required key {key!r}")
        icon = meta.get("icon", "")
        if icon and f"{PLUGIN}/{icon}" not in names:
            problems.append(f"metadata.txt names icon {icon!r} but the zip has no {PLUGIN}/{icon}")
        version = meta.get("version", "")
        if version and not name.endswith(f"-{version}.zip"):
            problems.append(f"zip name {name} does not carry the metadata version {version}")
        try:
            major = int(meta.get("qgisMinimumVersion", "0").split(".")[0])
        except ValueError:
            major = 0
        if major < 3:
            problems.append("qgisMinimumVersion must be 3.x")
        if meta.get("hasProcessingProvider", "").lower() not in ("yes", "true"):
            problems.append("metadata.txt must say hasProcessingProvider=yes (the plugin has a provider)")
        if not allow_placeholders:
            problems.extend(placeholder_problems(meta))
        if scan and not problems:
            with tempfile.TemporaryDirectory(prefix="refound-scan-") as tmp:
                zf.extractall(tmp)  # nosec B202 - our own freshly built zip, names checked above
                problems.extend(bandit_problems(Path(tmp) / PLUGIN))
    return problems


def build(out_dir: Path = REPO / "dist", repo: Path = REPO, checkpoint: Path | None = None,
          local: bool = False, project: Path | None = None) -> Path:
    """Build and validate the zip. ``local``: allow placeholder URLs (not for upload)."""
    version = read_metadata(repo / "metadata.txt")["version"]
    if not local:
        values = read_project(project or repo / "project.ini")
        problems = placeholder_problems(values)
        if problems:  # fail before the slow part, with what to do
            raise SystemExit("plugin zip not built:\n  " + "\n  ".join(problems))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{PLUGIN}-{version}.zip"
    with tempfile.TemporaryDirectory(prefix="refound-zip-") as tmp:
        root = stage(Path(tmp), repo, checkpoint, project)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(root.rglob("*")):
                if f.is_file():
                    info = zipfile.ZipInfo(f.relative_to(root.parent).as_posix(), date_time=(2024, 1, 1, 0, 0, 0))
                    info.external_attr = 0o100644 << 16  # regular file, rw-r--r--: what the repository expects
                    info.compress_type = zipfile.ZIP_DEFLATED
                    zf.writestr(info, f.read_bytes())
    fd, part = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=out_dir)
    with os.fdopen(fd, "wb") as fh:
        fh.write(buf.getvalue())
    problems = check_zip(Path(part), target.name, allow_placeholders=local)
    if problems:
        os.remove(part)
        raise SystemExit("plugin zip rejected:\n  " + "\n  ".join(problems))
    os.replace(part, target)  # atomic: a rejected or half-written zip never takes the name
    return target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, default=REPO / "dist", help="where the zip goes (default: dist/)")
    p.add_argument("--stage", type=Path, help="only write the plugin folder into this folder (for QGIS_PLUGINPATH)")
    p.add_argument("--checkpoint", type=Path, help="bundle this (small) checkpoint folder as the demo checkpoint")
    p.add_argument("--local", action="store_true",
                   help="build even while project.ini has placeholder URLs (a zip to install yourself, not to upload)")
    p.add_argument("--project", type=Path, default=REPO / "project.ini",
                   help="the file with the homepage, repository, tracker and email (default: project.ini)")
    args = p.parse_args(argv)
    if args.stage:
        print(stage(args.stage, checkpoint=args.checkpoint, project=args.project))
        return 0
    target = build(args.out_dir, checkpoint=args.checkpoint, local=args.local, project=args.project)
    print(f"{target} ({target.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
