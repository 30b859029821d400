#!/usr/bin/env python3
"""Screenshot of the "Set up model backend" dialog after a real, offline set-up -> docs/img/.

    .venv/bin/python scripts/screenshot_setup.py [--out docs/img/backend_setup.png]

Headless (``QT_QPA_PLATFORM=offscreen``): builds this project's wheel into a temporary wheelhouse,
runs the dialog's set-up into a temporary venv with "Reuse packages of" = this interpreter (as
tests/qgis/test_backend_setup.py does: torch is not downloaded), grabs the dialog with
``QWidget.grab()`` once it has finished, and deletes the venv again.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess  # nosec B404 - pip wheel with fixed arguments
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "docs" / "img" / "backend_setup.png"))
    args = ap.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    sys.path.insert(0, str(REPO))
    tmp = Path(tempfile.mkdtemp(prefix="refound-shot-"))
    try:
        src = tmp / "src"
        src.mkdir()
        for name in ("setup.py", "README.md", "metadata.txt", "requirements", "refound_core", "training"):
            (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(REPO / name, src / name)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                        "-w", str(tmp / "wheels"), str(src)], check=True)  # nosec B603
        from qgis.core import QgsApplication
        from qgis.PyQt.QtCore import QEventLoop, QTimer

        app = QgsApplication([], True)
        app.initQgis()
        from refound_qgis.dock_setup import BackendSetupDialog

        dlg = BackendSetupDialog()
        dlg.venv_widget.setFilePath(str(tmp / "profile" / "refound" / "backend-venv"))
        dlg.wheelhouse_widget.setFilePath(str(tmp / "wheels"))
        dlg.reuse_widget.setFilePath(sys.executable)
        dlg.resize(760, 620)
        dlg.show()
        loop = QEventLoop()
        dlg.setup_finished.connect(lambda res: loop.quit())
        QTimer.singleShot(20 * 60 * 1000, loop.quit)
        dlg.start()
        loop.exec()
        print(dlg.status_label.text())
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        ok = dlg.grab().save(args.out, "PNG")
        print(f"wrote {args.out}" if ok else "could not write the PNG")
        dlg.close()
        app.exitQgis()
        return 0 if ok and (dlg.result or {}).get("ok") else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
