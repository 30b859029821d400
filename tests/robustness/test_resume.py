"""kill -9 in the middle of a run, then the same command: fine-tuning continues from its last
finished epoch (and ends with the weights an uninterrupted run has); teacher caching continues
from its last finished batch."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.robustness.conftest import REPO
from tests.training.finetune_fixtures import make_checkpoint, make_dataset


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _cli(*args):
    return [sys.executable, "-m", "training.cli", *map(str, args)]


def _kill_when(proc, ready, timeout=180.0):
    """SIGKILL ``proc`` as soon as ``ready()`` holds; fails if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            return
        time.sleep(0.05)
    raise AssertionError(f"the run ended (rc {proc.poll()}) before it could be killed mid-way")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    ds = make_dataset(root / "ds")
    return ds, make_checkpoint(root / "ckpt", ds)


def test_finetune_killed_then_same_command_resumes_to_the_uninterrupted_result(tiny, tmp_path):
    import torch

    from refound_core.model.checkpoint import load_checkpoint

    ds, ckpt = tiny
    common = ["finetune", "--checkpoint", ckpt, "--data", ds.folder, "--task", "population", "--epochs", "5",
              "--batch-size", "8", "--device", "cpu", "--seed", "3"]
    ref = tmp_path / "ref"
    done = subprocess.run(_cli(*common, "--out", ref), capture_output=True, text=True, env=_env(), cwd=REPO)
    assert done.returncode == 0, done.stderr

    out = tmp_path / "ft"
    state = tmp_path / "ft.partial" / "state.pt"
    proc = subprocess.Popen(_cli(*common, "--out", out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=_env(), cwd=REPO)
    _kill_when(proc, state.is_file)
    assert not out.exists()  # a killed run never leaves a checkpoint that looks complete
    assert (tmp_path / ".ft.lock").exists()  # ... and its stale lock is taken over below

    # other settings are refused, naming the folder and what differs
    other = subprocess.run(_cli(*[a if a != "5" else "6" for a in common], "--out", out), capture_output=True,
                           text=True, env=_env(), cwd=REPO)
    assert other.returncode == 2 and "ft.partial" in other.stderr and "epochs" in other.stderr
    assert "Traceback" not in other.stderr

    again = subprocess.run(_cli(*common, "--out", out), capture_output=True, text=True, env=_env(), cwd=REPO)
    assert again.returncode == 0, again.stderr
    assert "resuming after epoch" in again.stdout
    resumed_from = int(again.stdout.split("resuming after epoch ")[1].split("/")[0])
    assert 1 <= resumed_from < 5
    assert not (tmp_path / "ft.partial").exists() and not (tmp_path / ".ft.lock").exists()
    a, b = load_checkpoint(ref), load_checkpoint(out)
    for (name, wa), wb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.allclose(wa, wb, atol=1e-5), name
    for wa, wb in zip(a.head.state_dict().values(), b.head.state_dict().values()):
        assert torch.allclose(wa, wb, atol=1e-5)
    assert a.task["best_epoch"] == b.task["best_epoch"]
    assert np.isclose(a.task["test_metrics"]["R2"], b.task["test_metrics"]["R2"], atol=1e-5)


def test_teacher_caching_killed_then_same_command_resumes(tiny, tmp_path):
    """`refound teachers` with stub teachers, killed after some batches: the rerun reuses the
    finished rows (it says so) and its cache equals one computed in one go."""
    import shutil

    one, two = tmp_path / "one", tmp_path / "two"
    make_dataset(one, n=600, image_size=64, seed=1)  # enough batches for the kill to land mid-way
    shutil.copytree(one, two)
    args = ["--preset", "tiny", "--describer", "template", "--sentence", "stub", "--visual", "stub",
            "--batch-size", "2", "--no-progress", "--codebook-size", "8"]
    ref = subprocess.run(_cli("teachers", "--data", one, *args), capture_output=True, text=True, env=_env(),
                         cwd=REPO)
    assert ref.returncode == 0, ref.stderr

    def some_rows_done():
        for p in (two / "teacher_cache").glob(".*.partial/rows_done"):
            text = p.read_text().strip()
            if text.isdigit() and int(text) >= 20:
                return True
        return False

    proc = subprocess.Popen(_cli("teachers", "--data", two, *args), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env(), cwd=REPO)
    _kill_when(proc, some_rows_done)
    again = subprocess.run(_cli("teachers", "--data", two, *args), capture_output=True, text=True, env=_env(),
                           cwd=REPO)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    resumed = int(again.stderr.split(" after ")[1].split(" of ")[0])
    assert 20 <= resumed < 600
    (ca,), (cb,) = [list(p.glob("teacher_cache/[!.]*")) for p in (one, two)]
    assert ca.name == cb.name and not list((two / "teacher_cache").glob(".*"))
    for name in ("u_P.npy", "u_S.npy", "visual_tokens.npy", "poi_valid.npy", "image_valid.npy"):
        assert np.array_equal(np.load(ca / name), np.load(cb / name)), name
    assert (ca / "descriptions.jsonl").read_text() == (cb / "descriptions.jsonl").read_text()
