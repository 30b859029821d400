#!/usr/bin/env python3
"""Screenshots of the real QGIS GUI with the ReFound plugin, for docs/ and the README.

    make demo                                        # writes demo_out/ (inputs, heads, result layers)
    .venv/bin/python scripts/screenshot_qgis.py --analyze

writes into ``docs/img/`` the whole QGIS main window (1280 x 800): the layer panel with its
legend, the map canvas with a styled ReFound result layer, and the ReFound panel with its inputs
filled in. Scenes (``--scene`` picks some; default: the first two, plus the third with ``--analyze``):

* ``synthetic`` -> ``qgis_synthetic_city.png``: the demo's synthetic city (imagery + POIs) and its
  urban-village result (``demo_out/city_urban_village.gpkg``; the population result is loaded
  too, hidden).
* ``helsinki`` -> ``qgis_helsinki.png``: real OpenStreetMap POIs of central Helsinki and the
  population predicted from them (``demo_out/helsinki_population.gpkg``); no imagery exists
  offline, so the canvas has no basemap.
* ``analyze`` -> ``qgis_analyze_extent.png``: a real run in the GUI: the panel's *Analyze extent*
  button is clicked on a map extent inside the synthetic imagery with the demo's urban-village
  head, in-process (PyTorch in QGIS's Python, CPU here: ~20 s); the shot shows the new layer
  and the panel's final message.

How: for each scene the ``qgis`` binary is started under Xvfb (``xvfb-run -a``) with a fresh
temporary profile (``--profiles-path``) in which the plugin is enabled, the plugin folder that
the release zip holds (``scripts/build_plugin_zip.py --stage``) on ``QGIS_PLUGINPATH``, and the
venv's site-packages on ``PYTHONPATH`` so torch imports inside QGIS (SETUP-NOTES items 7-8).
QGIS runs this same file as its startup script (``--code``); that part (:func:`_drive_qgis`)
lays out the window, loads the layers, fills the panel, waits until the canvas has rendered,
grabs the window with ``QWidget.grab()`` (no screen-capture tool needed) and quits.

Screenshot-only adjustments, each a setting a user could make: result layers at 70 % layer
opacity so the imagery shows through; the panel's combo boxes allowed to shrink (their long
items would make the panel ~800 px wide); ``import triton`` blocked in QGIS's Python before
torch loads (importing Triton's bundled LLVM where Mesa's OpenGL driver already loaded libLLVM
segfaults the QGIS GUI; Triton only serves ``torch.compile``). PNGs larger than ``--max-kb``
are reduced to a 256-colour palette with Pillow.
"""
from __future__ import annotations

import json
import os
import sys

CONFIG_ENV = "REFOUND_SHOT_CONFIG"   # set only in the QGIS child: this file then drives the GUI
WINDOW = (1280, 800)
TARGETS = {"synthetic": "qgis_synthetic_city.png", "helsinki": "qgis_helsinki.png",
           "analyze": "qgis_analyze_extent.png"}


# ===================================================================================== outer side
def main(argv=None) -> int:
    import argparse
    import glob
    import shutil
    import tempfile
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-out", default=str(repo / "demo_out"), help="folder written by `make demo`")
    ap.add_argument("--out", default=str(repo / "docs" / "img"), help="where the PNGs go (default docs/img)")
    ap.add_argument("--scene", action="append", choices=tuple(TARGETS),
                    help="scene(s) to shoot (default: synthetic and helsinki, plus analyze with --analyze)")
    ap.add_argument("--analyze", action="store_true",
                    help="also shoot the 'analyze' scene: a real run of the panel's Analyze extent button")
    ap.add_argument("--site-packages", default="",
                    help="site-packages with torch for QGIS's Python (default: the repo's .venv)")
    ap.add_argument("--max-kb", type=int, default=400, help="quantise a PNG larger than this (default 400)")
    ap.add_argument("--timeout", type=int, default=420, help="seconds allowed per QGIS session (default 420)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temporary profile and QGIS logs")
    args = ap.parse_args(argv)

    for tool in ("xvfb-run", "qgis"):
        if shutil.which(tool) is None:
            print(f"error: `{tool}` is not on PATH; install the Debian packages qgis, xvfb and xauth "
                  "(see /work/shared/docs/SETUP-NOTES.md).", file=sys.stderr)
            return 2
    demo = Path(args.demo_out).resolve()
    site = args.site_packages or next(iter(sorted(glob.glob(str(repo / ".venv/lib/python3*/site-packages")))), "")
    scenes = args.scene or (["synthetic", "helsinki"] + (["analyze"] if args.analyze else []))
    city = [demo / "city_seed22/imagery.tif", demo / "city_seed22/pois.gpkg", demo / "head_urban_village"]
    needs = {
        "synthetic": city + [demo / "head_population", demo / "city_urban_village.gpkg", demo / "city_population.gpkg"],
        "analyze": city,
        "helsinki": [demo / "helsinki/pois.gpkg", demo / "helsinki/head_population", demo / "helsinki_population.gpkg"],
    }
    missing = [str(p) for s in scenes for p in needs[s] if not p.exists()]
    if missing:
        print("error: demo outputs missing (run `make demo` first): " + ", ".join(missing), file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix="refound-screenshot-"))
    plugins = _stage_plugin(repo, tmp / "plugins")
    failures = 0
    try:
        for scene in scenes:
            profiles = tmp / f"profiles-{scene}"
            ini = profiles / "profiles" / "default" / "QGIS" / "QGIS3.ini"
            ini.parent.mkdir(parents=True)
            # A fresh profile with the plugin enabled, no version check, no news feed.
            ini.write_text("[PythonPlugins]\nrefound_qgis=true\nprocessing=true\n\n"
                           "[qgis]\ncheckVersion=false\n\n[core]\nNewsFeed\\httpsfeedqgisorg\\disabled=true\n",
                           encoding="utf-8")
            raw = tmp / f"{scene}.raw.png"
            report = tmp / f"{scene}.json"
            cfg = {"scene": scene, "repo": str(repo), "demo": str(demo), "raw_png": str(raw),
                   "report": str(report), "analyze": scene == "analyze",
                   "window": WINDOW, "analysis_timeout_s": max(60, args.timeout - 90)}
            cfg_path = tmp / f"{scene}.config.json"
            cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
            env = dict(os.environ)
            env.pop("QT_QPA_PLATFORM", None)   # `make` exports offscreen; the real GUI needs xcb
            env.update({
                CONFIG_ENV: str(cfg_path),
                "QGIS_PLUGINPATH": str(plugins),
                "PYTHONPATH": os.pathsep.join(p for p in (str(repo), site) if p),
                "XDG_RUNTIME_DIR": env.get("XDG_RUNTIME_DIR") or str(tmp / "runtime"),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            })
            os.makedirs(env["XDG_RUNTIME_DIR"], mode=0o700, exist_ok=True)
            cmd = ["xvfb-run", "-a", "-s", "-screen 0 1440x900x24 -nolisten tcp",
                   "qgis", "--profiles-path", str(profiles), "--nologo", "--noversioncheck", "--lang", "en_US",
                   "--code", str(Path(__file__).resolve())]
            print(f"[{scene}] starting QGIS under Xvfb ...", flush=True)
            t0 = time.time()
            log = tmp / f"{scene}.qgis.log"
            with open(log, "w") as fh:
                rc = _run_qgis(cmd, env, fh, report, args.timeout)
            info = json.loads(report.read_text()) if report.exists() else {}
            fault = Path(str(report) + ".fault.txt")
            if fault.exists() and fault.stat().st_size:
                print(f"[{scene}] QGIS crashed; Python stacks at the crash:\n" + fault.read_text(errors="replace")[-4000:],
                      file=sys.stderr)
            for line in info.get("log", []):
                print(f"[{scene}]   {line}")
            if not raw.exists() or info.get("error"):
                failures += 1
                print(f"[{scene}] FAILED (qgis exit {rc}): {info.get('error') or 'no screenshot written'}; "
                      f"QGIS output:\n" + log.read_text(errors="replace")[-3000:], file=sys.stderr)
                continue
            target = out / TARGETS[scene]
            size = _write_png(raw, target, args.max_kb)
            print(f"[{scene}] wrote {target} ({size // 1024} KB) in {time.time() - t0:.0f} s", flush=True)
    finally:
        if args.keep_tmp:
            print(f"temporary files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failures else 0


def _stage_plugin(repo, folder):
    """A plugin folder for QGIS_PLUGINPATH: the one the release zip holds (scripts/build_plugin_zip.py
    --stage: the package + metadata.txt + icon), or, when that cannot run here, symlinks to the
    package's files plus metadata.txt (QGIS lists a plugin only when its folder has metadata.txt)."""
    import subprocess

    folder.mkdir()
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", PYTHONPATH=str(repo))
    res = subprocess.run([sys.executable, str(repo / "scripts" / "build_plugin_zip.py"), "--stage", str(folder)],
                         env=env, cwd=repo, capture_output=True, text=True)
    if res.returncode == 0 and (folder / "refound_qgis" / "metadata.txt").is_file():
        return folder
    print("  (build_plugin_zip.py --stage failed; linking the package instead)\n" + res.stderr[-1500:])
    pkg = folder / "refound_qgis"
    if pkg.exists():
        import shutil

        shutil.rmtree(pkg)
    pkg.mkdir()
    for entry in (repo / "refound_qgis").iterdir():
        if entry.name != "__pycache__":
            os.symlink(entry, pkg / entry.name)
    os.symlink(repo / "metadata.txt", pkg / "metadata.txt")
    return folder


def _run_qgis(cmd, env, log_fh, report, timeout: float):
    """Run QGIS until it quits; once it has written its report, allow it 30 s to quit on its
    own, then end its process group (xvfb-run, Xvfb and qgis, all started here)."""
    import signal
    import subprocess
    import time

    def end_group():
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    proc = subprocess.Popen(cmd, env=env, stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True)
    t0, reported = time.time(), None
    try:
        while proc.poll() is None:
            now = time.time()
            if reported is None and report.exists():
                reported = now
            if now - t0 > timeout or (reported is not None and now - reported > 30):
                end_group()
                return "timeout" if reported is None else "ended after its report"
            time.sleep(0.5)
    except BaseException:   # Ctrl-C: leave no Xvfb / QGIS behind
        if proc.poll() is None:
            end_group()
        raise
    return proc.returncode


def _write_png(raw, target, max_kb: int) -> int:
    """Copy ``raw`` to ``target`` atomically; quantise to a palette PNG when it is too large."""
    import shutil

    tmp = target.with_name(f".{target.name}.tmp.png")
    data = raw.read_bytes()
    if len(data) > max_kb * 1024:
        try:
            from PIL import Image
        except ImportError:
            print("  (Pillow is not importable: keeping the full-colour PNG)")
        else:
            img = Image.open(raw).convert("RGB")
            for colors in (256, 128, 64):
                q = img.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG)
                q.save(tmp, optimize=True)
                if tmp.stat().st_size <= max_kb * 1024:
                    break
            os.replace(tmp, target)
            return target.stat().st_size
    shutil.copyfile(raw, tmp)
    os.replace(tmp, target)
    return target.stat().st_size


# ===================================================================================== inside QGIS
def _drive_qgis(cfg: dict) -> None:
    """Runs in QGIS's Python (``--code``): lay out the window, load layers, fill the panel, grab."""
    import time
    import traceback

    from qgis.core import QgsApplication, QgsMarkerSymbol, QgsProject, QgsRasterLayer, QgsRectangle, QgsVectorLayer
    from qgis.PyQt.QtCore import Qt, QTimer
    from qgis.PyQt.QtWidgets import QComboBox, QDockWidget
    from qgis.utils import iface, plugins

    import faulthandler

    # Python stacks of every thread if QGIS crashes (QGIS's own handler shows only the main thread).
    state = {"log": [], "error": "", "t0": time.time(), "fault": open(cfg["report"] + ".fault.txt", "w")}
    faulthandler.enable(state["fault"], all_threads=True)
    keep = []  # Python references to timers / layers for the session

    def log(msg):
        state["log"].append(f"{time.time() - state['t0']:6.1f} s  {msg}")

    def finish(error=""):
        state["error"] = state["error"] or error
        with open(cfg["report"], "w", encoding="utf-8") as fh:
            json.dump({"log": state["log"], "error": state["error"]}, fh)
        # Layers out first: QGIS 3.22 crashed while quitting with result layers still in the
        # layer tree (QgisApp::setMapStyleDockLayer during the tree's teardown).
        iface.setActiveLayer(None)
        project.removeAllMapLayers()
        project.setDirty(False)   # no "save project?" question on quit
        QTimer.singleShot(500, QgsApplication.instance().quit)

    def guarded(fn):
        def run(*a):
            try:
                fn(*a)
            except Exception:  # noqa: BLE001 - report, never leave QGIS hanging
                finish(traceback.format_exc())
        return run

    # Local workaround (see the module docstring): in the QGIS GUI, Mesa's OpenGL driver has
    # loaded libLLVM, and importing Triton's libtriton (its own LLVM; torch imports it through
    # timm -> torchvision -> torch._dynamo) segfaults QGIS. Triton only serves torch.compile on GPUs,
    # which inference does not use, so make `import triton` fail cleanly before torch is imported.
    if "triton" not in sys.modules:
        sys.modules["triton"] = None

    demo, scene = cfg["demo"], cfg["scene"]
    mw, canvas, project = iface.mainWindow(), iface.mapCanvas(), QgsProject.instance()

    def plugin():
        if "refound_qgis" not in plugins:   # the profile enables it; QGIS has loaded it at start-up
            raise RuntimeError("QGIS did not load the refound_qgis plugin (see the QGIS output for why)")
        return plugins["refound_qgis"]

    def vector(path, name, layername=None):
        lyr = QgsVectorLayer(f"{path}|layername={layername}" if layername else path, name, "ogr")
        if not lyr.isValid():
            raise RuntimeError(f"QGIS cannot open {path}")
        return lyr

    def style_pois(lyr, color, size):
        lyr.setRenderer(lyr.renderer().clone())
        sym = QgsMarkerSymbol.createSimple({"name": "circle", "size": str(size), "color": color,
                                            "outline_color": "35,35,35,220", "outline_width": "0.1"})
        lyr.renderer().setSymbol(sym)

    def result_layer(path, task, checkpoint):
        from refound_qgis import results
        from refound_qgis.task import model_name_of, read_checkpoint_meta
        import datetime as dt

        when = dt.datetime.fromtimestamp(os.path.getmtime(path))
        name = results.layer_title(task, model_name_of(read_checkpoint_meta(checkpoint)), when)
        lyr = vector(path, name)
        results.apply_style(lyr, task)
        lyr.setOpacity(0.7)
        return lyr

    def layout():
        mw.setWindowState(Qt.WindowNoState)
        mw.setGeometry(0, 0, *cfg["window"])
        mw.resize(*cfg["window"])
        docks = {d.objectName(): d for d in mw.findChildren(QDockWidget)}
        for name, d in docks.items():   # a clean window: the Layers panel left, the ReFound panel right
            if name not in ("Layers", "RefoundDock"):
                d.hide()
        layers_dock, ref = docks.get("Layers"), plugin().dock
        # Local to the screenshot (see the report): the panel's combo boxes size to their longest
        # item ("Automatic (in QGIS when PyTorch imports, else local backend)"), which makes the
        # panel ~800 px wide; let them shrink so the panel fits beside the map at 1280 px.
        for combo in ref.widget().findChildren(QComboBox):
            combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(12)
            combo.setMinimumWidth(80)   # overrides the cached contents-based minimum size hint
        ref.show()
        ref.raise_()
        if layers_dock is not None:
            layers_dock.show()
            mw.resizeDocks([layers_dock], [270], Qt.Horizontal)
        mw.resizeDocks([ref], [405], Qt.Horizontal)

    def fill_panel(dock, pois, imagery, task, checkpoint):
        dock.poi_combo.setLayer(pois)
        dock._poi_layer_changed(pois)
        dock.imagery_combo.setLayer(imagery)   # None = no imagery (POI-only)
        dock.task_combo.setCurrentIndex(dock.task_combo.findData(task))
        dock.checkpoint_widget.setFilePath(checkpoint)
        dock.backend_combo.setCurrentIndex(dock.backend_combo.findData("auto"))
        dock.device_combo.setCurrentIndex(dock.device_combo.findData("auto"))
        dock.cell_size_spin.setValue(256.0)
        dock.output_widget.setFilePath("")

    def fit_inside(ext: QgsRectangle, shrink: float) -> QgsRectangle:
        """The largest rectangle with the canvas's aspect inside ``ext``, scaled by ``shrink``."""
        aspect = canvas.width() / max(1, canvas.height())
        w, h = ext.width(), ext.height()
        if w / h > aspect:
            w = h * aspect
        else:
            h = w / aspect
        w, h = w * shrink, h * shrink
        c = ext.center()
        return QgsRectangle(c.x() - w / 2, c.y() - h / 2, c.x() + w / 2, c.y() + h / 2)

    def expand_legends():
        view = iface.layerTreeView()
        for node in project.layerTreeRoot().findLayers():
            if node.isVisible():   # a hidden layer's legend stays folded
                node.setExpanded(True)
                view.setExpanded(view.node2index(node), True)   # the view's index (behind a proxy model)

    def shoot_when_rendered(min_wait_ms=3000):
        polls = {"n": 0, "idle": 0}
        timer = QTimer()
        keep.append(timer)

        def poll():
            polls["n"] += 1
            polls["idle"] = 0 if canvas.isDrawing() else polls["idle"] + 1
            if polls["idle"] >= 3 or polls["n"] > 120:   # 3 quiet polls (1.5 s), or give up after 60 s
                timer.stop()
                iface.messageBar().clearWidgets()   # the panel shows the same message
                expand_legends()   # again: a layer added by the task gets its legend rows late
                QgsApplication.processEvents()
                pix = mw.grab()
                if not pix.save(cfg["raw_png"], "PNG"):
                    raise RuntimeError(f"could not save {cfg['raw_png']}")
                log(f"grabbed {pix.width()}x{pix.height()} window")
                finish()

        timer.timeout.connect(guarded(poll))
        QTimer.singleShot(min_wait_ms, lambda: timer.start(500))

    @guarded
    def build():
        layout()
        QgsApplication.processEvents()
        layout()   # dock sizes only stick once the window has its final size
        QgsApplication.processEvents()
        dock = plugin().dock
        log("QGIS started, plugin loaded, window laid out")
        if scene in ("synthetic", "analyze"):
            city = os.path.join(demo, "city_seed22")
            imagery = QgsRasterLayer(os.path.join(city, "imagery.tif"), "Synthetic imagery (1 m, SYNTHETIC)")
            if not imagery.isValid():
                raise RuntimeError("QGIS cannot open the synthetic imagery")
            pois = vector(os.path.join(city, "pois.gpkg"), "Synthetic POIs", "pois")
            style_pois(pois, "255,255,255,230", 1.1)
            uv_head, pop_head = os.path.join(demo, "head_urban_village"), os.path.join(demo, "head_population")
            project.addMapLayers([pois, imagery])   # the first in the list goes on top of the layer tree
            keep.extend([imagery, pois])
            fill_panel(dock, pois, imagery, "urban_village", uv_head)
            QgsApplication.processEvents()
            if cfg["analyze"]:
                canvas.setExtent(fit_inside(imagery.extent(), 0.72))
                canvas.refresh()
                QgsApplication.processEvents()
                state["t_analyze"] = time.time()
                log(f"clicking 'Analyze extent' ({dock.estimate_label.text()})")

                def done(layer, message):
                    log(f"analysis finished in {time.time() - state['t_analyze']:.1f} s: {message}")
                    if layer is None:
                        state["error"] = f"the analysis produced no layer: {message}"
                    else:
                        layer.setOpacity(0.7)
                        iface.setActiveLayer(layer)
                    expand_legends()
                    canvas.refresh()
                    shoot_when_rendered(2500)

                dock.analysis_finished.connect(guarded(done))
                dock.run_button.click()

                def too_slow():
                    if dock.current_task is not None:
                        log("analysis still running at the time limit: canceling")
                        dock.cancel_analysis()

                QTimer.singleShot(int(cfg["analysis_timeout_s"] * 1000), too_slow)
                return
            pop = result_layer(os.path.join(demo, "city_population.gpkg"), "population", pop_head)
            uv = result_layer(os.path.join(demo, "city_urban_village.gpkg"), "urban_village", uv_head)
            from refound_qgis import results

            results.add_to_project(pop, [imagery.id(), pois.id()])
            results.add_to_project(uv, [pop.id()])
            project.layerTreeRoot().findLayer(pop.id()).setItemVisibilityChecked(False)
            project.layerTreeRoot().findLayer(pop.id()).setExpanded(False)
            keep.extend([pop, uv])
            iface.setActiveLayer(uv)
            canvas.setExtent(uv.extent().buffered(uv.extent().width() * 0.02))
        else:
            pois = vector(os.path.join(demo, "helsinki", "pois.gpkg"), "OpenStreetMap POIs (© OSM contributors)",
                          "pois")
            style_pois(pois, "40,40,40,200", 0.9)
            head = os.path.join(demo, "helsinki", "head_population")
            pop = result_layer(os.path.join(demo, "helsinki_population.gpkg"), "population", head)
            project.addMapLayers([pois, pop])   # POIs drawn above the cells (no imagery to hide)
            keep.extend([pop, pois])
            fill_panel(dock, pois, None, "population", head)

            @guarded
            def place():
                # QGIS gives a new project the CRS of a first layer (the POIs' lon/lat) shortly
                # after they are added; then switch to the grid's UTM zone so cells are square.
                project.setCrs(pop.crs())
                iface.setActiveLayer(pop)
                canvas.setExtent(pop.extent().buffered(pop.extent().width() * 0.02))
                expand_legends()
                canvas.refresh()
                shoot_when_rendered()

            QTimer.singleShot(1000, place)
            return
        expand_legends()
        canvas.refresh()
        shoot_when_rendered()

    QTimer.singleShot(1500, build)
    keep.append(build)
    globals()["_refound_screenshot_keep"] = keep   # the GUI outlives this script's frame


if os.environ.get(CONFIG_ENV) and "qgis.utils" in sys.modules:
    with open(os.environ[CONFIG_ENV], encoding="utf-8") as _fh:
        _drive_qgis(json.load(_fh))
elif __name__ == "__main__":
    sys.exit(main())
