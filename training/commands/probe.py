"""``refound probe``: the real-imagery probe (docs/EVALUATION.md, "Real-imagery probe").

Frozen image-side embeddings of each ``--checkpoint`` (h[S], image-only forward), the same
architecture at random initialisation, the EfficientNet-Lite0 teacher and eight pixel statistics
(the floor), each fed to a standardised ridge regression of a per-crop target (``building_fraction``
from ``refound build-corpus --manifest data/manifests/real-probe.json``), cross-validated with
whole scenes per fold. Prints a table and writes the numbers to ``--out`` (JSON, atomically).
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("example:\n  refound probe --data runs/real_probe_ds --checkpoint runs/pt/checkpoint --out probe.json\n"
                "rows: each checkpoint, 'random-init' (the first checkpoint's architecture, seeds --seed ..,\n"
                "--random-seeds of them, and 'random-init mean' over them: the baseline to beat),\n"
                "'efficientnet-teacher' (pooled ImageNet EfficientNet-Lite0 features, the default DVFM teacher),\n"
                "'geoembed-teacher' with --teacher geoembed (self-supervised aerial ResNet-18, docs/TEACHERS.md),\n"
                "'pixel-stats' (the floor: mean and sd of R, G, B and the mean neighbouring-pixel difference\n"
                "along x and y, 8 numbers; an embedding that does not beat it knows no more than colour and texture).\n"
                "R2 mean ± sd: over the grouped folds of all --repeats fold seeds (the 'random-init mean' row: sd is the\n"
                "seed-to-seed spread of R2 pool); R2 pool: one R2 over all\n"
                "out-of-fold predictions, averaged over the fold seeds; erank = effective rank;\n"
                "top-PC = variance share of the first principal component of the embeddings.")
    p.add_argument("--data", required=True, help="probe region dataset (images + a per-crop label, scene in cell_id)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="CKPT",
                   help="a ReFound checkpoint folder; repeat to compare several")
    p.add_argument("--target", action="append", default=None, metavar="LABEL",
                   help="label to predict; repeat for several (default: every label of the dataset: "
                        "building_fraction, building_count, building_mean_area_m2 for the probe set)")
    p.add_argument("--folds", type=int, default=5, help="grouped folds (capped at the number of scenes; default 5)")
    p.add_argument("--repeats", type=int, default=3, help="fold seeds: scene-to-fold assignments (default 3)")
    p.add_argument("--alpha-cv", choices=["scenes", "loo"], default="scenes",
                   help="how the ridge alpha is chosen inside each training fold: scenes (default: grouped CV "
                        "over the fold's scenes, so overlapping crops of one scene never sit on both sides) or "
                        "loo (leave-one-crop-out, the first protocol: leaks near-duplicate crops)")
    p.add_argument("--seed", type=int, default=0, help="first seed of the random-initialisation rows (default 0)")
    p.add_argument("--random-seeds", type=int, default=5, metavar="N",
                   help="random initialisations to probe, seeds --seed .. --seed+N-1, plus a row with their mean "
                        "(default 5: one random network's R2 varies by up to 0.3 between seeds on this probe)")
    p.add_argument("--no-random-init", action="store_true", help="skip the random-initialisation row")
    p.add_argument("--teacher", action="append", choices=["efficientnet", "geoembed", "none"], default=None,
                   help="image-teacher row; repeat for several (default: efficientnet; none: no teacher row)")
    p.add_argument("--no-pixel-stats", action="store_true", help="skip the pixel-statistics row (the probe's floor)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--batch-size", type=int, default=16, help="regions per forward pass (default 16)")
    p.add_argument("--out", default=None, help="write the results here as JSON")


def _targets(ds, names):
    """``[(name, values)]``: the labels asked for (default: all of the dataset's labels)."""
    from refound_core.errors import InputError

    names = names or list(ds.label_names)
    if not names:
        raise InputError(f"{ds.folder} has no labels; build it from a manifest with a mask "
                         "(data/manifests/real-probe.json)")
    for name in names:
        if name not in ds.labels:
            raise InputError(f"{ds.folder} has no label {name!r} (it has {ds.label_names}); pass --target")
    return [(name, ds.labels[name]) for name in names]


def format_table(rows) -> str:
    lines = [f"{'embedding':<34} {'dim':>5} {'R2 mean':>8} {'sd':>6} {'R2 pool':>8} {'erank':>7} {'top-PC':>7}"]
    for r in rows:
        lines.append(f"{r['name'][:34]:<34} {r['dim']:>5} {r['r2_mean']:>8.3f} {r['r2_sd']:>6.3f} "
                     f"{r['r2_pooled_mean']:>8.3f} {r['effective_rank']:>7.2f} {r['top_pc_share']:>7.3f}")
    return "\n".join(lines)


def run(args) -> int:
    from pathlib import Path

    import numpy as np

    from refound_core.data.dataset import RegionDataset, _write_json_atomic
    from refound_core.errors import InputError
    from training.finetune import probe

    teachers = [t for t in (args.teacher or ["efficientnet"]) if t != "none"]
    if not args.checkpoint and not teachers and args.no_pixel_stats:
        raise InputError("nothing to probe: pass --checkpoint CKPT and/or --teacher efficientnet|geoembed, "
                         "or drop --no-pixel-stats")
    ds = RegionDataset(args.data)
    targets = _targets(ds, args.target)
    keep = ds.image_coverage > 0
    for name, y in targets:
        keep &= ~np.isnan(y)
    if not keep.all():
        raise InputError(f"{int((~keep).sum())} regions of {ds.folder} lack an image or a "
                         f"{' / '.join(repr(n) for n, _ in targets)} value; the probe needs both in every region")
    groups, scenes = probe.scene_groups(ds)
    seeds = list(range(args.repeats))
    common = dict(folds=args.folds, seeds=seeds, alpha_cv=args.alpha_cv)
    # (name, kind, source, embedding): computed once, probed against every target
    embeddings = []
    for ckpt in args.checkpoint:
        x, _ = probe.checkpoint_image_embeddings(ckpt, ds, device=args.device, batch_size=args.batch_size)
        embeddings.append((Path(ckpt).name if Path(ckpt).name != "checkpoint" else str(ckpt), "checkpoint h[S]",
                           str(ckpt), x))
    if args.random_seeds < 1:
        raise InputError(f"--random-seeds must be at least 1, got {args.random_seeds} (or pass --no-random-init)")
    random_names = []
    if args.checkpoint and not args.no_random_init:
        for seed in range(args.seed, args.seed + args.random_seeds):
            x, _ = probe.checkpoint_image_embeddings(args.checkpoint[0], ds, random_seed=seed, device=args.device,
                                                     batch_size=args.batch_size)
            random_names.append(f"random-init (seed {seed})")
            embeddings.append((random_names[-1], "random h[S]", f"architecture of {args.checkpoint[0]}", x))
    for name in teachers:
        x, ident = probe.teacher_image_embeddings(ds, teacher=name, device=args.device)
        embeddings.append((f"{name}-teacher", "teacher pooled", ident, x))
    if not args.no_pixel_stats:
        samples = [ds[i] for i in range(len(ds))]
        x = probe.pixel_statistics([s.image for s in samples], [s.image_valid for s in samples])
        embeddings.append(("pixel-stats", "pixel statistics", "mean, sd of RGB + mean |grey difference| along x, y", x))
    k = min(args.folds, len(scenes))
    print(f"refound probe: {len(ds)} crops from {len(scenes)} scenes, {k} grouped folds x {len(seeds)} fold seeds")
    results = []
    for target, y in targets:
        rows = [probe.probe_row(name, kind, x, y, groups, source=source, **common)
                for name, kind, source, x in embeddings]
        if len(random_names) > 1:
            at = max(i for i, r in enumerate(rows) if r["name"] in random_names) + 1
            rows.insert(at, probe.mean_row([r for r in rows if r["name"] in random_names],
                                           f"random-init mean ({len(random_names)} seeds)"))
        results.append({"target": target, "target_mean": float(y.mean()), "target_sd": float(y.std()), "rows": rows})
        print(f"\n{target} (mean {y.mean():.3g}, sd {y.std():.3g})")
        print(format_table(rows))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(out, {"data": str(ds.folder), "regions": len(ds), "scenes": scenes, "folds": k,
                                 "fold_seeds": seeds, "targets": results})
        print(f"refound probe: wrote {out}")
    return 0
