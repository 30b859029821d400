#!/usr/bin/env python
"""Inference benchmarks (run on request; not a test). Results: a table on stdout and a JSON file.

Part A - model throughput (regions/s, achieved FLOP/s, fraction of a measured bf16 matmul peak):
  * ReFound ``refound_base`` (paper A.2.1), random init, as ``Predictor`` runs it:
      - ``refound-512``: every region with a full 512-token POI sequence (worst case, same input
        size as the baseline);
      - ``refound-bucketed``: POI sequences of realistic lengths (per-cell POI counts of the 8 km
        synthetic city when generated, else a log-normal draw), sorted by length and padded per
        batch only (the predictor's batching) - the POI-dense synthetic city;
      - ``refound-helsinki``: a Helsinki-like density, about 50 real central-Helsinki OSM POIs
        per region, tokenised as the featuriser does (``bench_density.py``);
  * the straightforward alternative: Hugging Face ``BertModel`` (bert-base config) on the
    512-token POI text + ``ViTModel`` (ViT-Base config, 256 x 256 input) on the image, random init
    from configs (no downloads), as two separate models;
  each in float32 (framework default) and under bf16 autocast, batch 12 (paper A.2.2).
  FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass
  (matmuls and attention); the peak is a timed square bf16 (and fp32) matmul on the same device.

Part B - end-to-end ``refound predict`` on a seeded 8 km synthetic city (``generate_city``):
  the per-stage breakdown (grid, POI join, image reads, featurisation, model, write) and the peak
  RSS at 1x cells (a 4 km x 4 km quarter) vs 4x cells (the whole 8 km city), each in a fresh
  process so peak RSS is per run. Constant peak RSS across 1x/4x = memory independent of extent.

The machine load (``os.getloadavg``) is recorded at the start and the end, and the last line
printed is one JSON object: ``vs_naive_fp32``, ``vs_naive_bf16`` (regions/s ratios, ReFound in
the predictor's precision vs the naive pipeline) and ``peak_fraction`` (of the bf16 matmul peak)
for the realistic-density (Helsinki-like) case, plus the loads.

Usage::

    .venv/bin/python benchmarks/bench_inference.py --device cpu --out benchmarks/results/inference_cpu.json
    .venv/bin/python benchmarks/bench_inference.py --quick          # tiny configs, a smoke run

On a 2-core CPU the full run takes long (refound_base at batch 12 is ~2 TFLOP per batch); use
``--iters 1`` and ``--e2e-preset small`` there. Every number is printed with the device it came from.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_density import helsinki_lengths, machine_load, summary

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ------------------------------------------------------------------------------------------ utils
def device_info(device) -> dict:
    import torch

    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        info["cores"] = os.cpu_count()
    return info


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, iters: int) -> float:
    """Median seconds of ``fn()`` over ``iters`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def matmul_peak(device, dtype_name: str, n: int, iters: int) -> float:
    """Achieved FLOP/s of an n x n x n matmul (the practical peak used for the fractions)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    with torch.inference_mode():
        sec = timed(lambda: a @ b, device, warmup=2, iters=iters)
    return 2.0 * n ** 3 / sec


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def autocast_ctx(device, bf16: bool):
    import contextlib

    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# ------------------------------------------------------------------------------------ part A
def poi_lengths(n: int, max_tokens: int, seed: int, city_dir=None) -> list:
    """Realistic POI-token counts per region: from the synthetic city's POIs per 256 m cell
    (about 4 tokens per POI incl. [SEP]), else a log-normal draw; clipped to max_tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    counts = None
    if city_dir is not None and (Path(city_dir) / "pois.gpkg").exists():
        import pyogrio

        _, _, geom, _ = pyogrio.raw.read(Path(city_dir) / "pois.gpkg", columns=[])[:4]
        import shapely

        pts = shapely.from_wkb(geom)
        key = np.floor(shapely.get_x(pts) / 256).astype(np.int64) * 1_000_003 + np.floor(shapely.get_y(pts) / 256).astype(np.int64)
        _, per_cell = np.unique(key, return_counts=True)
        counts = rng.choice(per_cell, size=n)
    if counts is None:
        counts = np.round(rng.lognormal(mean=3.0, sigma=1.0, size=n)).astype(int)
    return [int(min(max_tokens, 1 + 4 * c)) for c in counts]


def refound_batches(cfg, lengths: list, batch: int, device, seed: int) -> list:
    """Collated batches (as the predictor builds them: sorted by length, padded per batch)."""
    import numpy as np
    import torch

    from refound_core.data.featurize import collate
    from refound_core.data.sample import EncodedRegion

    rng = np.random.default_rng(seed)
    regions = []
    for i, n in enumerate(sorted(lengths, reverse=True)):
        n_poi = max(1, (n - 1) // 4)
        tok = rng.integers(1000, cfg.vocab_size, n).astype(np.int64)
        tok[0] = 101
        regions.append(EncodedRegion(
            cell_id=str(i), token_ids=tok, word_pos=np.arange(n) % 4, poi_pos=np.minimum(np.arange(n) // 4, n_poi),
            grid_pos=rng.integers(1, cfg.grid_cells ** 2 + 1, n), category_ids=rng.integers(2, cfg.num_categories, n),
            image=rng.integers(0, 255, (3, cfg.image_size, cfg.image_size), dtype=np.uint8),
            has_pois=True, has_image=True, image_coverage=1.0, num_pois=n_poi, num_pois_total=n_poi))
    out = []
    for s in range(0, len(regions), batch):
        b = collate(regions[s:s + batch], cfg.image_size, grid_cells=cfg.grid_cells)
        out.append({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()})
    return out


def bench_models(args, device, peak_bf16: float) -> list:
    import torch
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    from refound_core.model.config import preset
    from refound_core.model.refound import ReFound

    torch.manual_seed(0)
    overrides = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128) if args.quick else {}
    cfg = preset("base", **overrides)
    model = ReFound(cfg).to(device).eval()
    bert_cfg = BertConfig(**({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                              "intermediate_size": 128} if args.quick else {}))
    vit_cfg = ViTConfig(image_size=cfg.image_size, patch_size=cfg.patch_size,
                        **({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "intermediate_size": 128} if args.quick else {}))
    bert, vit = BertModel(bert_cfg).to(device).eval(), ViTModel(vit_cfg).to(device).eval()
    b, L = args.batch, cfg.max_poi_tokens
    ids = torch.randint(1000, bert_cfg.vocab_size, (b, L), device=device)
    mask = torch.ones(b, L, dtype=torch.long, device=device)
    pixels = torch.randn(b, 3, cfg.image_size, cfg.image_size, device=device)

    full = refound_batches(cfg, [L] * b, b, device, seed=1)
    n_buck = b * args.bucket_batches
    buck = refound_batches(cfg, poi_lengths(n_buck, L, seed=2, city_dir=args.city_dir), b, device, seed=3)
    hel = refound_batches(cfg, helsinki_lengths(n_buck, L, seed=4), b, device, seed=5)

    def run_baseline():
        bert(input_ids=ids, attention_mask=mask)
        vit(pixel_values=pixels)

    def run_refound(batches):
        def go():
            for bt in batches:
                model.forward_batch(bt)
        return go

    cases = [("baseline BERT+ViT (512 tok)", run_baseline, b),
             ("refound-512", run_refound(full), b),
             ("refound-bucketed", run_refound(buck), n_buck),
             ("refound-helsinki", run_refound(hel), n_buck)]
    rows = []
    for name, fn, regions in cases:
        for bf16 in (False, True):
            if bf16 and device.type == "cpu" and not args.cpu_bf16:
                from refound_core.model.precision import choose_precision

                if not choose_precision("cpu").enabled:
                    rows.append({"case": name, "precision": "bf16", "skipped": "CPU without native bf16"})
                    continue

            def step():
                with torch.inference_mode(), autocast_ctx(device, bf16):
                    fn()

            flops = count_flops(step)  # doubles as the first warm-up pass
            sec = timed(step, device, warmup=args.warmup, iters=args.iters)
            rows.append({"case": name, "precision": "bf16 autocast" if bf16 else "fp32", "regions": regions,
                         "seconds": sec, "regions_per_s": regions / sec, "flops": flops,
                         "flop_per_s": flops / sec, "frac_of_bf16_peak": flops / sec / peak_bf16})
            print(f"  {name:<30} {rows[-1]['precision']:<14} {regions / sec:8.2f} regions/s "
                  f"{flops / sec / 1e12:7.3f} TFLOP/s ({100 * flops / sec / peak_bf16:5.1f}% of bf16 peak)", flush=True)
    return rows


# ------------------------------------------------------------------------------------ part B
E2E_CHILD = r"""
import json, sys
from refound_core.inference.pipeline import AnalysisRequest, run_analysis
a = json.loads(sys.argv[1])
res = run_analysis(AnalysisRequest(**a))
print("E2E_RESULT " + json.dumps({"cells": res.cells, "predicted": res.predicted, "timings": res.timings,
                                   "peak_rss_mb": res.peak_rss_mb, "device": res.device, "precision": res.precision}))
"""


def build_checkpoint(folder: Path, preset_name: str, city_dir: Path) -> Path:
    """A random-weight checkpoint of ``preset_name`` with an urban-village head and the city's
    category vocabulary (speed does not depend on the weights)."""
    import pyogrio
    import torch

    from refound_core.data.tokenizer import PoiTokenizer
    from refound_core.data.vocab import CategoryVocab
    from refound_core.model.checkpoint import save_checkpoint
    from refound_core.model.config import preset
    from refound_core.model.heads import TaskHead
    from refound_core.model.refound import ReFound

    ckpt = folder / f"ckpt_{preset_name}"
    if (ckpt / "config.json").exists():
        return ckpt
    torch.manual_seed(0)
    cats = pyogrio.read_dataframe(city_dir / "pois.gpkg", columns=["category"], read_geometry=False)["category"]
    vocab = CategoryVocab.build(cats)
    tok = PoiTokenizer.default()
    tok.extend_with_characters(pyogrio.read_dataframe(city_dir / "pois.gpkg", columns=["name"],
                                                      read_geometry=False)["name"])
    tok_dir = folder / "tokenizer"
    tok.save(tok_dir)
    cfg = preset(preset_name, vocab_size=len(tok), num_categories=len(vocab))
    save_checkpoint(ckpt, ReFound(cfg), TaskHead(cfg.hidden_size, kind="binary", fusion="attention"),
                    task={"name": "urban_village", "kind": "binary"}, tokenizer_dir=tok_dir, category_vocab=vocab,
                    overwrite=True)
    return ckpt


def ensure_city(args) -> Path:
    """The seeded synthetic city of part B (generated once into the work folder)."""
    from refound_core.data.synthcity import generate_city

    city = Path(args.city_dir)
    if not (city / "meta.json").exists():
        print(f"generating the {args.city_km:g} km synthetic city into {city} ...", flush=True)
        t0 = time.perf_counter()
        generate_city(city, seed=0, size_km=args.city_km)
        print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    return city


def bench_e2e(args, device) -> list:
    work = Path(args.work)
    city = ensure_city(args)
    meta = json.loads((city / "meta.json").read_text())
    x0, y1 = meta["origin_x"], meta["origin_y"]
    size = meta["size_px"] * meta["pixel_size_m"]
    preset_name = args.e2e_preset or ("base" if device.type == "cuda" else "small")
    ckpt = build_checkpoint(work, preset_name, city)
    extents = {"1x": (x0, y1 - size / 2, x0 + size / 2, y1), "4x": (x0, y1 - size, x0 + size, y1)}
    rows = []
    for label, ext in extents.items():
        out = work / f"e2e_{label}.gpkg"
        req = {"checkpoint": str(ckpt), "task": "urban_village", "out": str(out), "extent": list(ext),
               "extent_crs": meta["crs"], "pois": str(city / "pois.gpkg"), "imagery": str(city / "imagery.tif"),
               "device": str(device), "batch_size": args.e2e_batch, "int8": bool(args.e2e_int8)}
        env = dict(os.environ, PYTHONPATH=str(REPO))
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", E2E_CHILD, json.dumps(req)], capture_output=True, text=True,
                             env=env, cwd=REPO)
        wall = time.perf_counter() - t0
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("E2E_RESULT ")]
        if res.returncode != 0 or not line:
            raise RuntimeError(f"end-to-end run {label} failed:\n{res.stderr[-3000:]}")
        r = json.loads(line[0].split(" ", 1)[1])
        r.update({"scale": label, "preset": preset_name, "process_wall_s": wall, "extent": ext,
                  "int8": bool(args.e2e_int8)})
        rows.append(r)
        t = r["timings"]
        print(f"  {label}: {r['cells']} cells, {r['cells'] / max(t['total'] - t.get('load', 0), 1e-9):.2f} cells/s after model load, peak RSS {r['peak_rss_mb']:.0f} MB; "
              + ", ".join(f"{k} {t[k]:.1f}s" for k in ("grid", "poi_join", "image_reads", "featurize", "model", "write")),
              flush=True)
    return rows


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--batch", type=int, default=12, help="batch size of part A (paper A.2.2: 12)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations, median reported (default 5 GPU, 1 CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="extra warm-up passes after the FLOP-counting pass (default 2 GPU, 0 CPU)")
    p.add_argument("--bucket-batches", type=int, default=4, help="batches of realistic-length regions in refound-bucketed")
    p.add_argument("--peak-n", type=int, default=None, help="matmul size for the peak (default 8192 GPU, 2048 CPU)")
    p.add_argument("--cpu-bf16", action="store_true", help="also time bf16 on CPUs without native bf16 (emulated)")
    p.add_argument("--skip-model", action="store_true", help="skip part A")
    p.add_argument("--skip-e2e", action="store_true", help="skip part B")
    p.add_argument("--city-km", type=float, default=8.0)
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "refound_bench"), help="work folder (city, checkpoints)")
    p.add_argument("--city-dir", default=None, help="synthetic city folder (default WORK/city_<km>km)")
    p.add_argument("--e2e-preset", default=None, help="model preset of part B (default: base on CUDA, small on CPU)")
    p.add_argument("--e2e-batch", type=int, default=None)
    p.add_argument("--e2e-int8", action="store_true", help="part B with `refound predict --int8` (CPU int8 dynamic quantisation)")
    p.add_argument("--quick", action="store_true", help="tiny configs and a 1 km city: a smoke run of the script")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.warmup, args.city_km, args.bucket_batches = 1, 0, min(args.city_km, 1.024), 2
        args.e2e_preset = args.e2e_preset or "tiny"
    Path(args.work).mkdir(parents=True, exist_ok=True)
    args.city_dir = args.city_dir or str(Path(args.work) / f"city_{args.city_km:g}km")

    from refound_core.inference.predictor import resolve_device

    device, notice = resolve_device(args.device)
    if args.iters is None:
        args.iters = 5 if device.type == "cuda" else 1
    if args.warmup is None:
        args.warmup = 2 if device.type == "cuda" else 0
    if notice:
        print(f"notice: {notice}")
    results = {"info": device_info(device), "args": vars(args), "load_start": machine_load()}
    print(json.dumps(results["info"]))
    n = args.peak_n or (8192 if device.type == "cuda" else 2048)
    if args.quick:
        n = min(n, 512)
    results["peak"] = {"matmul_n": n, "bf16_flop_per_s": matmul_peak(device, "bfloat16", n, max(args.iters, 3)),
                       "fp32_flop_per_s": matmul_peak(device, "float32", n, max(args.iters, 3))}
    print(f"matmul peak on {device}: bf16 {results['peak']['bf16_flop_per_s'] / 1e12:.3f} TFLOP/s, "
          f"fp32 {results['peak']['fp32_flop_per_s'] / 1e12:.3f} TFLOP/s (n={n})", flush=True)
    if not args.skip_model:
        if not args.skip_e2e:
            ensure_city(args)  # part A then draws realistic POI lengths from the city's cells
        print(f"part A: model throughput on {device}, batch {args.batch}", flush=True)
        results["models"] = bench_models(args, device, results["peak"]["bf16_flop_per_s"])
    if not args.skip_e2e:
        print(f"part B: end-to-end predict on the {args.city_km:g} km synthetic city, {device}", flush=True)
        results["e2e"] = bench_e2e(args, device)
    results["load_end"] = machine_load()
    results["summary"] = summary(results.get("models", []))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
        print(f"wrote {args.out}")
    print(json.dumps({**results["summary"], "load_start": results["load_start"], "load_end": results["load_end"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
