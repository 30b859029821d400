#!/usr/bin/env python
"""One short device check (issue 18), to run the moment a GPU is lent: writes one JSON.

Steps (each timed, each recorded even when it fails):
  1. ``pytest -m gpu`` (the tests that need CUDA);
  2. the measured bf16 (and fp32) matmul peak;
  3. inference throughput of ``refound_base`` and ``refound_small`` on Helsinki-like cells
     (benchmarks/bench_density.py) in the predictor's precision: regions/s, achieved TFLOP/s
     (FlopCounterMode) and its fraction of the bf16 peak;
  4. a 50-step pre-training throughput run (benchmarks/bench_pretrain.py's ``measure``, a seeded
     synthetic city with stub teachers);
  5. peak GPU memory (``torch.cuda.max_memory_allocated``) of steps 3 and 4.

``--dry-run`` runs the same code on the CPU with tiny sizes (refound_tiny, 2 + 2 steps, a 0.5 km
city): CI calls it (tests/test_gpu_check.py) so the script cannot rot while no GPU is lent.
Usage: ``scripts/gpu_check.sh [--dry-run] [--out FILE]`` (default benchmarks/results/gpu_check.json).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _step(results: dict, name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        results[name] = {"ok": True, **fn()}
    except Exception as e:  # recorded, so one failing step does not lose the others' numbers
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    results[name]["seconds"] = time.perf_counter() - t0
    print(f"[gpu_check] {name}: {'ok' if results[name]['ok'] else 'FAILED'} in {results[name]['seconds']:.1f} s",
          file=sys.stderr, flush=True)


def run_pytest(dry: bool) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
    if dry:  # CI: collect only, running the suite inside a test would recurse
        cmd.insert(4, "--collect-only")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    tail = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
    return {"returncode": r.returncode, "summary": tail[0], "collect_only": dry}


def inference(device, preset_name: str, batch: int, batches: int, peak: float, dry: bool) -> dict:
    import torch
    from bench_density import helsinki_lengths
    from bench_inference import count_flops, refound_batches, timed

    from refound_core.model.config import preset
    from refound_core.model.precision import autocast, choose_precision
    from refound_core.model.refound import ReFound

    torch.manual_seed(0)
    cfg = preset("tiny" if dry else preset_name)
    model = ReFound(cfg).to(device).eval()
    data = refound_batches(cfg, helsinki_lengths(batch * batches, cfg.max_poi_tokens, seed=4), batch, device, seed=5)
    choice = choose_precision(device.type)

    def step():
        with torch.inference_mode(), autocast(device.type, choice):
            for b in data:
                model.forward_batch(b)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    flops = count_flops(step)
    sec = timed(step, device, warmup=0 if dry else 2, iters=1 if dry else 5)
    n = batch * batches
    return {"preset": cfg.name, "precision": choice.dtype_name, "batch": batch, "regions": n,
            "regions_per_s": n / sec, "tflop_per_s": flops / sec / 1e12, "peak_fraction": flops / sec / peak,
            "peak_gpu_mem_gb": _peak_mem(device)}


def pretrain(device, dry: bool, work: Path) -> dict:
    from bench_pretrain import measure, synthetic_dataset

    from refound_core.model.config import preset

    name, batch, steps, warmup = ("tiny", 4, 2, 2) if dry else ("base", 32, 50, 3)
    data = synthetic_dataset(work, 0.5 if dry else 1.0, 0, preset(name).patches_per_side)
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    r = measure(data, name, batch, str(device), warmup, steps, 0 if dry else -1, "auto", 0, work)
    return {**{k: r[k] for k in ("preset", "batch", "device", "precision", "steps", "regions_per_s", "s_per_step",
                                 "data_wait")}, "peak_gpu_mem_gb": _peak_mem(device)}


def _peak_mem(device):
    import torch

    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script itself (CI)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_check.json"))
    p.add_argument("--work", default=None, help="scratch folder (default: a temp folder)")
    a = p.parse_args(argv)
    import torch

    from bench_density import machine_load
    from bench_inference import device_info, matmul_peak

    if not a.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device visible to torch; use --dry-run to check the script on the CPU")
    device = torch.device("cpu" if a.dry_run else "cuda")
    work = Path(a.work or tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "dry_run": a.dry_run,
           "info": device_info(device), "load_start": machine_load()}
    _step(res, "pytest_gpu", lambda: run_pytest(a.dry_run))
    n = 256 if a.dry_run else 8192
    _step(res, "matmul_peak", lambda: {"n": n, "bf16_tflop_per_s": matmul_peak(device, "bfloat16", n, 3) / 1e12,
                                       "fp32_tflop_per_s": matmul_peak(device, "float32", n, 3) / 1e12})
    peak = res["matmul_peak"].get("bf16_tflop_per_s", float("nan")) * 1e12
    batch, batches = (4, 1) if a.dry_run else (256, 4)
    for name in ("base", "small"):
        _step(res, f"inference_{name}", lambda name=name: inference(device, name, batch, batches, peak, a.dry_run))
    _step(res, "pretrain", lambda: pretrain(device, a.dry_run, work))
    res["peak_gpu_mem_gb"] = _peak_mem(device) if device.type == "cuda" else None
    res["total_seconds"] = time.perf_counter() - t0
    res["load_end"] = machine_load()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    os.replace(tmp, out)
    print(f"[gpu_check] wrote {out} ({res['total_seconds']:.0f} s)", file=sys.stderr)
    ok = all(v.get("ok") for v in res.values() if isinstance(v, dict) and "ok" in v)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
