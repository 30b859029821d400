"""The ``refound`` command: one entry point, one module per subcommand.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
Command modules import only argparse-level things at top level (heavy imports go inside
``run``), so ``refound --help`` stays fast and a missing optional dependency only breaks the
command that needs it. Bad input raises ``refound_core.errors.InputError``: one line, exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from refound_core.errors import InputError

# name -> (module, one-line help). Order is the order shown in --help.
COMMANDS = {
    "doctor": ("training.commands.doctor", "report versions, device (CUDA / CPU bf16-AMX) and installed teachers"),
    "synthcity": ("training.commands.synthcity", "generate a seeded synthetic city (imagery, POIs, labels)"),
    "build-dataset": ("training.commands.build_dataset", "build a region dataset folder from files or a synthetic city"),
    "build-corpus": ("training.commands.build_corpus", "materialise a real-imagery manifest (fetched snapshots) into a region dataset"),
    "add-label": ("training.commands.add_label", "add a label column to a dataset from any raster or vector layer"),
    "teachers": ("training.commands.teachers", "compute and cache the teacher outputs of a dataset for pre-training"),
    "pretrain": ("training.commands.pretrain", "pre-train ReFound with the five objectives (one CPU to many GPUs)"),
    "probe": ("training.commands.probe", "real-imagery probe: ridge R² of frozen image embeddings, grouped by scene"),
    "plot-log": ("training.commands.plot_log", "draw the loss curves of a pre-training run to PNG"),
    "finetune": ("training.commands.finetune", "fine-tune (or train a frozen-backbone head) on a downstream task"),
    "evaluate": ("training.commands.evaluate", "run the paper's evaluation protocol: splits, runs, baselines, tables"),
    "ablate": ("training.commands.ablate", "ablation study (paper 5.2.2, Figure 3): pre-train and evaluate each variant"),
    "attention-view": ("training.commands.attention_view", "draw POI -> image-patch attention on a cell (paper 5.2.3, Figure 4)"),
    "predict": ("refound_core.inference.commands.predict", "predict a task over an extent to a styled GeoPackage"),
    "embed": ("refound_core.inference.commands.embed", "compute region embeddings over an extent to GeoParquet"),
    "explore": ("training.commands.explore", "explore embeddings: similar cells, clusters, PCA colours, change between dates"),
    "serve": ("refound_core.inference.commands.serve", "run the local model backend for the QGIS plugin (loopback, token)"),
    "convert-paddle": ("training.commands.convert_paddle", "convert official PaddlePaddle ReFound weights to a checkpoint"),
}


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The full parser. Only the subcommand named in ``argv`` (if any) has its module imported,
    so a broken or slow optional command never breaks the others."""
    parser = argparse.ArgumentParser(
        prog="refound",
        description="ReFound urban region foundation model (Xiao et al., KDD 2024): data, training, inference.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in (argv or []) if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == wanted:
            _load(module).add_arguments(p)
    return parser


def _load(module: str):
    return importlib.import_module(module)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(_load(args._module).run(args) or 0)
    except (CommandError, InputError) as exc:
        print(f"refound {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"refound {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
