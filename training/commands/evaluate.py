"""``refound evaluate``: the paper's evaluation protocol on a region dataset (paper 5.1-5.2).

Random thirds (seeded, saved), best epoch on validation, test metrics, N runs with mean ± std,
for ReFound (fine-tuned and feature-based) and the baselines, written as Markdown + JSON."""
from __future__ import annotations

import argparse

DEFAULT_METHODS = "refound_ft,refound_feature,refound_scratch,refound_scratch_feature"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="downstream region dataset folder (refound build-dataset)")
    p.add_argument("--task", action="append", required=True,
                   help="task to evaluate (repeatable): urban_village, population, commercial, or any label column "
                        "(refound add-label)")
    p.add_argument("--task-kind", choices=["binary", "regression", "multiclass"],
                   help="kind of custom tasks (default: the kind stored by `refound add-label`)")
    p.add_argument("--num-classes", type=int, help="classes of a multiclass custom task (default: from the dataset)")
    p.add_argument("--log-target", choices=["yes", "no"],
                   help="train regressions on log1p(y) (default: yes for population/commercial); metrics stay in original units")
    p.add_argument("--checkpoint", help="pre-trained ReFound checkpoint (needed by the refound_* methods)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated methods (default {DEFAULT_METHODS}); `--list-methods` shows all")
    p.add_argument("--list-methods", action="store_true", help="list the available methods and exit")
    p.add_argument("--runs", type=int, default=5, help="runs per method (mean ± std; default 5)")
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (paper: 30-40; default 10 for CPU)")
    p.add_argument("--warmup-epochs", type=int, default=3,
                   help="linear lr warm-up epochs before the linear decay (paper: 3); keep it below --epochs")
    p.add_argument("--feature-epochs", type=int, default=40, help="epochs of the feature-based heads (paper: 40)")
    p.add_argument("--batch-size", type=int, default=12, help="batch size (paper: 12)")
    p.add_argument("--lr", type=float, help="peak learning rate for every method (default: each method's own)")
    p.add_argument("--fusion", choices=["average", "attention"], help="force one fusion (default per task, paper Tables 5-6)")
    p.add_argument("--data-scale", default="100",
                   help="training-data percentages, e.g. 100,75,50,25,10 for the data-scale analysis (paper 5.2.5)")
    p.add_argument("--negative-ratio", type=float, help="binary tasks: keep at most this many negatives per positive (paper: 5)")
    p.add_argument("--seed", type=int, default=0, help="base seed: run r (0-based) uses split seed+r and training seed seed+1000*r+1; every method sees the same splits")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--cache-dir", help="cache folder for frozen features (default: inside the dataset folder)")
    p.add_argument("--out", required=True, help="output folder for results.md, results.json, split.json, data_scale.png")


def run(args) -> int:
    import training.finetune.refound_methods  # noqa: F401 - registers the ReFound methods
    from training.finetune.methods import REGISTRY

    try:
        import training.finetune.baselines  # noqa: F401 - registers the baselines
    except ImportError as exc:  # pragma: no cover - reported, not fatal
        print(f"note: baselines unavailable ({exc})")
    if args.list_methods:
        for name, cls in sorted(REGISTRY.items()):
            print(f"{name:<26}{cls.mode:<15}{cls.stands_in_for}")
        return 0
    from refound_core.data.dataset import RegionDataset
    from refound_core.errors import InputError
    from training.device import resolve_device
    from training.finetune.evaluate import run_evaluation
    from training.finetune.methods import EvalContext
    from training.finetune.tasks import task_for_dataset

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        fractions = sorted({float(v) / 100.0 for v in args.data_scale.split(",")}, reverse=True)
    except ValueError:
        raise InputError(f"--data-scale {args.data_scale!r} must be comma-separated percentages, e.g. 100,50,10") from None
    if args.warmup_epochs < 0:
        raise InputError(f"--warmup-epochs must be 0 or more, got {args.warmup_epochs}")
    ds = RegionDataset(args.data)
    log_target = None if args.log_target is None else args.log_target == "yes"
    tasks = [task_for_dataset(t, ds, kind=args.task_kind, log_target=log_target, num_classes=args.num_classes)
             for t in args.task]
    ctx = EvalContext(dataset=ds, checkpoint=args.checkpoint, device=resolve_device(args.device), epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, warmup_epochs=args.warmup_epochs, cache_dir=args.cache_dir,
                      options={"fusion": args.fusion, "feature_epochs": args.feature_epochs})
    report = run_evaluation(ctx, tasks, methods, args.out, runs=args.runs, seed=args.seed, fractions=fractions,
                            negative_ratio=args.negative_ratio)
    from pathlib import Path
    print((Path(args.out) / "results.md").read_text(encoding="utf-8"))
    print(f"wrote {args.out}/results.md, results.json, split.json" + (", data_scale.png" if len(fractions) > 1 else ""))
    return 0 if report else 1
