#!/usr/bin/env python
"""Model-only timings of the speed options on Helsinki-like cells (run on request; not a test):
fused (token-major) vs the batch-major reference path, fp32 / bf16 autocast / int8 dynamic
quantisation / torch.compile, one preset. Prints one JSON line per variant and the load.

    .venv/bin/python benchmarks/bench_speedups.py --preset small --batch 12 --batches 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--variants", default="reference_fp32,fused_fp32,fused_bf16,int8,compile_fp32")
    a = p.parse_args(argv)
    import torch
    from bench_density import helsinki_lengths, machine_load
    from bench_inference import refound_batches, timed

    from refound_core.model.config import preset
    from refound_core.model.refound import ReFound
    from refound_core.model.speed import compile_model, quantize_int8

    torch.manual_seed(0)
    cfg = preset(a.preset)
    model = ReFound(cfg).eval()
    dev = torch.device("cpu")
    data = refound_batches(cfg, helsinki_lengths(a.batch * a.batches, cfg.max_poi_tokens, seed=4), a.batch, dev, 5)
    print(json.dumps({"load_start": machine_load(), "preset": cfg.name, "regions": a.batch * a.batches}), flush=True)
    model.encoder.fused = False  # the reference: batch-major path, fp32
    with torch.inference_mode():
        ref = torch.cat([model.forward_batch(b).average() for b in data])
    for v in a.variants.split(","):
        m, bf16 = model, v.endswith("bf16")
        model.encoder.fused = v != "reference_fp32"
        t0 = time.perf_counter()
        if v == "int8":
            m = quantize_int8(model)
        elif v.startswith("compile"):
            import copy

            m = compile_model(copy.deepcopy(model))

        def run(m=m, bf16=bf16):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return torch.cat([m.forward_batch(b).average().float() for b in data])
        out = run()  # warm-up (and compilation)
        prep = time.perf_counter() - t0
        sec = timed(run, dev, warmup=0, iters=a.iters)
        err = float((out - ref).norm() / ref.norm())
        print(json.dumps({"variant": v, "regions_per_s": a.batch * a.batches / sec, "seconds": sec,
                          "first_call_s": prep, "rel_err_vs_fp32_reference": err}), flush=True)
    model.encoder.fused = True
    print(json.dumps({"load_end": machine_load(), "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
