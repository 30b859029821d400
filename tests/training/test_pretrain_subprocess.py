"""`refound pretrain` as real processes: SIGKILL + --resume reproduces the loss curve; DDP with
two CPU processes (torchrun, gloo) completes and writes one checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training.pretrain.engine import TrainConfig, train
from training.pretrain.logging import read_log

REPO = Path(__file__).resolve().parents[2]
TERMS = ("loss", "dlfm", "dvfm", "dvlfm", "mgdm", "cmsa")
# The command as the `refound` entry point runs it; registers the subcommands itself if the
# lead's COMMANDS table does not list them yet (setdefault never overrides a registration).
LAUNCHER = """import sys
from training.cli import COMMANDS, main
COMMANDS.setdefault("pretrain", ("training.commands.pretrain", "pre-train ReFound"))
COMMANDS.setdefault("plot-log", ("training.commands.plot_log", "plot a pre-training log"))
sys.exit(main())
"""


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    return env


def _args(ds, out, steps):
    return ["pretrain", "--preset", "tiny", "--data", str(ds), "--out", str(out), "--steps", str(steps),
            "--batch-size", "8", "--lr", "2e-3", "--warmup-steps", "3", "--save-every", "4", "--device", "cpu",
            "--precision", "fp32", "--log-every", "1000"]


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_uninterrupted_losses(tmp_path, pretrain_ds, one_thread):
    steps = 16
    # Uninterrupted reference, in-process (same code path, same single-threaded arithmetic).
    ref_out = tmp_path / "ref"
    train(TrainConfig(data=str(pretrain_ds), out=str(ref_out), preset="tiny", steps=steps, batch_size=8, lr=2e-3,
                      warmup_steps=3, save_every=4, device="cpu", precision="fp32", workers=0, log_every=1000,
                      tensorboard=False))
    reference = read_log(ref_out / "training")

    launcher = tmp_path / "refound_main.py"
    launcher.write_text(LAUNCHER)
    out = tmp_path / "killed"
    # A worker process this time: data loading must not depend on the worker count.
    proc = subprocess.Popen([sys.executable, str(launcher), *_args(pretrain_ds, out, steps), "--workers", "1"],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log = out / "training" / "log.jsonl"
    deadline = time.time() + 120
    try:
        # Kill after step 10 is logged: the last state is step 8, so steps 9-10 must be redone.
        while time.time() < deadline and proc.poll() is None:
            if log.exists() and any(r["step"] >= 10 for r in read_log(log)):
                os.killpg(proc.pid, signal.SIGKILL)  # the run and its DataLoader worker
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-3000:]
    assert not (out / "config.json").exists()  # no final checkpoint from the killed run
    latest = json.loads((out / "training" / "state" / "latest.json").read_text())
    assert latest["step"] in (8, 12)

    done = subprocess.run([sys.executable, str(launcher), "pretrain", "--out", str(out), "--resume"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = read_log(out / "training")
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))  # no duplicated or lost step
    for ref, got in zip(reference, resumed):
        for term in TERMS:
            assert got[term] == pytest.approx(ref[term], rel=1e-5, abs=1e-6), (ref["step"], term)
        assert got["lr"] == pytest.approx(ref["lr"])
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()


@pytest.mark.slow
def test_ddp_two_cpu_processes_write_one_checkpoint(tmp_path, pretrain_ds):
    launcher = tmp_path / "refound_main.py"
    launcher.write_text(LAUNCHER)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher),
           *_args(pretrain_ds, out, 3), "--batch-size", "4", "--save-every", "2", "--workers", "0"]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summaries = [line for line in done.stdout.splitlines() if line.startswith('{"checkpoint"')]
    assert len(summaries) == 1  # rank 0 alone reports
    resolved = json.loads((out / "training" / "pretrain_config.json").read_text())
    assert resolved["resolved"]["world_size"] == 2 and resolved["resolved"]["global_batch"] == 8
    rows = read_log(out / "training")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".safetensors")) == [
        "codebook.safetensors", "model.safetensors"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    from refound_core.model.checkpoint import load_checkpoint
    assert load_checkpoint(out).config.name == "refound_tiny"


@pytest.mark.slow
def test_resume_with_another_number_of_processes(tmp_path, pretrain_ds):
    """Elastic resume: a run of one process, killed (here: stopped at a saved state), continued by
    torchrun with two. It says the global batch changed, logs every step once, and writes one
    checkpoint; the state written by two ranks resumes again with one."""
    launcher = tmp_path / "refound_main.py"
    launcher.write_text(LAUNCHER)
    out = tmp_path / "elastic"
    one = subprocess.run([sys.executable, str(launcher), *_args(pretrain_ds, out, 2), "--workers", "0"],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(launcher), "pretrain", "--out", str(out), "--resume", "--steps", "4", "--workers", "0"],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert "resuming a run of 1 process(es) with 2" in two.stdout and "global batch becomes 16" in two.stdout
    state = json.loads((out / "training" / "state" / "latest.json").read_text())
    meta = json.loads((out / "training" / "state" / state["dir"] / "state.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 4
    # 40 regions: steps 1-2 took 16 (one process x 8), steps 3-4 take 2 x 16 = 32 > 24 left, so
    # step 3 ends epoch 0 (24 // 16 = 1 whole step) and step 4 opens epoch 1
    assert meta["counters"]["epoch"] == 1 and meta["counters"]["consumed"] == 16
    back = subprocess.run([sys.executable, str(launcher), "pretrain", "--out", str(out), "--resume", "--steps", "5",
                           "--workers", "0"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert back.returncode == 0, back.stderr[-3000:]
    assert [r["step"] for r in read_log(out / "training")] == [1, 2, 3, 4, 5]
    assert (out / "model.safetensors").exists()
