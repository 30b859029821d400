#!/usr/bin/env python
"""Accuracy cost of int8 dynamic quantisation (``refound predict --int8``) on evaluation tasks
(run on request; not a test). For each fine-tuned checkpoint: predictions of every region of the
dataset in float32 and in int8 (same Predictor code path as `refound predict`), the task metrics
on the checkpoint's own test split (its ``split_seed``), beside the default precision (bf16 autocast
where the CPU has it), the largest and mean prediction change, and the time of each pass. Prints one JSON line per checkpoint.

    .venv/bin/python benchmarks/bench_int8_accuracy.py --data demo_out/city_ds \
        --checkpoint demo_out/head_urban_village --checkpoint demo_out/head_population
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]


def _predict(predictor, samples):
    import numpy as np

    t0 = time.perf_counter()
    values = np.array([r.value for r in predictor.predict_samples(samples)], dtype=np.float64)
    return values, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="labelled region dataset (e.g. demo_out/city_ds)")
    p.add_argument("--checkpoint", action="append", required=True, help="fine-tuned checkpoint; repeatable")
    p.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args(argv)
    import numpy as np
    import torch
    from bench_density import machine_load

    from refound_core.data.dataset import RegionDataset
    from refound_core.inference.predictor import Predictor
    from training.finetune.evaluate import make_split
    from training.finetune.metrics import task_metrics

    torch.set_num_threads(torch.get_num_threads())
    ds = RegionDataset(a.data)
    samples = [ds[i] for i in range(len(ds))]
    load_start = machine_load()
    for ckpt in a.checkpoint:
        fp32 = Predictor(ckpt, device="cpu", batch_size=a.batch_size)
        fp32.precision = type(fp32.precision)("cpu", "float32", "bench: float32 reference")
        task = fp32.task_meta
        y = np.asarray(ds.labels[task.get("label", task["name"])], dtype=np.float64)
        split = make_split(y, int(task.get("split_seed", 0)), kind=task["kind"])
        ref, t_ref = _predict(fp32, samples)
        auto = Predictor(ckpt, device="cpu", batch_size=a.batch_size)  # what predict uses by default (bf16 here)
        dflt, t_dflt = _predict(auto, samples)
        q = Predictor(ckpt, device="cpu", batch_size=a.batch_size, int8=True)
        got, t_q = _predict(q, samples)
        ok = np.isfinite(ref) & np.isfinite(got)

        def metrics(v):
            return task_metrics(task["kind"], y[split.test], v[split.test], y_val=y[split.val], val_pred=v[split.val])

        m_ref, m_q = metrics(ref), metrics(got)
        scale = float(np.std(ref[ok])) or 1.0
        print(json.dumps({
            "checkpoint": str(ckpt), "task": task["name"], "kind": task["kind"], "regions": int(ok.sum()),
            "test_regions": int(len(split.test)), "fp32": m_ref, "int8": m_q,
            auto.precision.dtype_name + " (default)": metrics(dflt),
            "delta": {k: m_q[k] - m_ref[k] for k in m_ref if k != "threshold"},
            "max_abs_change": float(np.max(np.abs(got[ok] - ref[ok]))),
            "mean_abs_change_over_sd": float(np.mean(np.abs(got[ok] - ref[ok])) / scale),
            "seconds_fp32": round(t_ref, 2), "seconds_default": round(t_dflt, 2), "seconds_int8": round(t_q, 2),
            "speedup": round(t_ref / t_q, 3) if t_q else None, "load_start": load_start, "load_end": machine_load(),
        }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
