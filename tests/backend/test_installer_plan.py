"""The backend installer's pure part (no QGIS): torch build from the driver, pip commands,
progress, failure kinds, cancel, repair detection."""
from __future__ import annotations

import os
import sys
import time

import pytest

from refound_qgis import backend_install as bi
from refound_qgis import backend_install_run as run

BANNER = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
+-----------------------------------------------------------------------------------------+"""


def test_driver_cuda_picks_the_matching_torch_index():
    assert bi.parse_nvidia_smi(BANNER) == (12, 4)
    assert bi.parse_nvidia_smi("NVIDIA-SMI has failed") is None
    tag, url, note = bi.torch_build({"cuda": (12, 9)}, platform="linux")
    assert (tag, url) == ("cu128", "https://download.pytorch.org/whl/cu128")
    assert bi.torch_build({"cuda": (13, 1)}, platform="win32")[0] == "cu130"
    # a driver older than every CUDA build of the pinned torch: CPU, and the note says what to do
    tag, url, note = bi.torch_build({"cuda": (12, 4)}, platform="linux")
    assert tag == "cpu" and url.endswith("/cpu") and "update the driver" in note
    assert bi.torch_build({"cuda": None, "detail": "no driver"}, platform="linux")[0] == "cpu"
    assert bi.torch_build({"cuda": (12, 8)}, platform="darwin")[:2] == ("default", "")
    assert bi.torch_build({"cuda": None}, "cu126")[:2] == ("cu126", "https://download.pytorch.org/whl/cu126")


def test_fake_nvidia_smi_on_path_is_detected(tmp_path, monkeypatch):
    exe = tmp_path / "nvidia-smi"
    exe.write_text("#!/bin/sh\nif [ -n \"$1\" ]; then echo 'NVIDIA H100, 550.54.15, 81559 MiB'; else cat <<'E'\n"
                   + BANNER + "\nE\nfi\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    gpu = bi.detect_gpu()
    assert gpu["cuda"] == (12, 4) and gpu["driver"] == "550.54.15" and "H100" in gpu["gpus"][0]
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    assert bi.detect_gpu()["cuda"] is None


def test_plan_offline_uses_only_the_wheelhouse(tmp_path):
    opts = bi.InstallOptions(venv_dir=str(tmp_path / "venv"), wheelhouse=str(tmp_path / "wh"))
    steps, info = bi.plan(opts, gpu={"cuda": (12, 8)})
    keys = [s.key for s in steps]
    assert keys == ["venv", "torch", "pins", "refound", "check", "doctor"]
    torch_reqs, other = bi.read_pins(bi.pins_file())
    assert torch_reqs == ["torch==2.14.1", "torchvision==0.29.1"] and "numpy==1.26.4" in other
    assert all("#" not in r for r in other)
    for s in steps[1:4]:
        assert s.argv[:4] == [info["python"], "-m", "pip", "install"]
        assert "--no-index" in s.argv and s.argv[s.argv.index("--find-links") + 1] == str(tmp_path / "wh")
        assert "--index-url" not in s.argv
    assert steps[1].argv[-2:] == torch_reqs
    assert steps[3].argv[-1] == f"refound=={bi.plugin_version()}" and "--force-reinstall" in steps[3].argv
    assert steps[5].argv[1:] == ["-m", "training.cli", "doctor", "--json"]
    online, info2 = bi.plan(bi.InstallOptions(venv_dir=str(tmp_path / "venv")), gpu={"cuda": (12, 8)})
    assert online[1].argv[online[1].argv.index("--index-url") + 1] == "https://download.pytorch.org/whl/cu128"
    assert "--index-url" not in online[2].argv  # the other pins come from the normal index
    assert info2["refound"] == bi.source_checkout()  # the working tree is the refound source here
    assert info2["needed_gib"] == bi.NEEDED_GIB["cuda"]


def test_failures_are_named_with_what_to_do():
    net = ("WARNING: Retrying (Retry(total=0)) after connection broken by 'NewConnectionError(': Failed to "
           "establish a new connection: [Errno -3] Temporary failure in name resolution')'\n"
           "ERROR: No matching distribution found for torch==2.14.1\n")
    kind, msg = run.classify_failure(net, 1)
    assert kind == "network" and "offline option" in msg
    kind, msg = run.classify_failure("ERROR: Could not install packages due to an OSError: [Errno 28] No space left "
                                     "on device\n", 1, {"gib": 8})
    assert kind == "disk" and "8 GiB" in msg
    kind, msg = run.classify_failure("ERROR: No matching distribution found for refound==0.1.0\n", 1)
    assert kind == "not-found" and "refound==0.1.0" in msg and "wheelhouse" in msg
    assert run.classify_failure("boom\nlast line\n", 3) == ("failed", "The step failed (exit 3): last line")


def test_pip_output_becomes_progress():
    p = run.PipProgress(expected=2)
    fractions = []
    for line in ("Looking in links: /wh", "Collecting torch==2.14.1", "  Downloading torch-2.14.1.whl (800 MB)",
                 "Collecting filelock", "Installing collected packages: filelock, torch",
                 "Successfully installed filelock-3 torch-2.14.1"):
        p.feed(line)
        fractions.append(p.fraction)
        if "Downloading" in line:
            assert "torch-2.14.1.whl" in p.text
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and 0 < fractions[1] < 0.8


def test_cancel_kills_the_running_process(tmp_path):
    t0 = time.monotonic()
    start = t0 + 0.5
    with open(tmp_path / "log", "w", encoding="utf-8") as log:
        rc, out = run.run_command([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                                  log, lambda line: None, lambda: time.monotonic() > start)
    assert rc is None and time.monotonic() - t0 < 10
    assert "started" in out and "[canceled" in (tmp_path / "log").read_text()


def test_broken_and_foreign_folders(tmp_path):
    assert run.venv_health(str(tmp_path / "nope"))[0] == "missing"
    v = tmp_path / "venv"
    (v / "bin").mkdir(parents=True)
    (v / "pyvenv.cfg").write_text("home = /usr/bin\n")
    state, why = run.venv_health(str(v))
    assert state == "broken" and "missing" in why
    (v / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")
    (v / "bin" / "python").chmod(0o755)
    assert run.venv_health(str(v))[0] == "broken"
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_text("x")
    with pytest.raises(ValueError, match="not a Python environment"):
        run.remove_venv(str(other))  # never deletes a folder that is not a venv
    assert (other / "holiday.jpg").exists()


def test_not_enough_disk_is_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(bi, "free_gib", lambda p: 0.2)
    res = run.install(bi.InstallOptions(venv_dir=str(tmp_path / "venv"), wheelhouse=str(tmp_path)),
                      gpu={"cuda": None})
    assert not res["ok"] and res["kind"] == "disk" and "0.2 GiB free" in res["message"]
    assert not (tmp_path / "venv").exists() and os.path.isfile(res["log"])


def test_unreachable_index_is_reported_as_a_network_failure(tmp_path, monkeypatch):
    """A real pip run against an index nobody listens on (no config files, one retry)."""
    monkeypatch.setattr(bi, "TORCH_INDEX", "http://127.0.0.1:9/whl/")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)  # this machine's local wheel folder
    # one retry: pip names the connection error only when it retries
    env = {"PIP_CONFIG_FILE": os.devnull, "PIP_RETRIES": "1", "PIP_TIMEOUT": "5"}
    steps = []
    res = run.install(bi.InstallOptions(venv_dir=str(tmp_path / "venv"), gpu="auto", extra_env=env),
                      report=lambda f, t: steps.append(t), gpu={"cuda": None, "detail": "test"})
    assert not res["ok"] and res["step"] == "torch", res
    assert res["kind"] == "network" and "offline option" in res["message"] and res["log"] in res["message"]
    assert run.venv_health(str(tmp_path / "venv"))[0] == "incomplete"  # the venv step had worked
    assert steps[0] == "Creating the Python environment"
