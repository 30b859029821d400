"""``refound doctor``: one report of versions, device and teachers, to attach to any bug report.

Peers' users ask for exactly this (shared/docs/USERS.md items 1, 2, 10): which torch build,
whether the GPU is used, which optional pieces are installed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys

PACKAGES = ("torch", "torchvision", "timm", "transformers", "safetensors", "numpy",
            "rasterio", "pyogrio", "geopandas", "shapely", "pyproj", "pyarrow")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--checkpoint", metavar="CKPT", default=None,
                   help="also report this checkpoint: model, training data and the teachers it was pre-trained with")


def _version(mod_name: str):
    try:
        mod = importlib.import_module(mod_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is a finding to report
        return f"not importable ({type(exc).__name__})"
    return getattr(mod, "__version__", "installed")


def _qgis_version():
    try:
        from qgis.core import Qgis  # noqa: PLC0415 - optional; refound works without QGIS
        return Qgis.QGIS_VERSION
    except Exception:  # noqa: BLE001
        return "not importable (only needed for the plugin)"


def describe_device() -> dict:
    """CUDA GPUs with memory, or the CPU with its bf16 (AMX / AVX512-BF16) support."""
    from refound_core.model.precision import cpu_bf16_features, describe_precision

    info = {"cuda": [], "cpu_bf16": cpu_bf16_features()}
    try:
        import torch
        info["torch_cuda_build"] = torch.version.cuda
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            props = torch.cuda.get_device_properties(i)
            info["cuda"].append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                                 "capability": f"{props.major}.{props.minor}"})
    except Exception as exc:  # noqa: BLE001 - report, never crash the doctor
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
    cpu = info["cpu_bf16"]
    bf16 = "yes" if (cpu["amx_bf16"] or cpu["avx512_bf16"]) else "no"
    cpu_line = f"CPU ({platform.processor() or platform.machine()}), bf16 AMX={'yes' if cpu['amx_bf16'] else 'no'} AVX512-BF16={'yes' if cpu['avx512_bf16'] else 'no'} -> bf16 autocast {bf16}"
    if info["cuda"]:
        gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in info["cuda"])
        info["summary"] = f"CUDA: {gpus}; {describe_precision('cuda')}; also {cpu_line}"
    else:
        info["summary"] = f"no CUDA GPU: {cpu_line}; {describe_precision('cpu')}"
    return info


def collect() -> dict:
    from refound_core import __version__
    from training.commands.teachers import teacher_status
    report = {
        "refound": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "qgis": _qgis_version(),
        "device": describe_device(),
        "teachers": teacher_status(),
    }
    return report


def checkpoint_report(path) -> dict:
    """What a checkpoint says of itself: preset, parameters, task head, data and teachers."""
    from refound_core.model.checkpoint import load_checkpoint, teachers_line, teachers_of

    ck = load_checkpoint(path, with_head=True)
    prov = ck.provenance or {}
    data = (prov.get("training_data") or {}) if isinstance(prov.get("training_data"), dict) else {}
    parts = [p.get("folder") for p in data.get("parts") or []]  # a combined corpus (--data repeated)
    trained_on = ", ".join(dict.fromkeys(parts)) if parts else (data.get("folder") or prov.get("training_data"))
    return {"path": str(ck.path), "model": ck.config.name,
            "parameters": int(sum(p.numel() for p in ck.model.parameters())),
            "task": (ck.task or {}).get("name"), "training_data": trained_on,
            "pretraining": prov.get("pretraining") or (prov.get("base_provenance") or {}).get("pretraining"),
            "teachers": teachers_of(prov), "teachers_line": teachers_line(prov)}


def run(args) -> int:
    report = collect()
    if args.checkpoint:
        report["checkpoint"] = checkpoint_report(args.checkpoint)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"refound {report['refound']}  python {report['python']}")
    print(f"platform   {report['platform']}")
    print(f"QGIS       {report['qgis']}")
    for name, ver in report["packages"].items():
        print(f"{name:<11}{ver}")
    dev = report["device"]
    print("device     " + dev["summary"])
    for dist, pkg in report["teachers"]["packages"].items():
        state = f"yes {pkg['version']}" if pkg["installed"] else "no"
        print(f"teacher    {dist:<34}{state:<12}{pkg['role']}")
    ck = report.get("checkpoint")
    if ck:
        print(f"checkpoint {ck['path']}: {ck['model']}, {ck['parameters']:,} parameters"
              + (f", task head {ck['task']}" if ck["task"] else ""))
        print(f"  trained on {ck['training_data']}")
        print(f"  teachers   {ck['teachers_line']}")
        for role, ident in ck["teachers"].items():
            print(f"    {role:<10} {ident}")
    return 0
