"""scripts/gpu_check.sh --dry-run (CPU, tiny sizes) writes one JSON with every step and sane values,
so the GPU check is known to work before a GPU is lent."""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_sane_json(tmp_path, shared_dir):
    out = tmp_path / "check.json"
    env = dict(os.environ, REFOUND_SHARED=str(shared_dir))
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out),
                        "--work", str(tmp_path / "work")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] is True and res["info"]["device"] == "cpu"
    for step in ("pytest_gpu", "matmul_peak", "inference_base", "inference_small", "pretrain"):
        assert res[step]["ok"] is True, (step, res[step].get("error"))
        assert res[step]["seconds"] >= 0
    assert res["pytest_gpu"]["returncode"] == 0 and res["pytest_gpu"]["collect_only"] is True
    assert res["matmul_peak"]["bf16_tflop_per_s"] > 0 and res["matmul_peak"]["fp32_tflop_per_s"] > 0
    for name in ("inference_base", "inference_small"):
        inf = res[name]
        assert inf["regions"] == 4 and inf["regions_per_s"] > 0 and inf["tflop_per_s"] > 0
        assert 0 < inf["peak_fraction"] < 10 and math.isfinite(inf["peak_fraction"])
        assert inf["precision"] in ("bfloat16", "float32") and inf["peak_gpu_mem_gb"] is None
    pre = res["pretrain"]
    assert pre["steps"] == 2 and pre["regions_per_s"] > 0 and 0 <= pre["data_wait"] <= 1
    assert res["peak_gpu_mem_gb"] is None and res["total_seconds"] > 0
    assert {"load_1m", "cpus"} <= res["load_start"].keys() and res["load_end"]["cpus"] >= 1
