"""``refound ablate``: the paper's ablation study (5.2.2, Figure 3) in one command.

Pre-trains one checkpoint per variant (same corpus, seed and steps; only the variant's
``refound pretrain`` flags differ), evaluates each with the paper's protocol, and writes
``OUT/ablation.md`` (variant x task table, mean ± std, data provenance), ``ablation.json`` and
``ablation.png`` (grouped bars as in Figure 3). Run it again after an interruption: finished
variants are reused, a killed pre-training run is resumed. See docs/ABLATIONS.md.

Example::

    refound ablate --pretrain-data corpus_ds --data city_ds --preset small --steps 2000 --out runs/ablation
    refound ablate ... --variants full,no_cmsa --tasks population --mode finetune --runs 5
"""
from __future__ import annotations

import argparse

VARIANT_NAMES = "full,no_moge,no_dlfm,no_dvfm,no_dvlfm,no_dist,no_mgdm,no_cmsa"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pretrain-data", required=True, metavar="DS",
                   help="pre-training corpus: a region dataset with a teacher cache (`refound teachers`)")
    p.add_argument("--data", required=True, metavar="DS", help="downstream region dataset with labels")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: checkpoints/<variant>/, eval/<variant>/, ablation.md/.json/.png")
    p.add_argument("--preset", choices=("tiny", "small", "base"), default="small", help="model size (default small)")
    p.add_argument("--steps", type=int, required=True, help="pre-training optimizer steps of every variant")
    p.add_argument("--variants", default=VARIANT_NAMES,
                   help=f"comma-separated variants (default all eight: {VARIANT_NAMES})")
    p.add_argument("--tasks", default="urban_village,population,commercial",
                   help="comma-separated downstream tasks (default the paper's three)")
    p.add_argument("--mode", choices=("feature", "finetune"), default="feature",
                   help="feature = frozen backbone + head (refound_feature, default: fast on a CPU); "
                        "finetune = full fine-tuning (refound_ft)")
    p.add_argument("--runs", type=int, default=3, help="evaluation runs per variant and task (mean ± std; default 3)")
    p.add_argument("--epochs", type=int, default=None,
                   help="head epochs (feature mode, default 40) or fine-tuning epochs (finetune mode, default 10)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (pre-training and evaluation)")
    p.add_argument("--seed", type=int, default=0, help="seed of pre-training, data order, masks and splits")
    g = p.add_argument_group("pre-training settings shared by every variant (default: the engine's, paper A.2.1)")
    g.add_argument("--pretrain-batch-size", type=int, default=None, help="regions per step (paper: 80)")
    g.add_argument("--pretrain-lr", type=float, default=None, help="peak learning rate (paper: 5e-5)")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps")
    g.add_argument("--teachers", default=None, metavar="CACHE", help="teacher cache folder (default: the matching one)")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    g.add_argument("--workers", type=int, default=-1, help="DataLoader workers (-1 = auto)")
    g.add_argument("--save-every", type=int, default=None, help="steps between resumable states")
    g.add_argument("--pretrain-config", default=None, metavar="FILE", help="YAML/JSON file for `refound pretrain --config`")
    e = p.add_argument_group("evaluation")
    e.add_argument("--batch-size", type=int, default=12, help="evaluation batch size (paper: 12)")
    e.add_argument("--lr", type=float, default=None, help="evaluation learning rate (default: the method's own)")
    e.add_argument("--negative-ratio", type=float, default=None,
                   help="binary tasks: at most this many negatives per positive (paper: 5)")


def _split(text: str) -> list:
    return [v.strip() for v in str(text).split(",") if v.strip()]


def run(args) -> int:
    from pathlib import Path

    from training.finetune.ablation import AblationSettings, run_ablation

    s = AblationSettings(
        pretrain_data=args.pretrain_data, data=args.data, out=args.out, steps=args.steps, preset=args.preset,
        variants=tuple(_split(args.variants)), tasks=tuple(_split(args.tasks)), mode=args.mode, runs=args.runs,
        epochs=args.epochs, device=args.device, seed=args.seed, pretrain_batch_size=args.pretrain_batch_size,
        pretrain_lr=args.pretrain_lr, warmup_steps=args.warmup_steps, teachers=args.teachers,
        precision=args.precision, workers=args.workers, save_every=args.save_every,
        pretrain_config=args.pretrain_config, batch_size=args.batch_size, lr=args.lr,
        negative_ratio=args.negative_ratio)
    run_ablation(s, log=lambda m: print(m, flush=True))
    print((Path(args.out) / "ablation.md").read_text(encoding="utf-8"))
    return 0
