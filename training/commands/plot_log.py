"""``refound plot-log RUN_DIR --out PNG``: loss curves of a pre-training run (every loss term)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of `refound pretrain` (or its training/)")
    p.add_argument("--out", metavar="PNG", required=True, help="image file to write")
    p.add_argument("--smooth", type=int, default=0, help="moving-average window in steps (0 = auto)")


def run(args) -> int:
    from training.pretrain.plot import plot_log

    path = plot_log(args.run_dir, args.out, smooth=args.smooth)
    print(path)
    return 0
