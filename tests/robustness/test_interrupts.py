"""A long run (over the cost-warning threshold) warns first; SIGTERM (e.g. `timeout`) and SIGINT
(Ctrl-C) stop it with one line and leave no output, temp file or lock behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.robustness.conftest import REPO, leftovers


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["sigterm", "sigint"])
def test_interrupted_large_run_warns_then_leaves_nothing(bad, tmp_path, sig, code):
    out = tmp_path / "big.gpkg"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # 5 m cells over the 1 km city: 40,000 cells, above the 20,000-cell warning, a long CPU run
    proc = subprocess.Popen([sys.executable, "-m", "training.cli", "predict", "--quiet", "--checkpoint", bad["ckpt"],
                             "--pois", bad["gpkg"], "--imagery", bad["tif"], "--extent", bad["extent"],
                             "--cell-size", "5", "--out", out], stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if "large run" in line:
            break
    assert any("large run" in ln and "40,000 cells" in ln for ln in lines), lines
    time.sleep(4.0)  # let it start writing
    assert (tmp_path / ".big.gpkg.lock").exists()  # the output is locked while the run writes
    proc.send_signal(sig)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == code, rest
    assert "Traceback" not in rest and ("terminated" if sig == signal.SIGTERM else "interrupted") in rest
    assert not out.exists() and leftovers(tmp_path) == []
