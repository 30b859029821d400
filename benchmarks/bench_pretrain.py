#!/usr/bin/env python
"""Pre-training throughput benchmark (run on request; not a test).

Measures ``refound pretrain`` (the real engine, ``training.pretrain.engine.train``) for the given
presets: regions per second and seconds per optimizer step after warm-up steps, and the share of
step time spent waiting for the next batch. Both come from the engine's own per-step log
(``log.jsonl``: ``step_time``, ``regions_per_s``, ``data_wait`` = waiting time / step time), so
the numbers are what a real run reports. One Markdown row per (device, preset, batch size).

Data: ``--data DS`` (a region dataset with a teacher cache for the preset's 16 x 16 patch grid),
or by default a seeded synthetic city (``generate_city``, ``--city-km`` km, 256 px chips) with
stand-in teachers (``refound_core.teachers.stubs``: the objectives run in full, their teacher
targets are small vectors, so the heads are a little cheaper than with the real teachers).

Usage::

    .venv/bin/python benchmarks/bench_pretrain.py --presets small --batch-sizes 8 --steps 3
    .venv/bin/python benchmarks/bench_pretrain.py --presets base --batch-sizes 4 --steps 1 --warmup 1
    .venv/bin/python benchmarks/bench_pretrain.py ... --append docs/BENCHMARKS.md

``--devices`` defaults to the CPU plus CUDA when torch sees a GPU.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HEADING = "## Pre-training throughput"
HEADER = ("| date | machine | device | preset | batch | precision | workers | steps (warm-up + timed) | regions/s "
          "| s/step | data wait | load avg | command |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def machine() -> str:
    """CPU model from /proc/cpuinfo and the cores this process may use."""
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import platform

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model or platform.processor() or platform.machine()}, {cores} cores"


def synthetic_dataset(work: Path, size_km: float, seed: int, patches_per_side: int) -> Path:
    """A seeded synthetic city as a region dataset with a stub-teacher cache (reused when present)."""
    from refound_core.data.dataset import RegionDataset
    from refound_core.data.synthcity import generate_city
    from refound_core.teachers.cache import TeacherCache
    from refound_core.teachers.stubs import stub_teachers
    from training.commands.build_dataset import build, synthcity_spec

    city, ds = work / f"city-{size_km:g}km-s{seed}", work / f"ds-{size_km:g}km-s{seed}"
    if not (ds / "meta.json").is_file():
        if not (city / "meta.json").is_file():
            generate_city(city, seed=seed, size_km=size_km)
        build(out=str(ds), cell_size=256.0, image_size=256, log=lambda m: None, **synthcity_spec(city))
    TeacherCache(ds).get_or_compute(RegionDataset(ds), stub_teachers(codebook_size=64, seed=seed),
                                    patches_per_side=patches_per_side, progress=False)
    return ds


def measure(data: Path, preset: str, batch: int, device: str, warmup: int, steps: int, workers: int,
            precision: str, seed: int, work: Path) -> dict:
    """Run ``warmup + steps`` optimizer steps; statistics over the last ``steps`` of the engine's log."""
    from training.pretrain.engine import TrainConfig, train
    from training.pretrain.logging import read_log

    out = Path(tempfile.mkdtemp(prefix=f"run-{preset}-{device}-b{batch}-", dir=work)) / "ckpt"
    cfg = TrainConfig(data=str(data), out=str(out), preset=preset, steps=warmup + steps, batch_size=batch,
                      warmup_steps=1, save_every=0, log_every=1000, tensorboard=False, device=device,
                      precision=precision, workers=workers, seed=seed)
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    rows = read_log(out / "training")[warmup:]
    resolved = json.loads((out / "training" / "pretrain_config.json").read_text())["resolved"]
    step_time = sum(r["step_time"] for r in rows)
    regions = sum(r["regions_per_s"] * r["step_time"] for r in rows)
    waited = sum(r["data_wait"] * r["step_time"] for r in rows)
    import shutil

    shutil.rmtree(out.parent, ignore_errors=True)
    return {"preset": preset, "batch": batch, "device": resolved["device"], "precision": resolved["precision"],
            "workers": resolved["workers"], "warmup": warmup, "steps": len(rows),
            "regions_per_s": regions / step_time, "s_per_step": step_time / len(rows),
            "data_wait": waited / step_time, "wall_s": wall,
            "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")}


def markdown_row(r: dict, when: str, where: str, command: str) -> str:
    device = r["device"]
    if device.startswith("cuda"):
        import torch
        device = f"{device} ({torch.cuda.get_device_name(0)})"
    precision = r["precision"].split(" (")[0]
    return (f"| {when} | {where} | {device} | {r['preset']} | {r['batch']} | {precision} | {r['workers']} | "
            f"{r['warmup']} + {r['steps']} | {r['regions_per_s']:.2f} | {r['s_per_step']:.2f} | "
            f"{100 * r['data_wait']:.1f}% | {r['load']:.1f} | `{command}` |")


def append_rows(path: Path, rows: list) -> None:
    """Add rows under the '## Pre-training throughput' table of ``path`` (created if missing), atomically."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    lines = text.rstrip("\n").split("\n")
    if HEADING not in lines:
        lines += ["", HEADING, "", "Measured by `benchmarks/bench_pretrain.py` from the engine's per-step log "
                  "(after warm-up steps). data wait = share of step time spent waiting for the next batch; load avg = "
                  "the machine's 1-minute load average at the end (above the core count = shared CPU, slower "
                  "numbers).", "",
                  *HEADER.split("\n")]
        lines += rows
    else:
        start = lines.index(HEADING)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        last_row = max((i for i in range(start, end) if lines[i].startswith("|")), default=None)
        if last_row is None:
            lines[end:end] = ["", *HEADER.split("\n"), *rows]
        else:
            lines[last_row + 1:last_row + 1] = rows
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="small", help="comma-separated presets (tiny, small, base)")
    p.add_argument("--batch-sizes", default="8", help="comma-separated batch sizes, one per preset (or one for all)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--devices", default="auto", help="cpu, cuda, or auto = cpu plus cuda when present")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--workers", type=int, default=-1, help="DataLoader workers (-1 = the engine's choice)")
    p.add_argument("--data", default=None, help="dataset with a 16x16 teacher cache (default: a synthetic city)")
    p.add_argument("--city-km", type=float, default=2.0, help="side of the synthetic city in km (default 2)")
    p.add_argument("--work", default=None, help="folder for the synthetic data and runs (default: a temp folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--append", metavar="MD", default=None, help="append the rows to this Markdown file")
    a = p.parse_args(argv)

    import torch

    from refound_core.model.config import preset as make_preset

    presets = [s.strip() for s in a.presets.split(",") if s.strip()]
    sizes = [int(s) for s in a.batch_sizes.split(",") if s.strip()]
    if len(sizes) == 1:
        sizes = sizes * len(presets)
    if len(sizes) != len(presets):
        p.error("--batch-sizes needs one value, or one per preset")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if a.devices == "auto" else \
        [d.strip() for d in a.devices.split(",") if d.strip()]
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench_pretrain-"))
    work.mkdir(parents=True, exist_ok=True)
    grids = {make_preset(name).patches_per_side for name in presets}
    data = {}
    for g in sorted(grids):
        if a.data:
            data[g] = Path(a.data)
        else:
            t0 = time.perf_counter()
            data[g] = synthetic_dataset(work, a.city_km, a.seed, g)
            print(f"data: synthetic city {a.city_km:g} km (seed {a.seed}) with stub teachers, "
                  f"{time.perf_counter() - t0:.0f} s to prepare: {data[g]}", file=sys.stderr)

    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    where = machine()
    command = "python benchmarks/bench_pretrain.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    rows = []
    print(HEADER)
    for device in devices:
        for name, batch in zip(presets, sizes):
            r = measure(data[make_preset(name).patches_per_side], name, batch, device, a.warmup, a.steps, a.workers,
                        a.precision, a.seed, work)
            row = markdown_row(r, when, where, command)
            rows.append(row)
            print(row, flush=True)
            print(f"  ({r['wall_s']:.0f} s wall incl. model build and checkpoint write)", file=sys.stderr)
    if a.append:
        append_rows(Path(a.append), rows)
        print(f"appended {len(rows)} row(s) to {a.append}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
