"""The ``refound`` command: one entry point, one module per subcommand.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
Command modules import only argparse-level things at top level (heavy imports go inside
``run``), so ``refound --help`` stays fast and a missing optional dependency only breaks the
command that needs it.

One error path (docs/ROBUSTNESS.md): bad input raises ``refound_core.errors.InputError`` and is
printed as one line naming the input and what to do. No traceback unless ``--debug``. Exit codes:

    0   success
    1   internal error (a bug, or the system failed: disk full, out of memory); one line
    2   bad input (a file, flag, extent, checkpoint ...): the message says what to change
    130 interrupted (Ctrl-C / SIGINT); 143 terminated (SIGTERM, e.g. ``timeout``)

On SIGINT and SIGTERM the run unwinds like an exception, so partial outputs (``.NAME.tmp``) and
output locks are removed; the target file is never left half-written.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
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


EXIT_INTERNAL, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so cleanup runs as for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The full parser. Only the subcommand named in ``argv`` (if any) has its module imported,
    so a broken or slow optional command never breaks the others."""
    parser = argparse.ArgumentParser(
        prog="refound",
        description="ReFound urban region foundation model (Xiao et al., KDD 2024): data, training, inference.",
        epilog="exit status: 0 success, 1 internal error, 2 bad input, 130 interrupted, 143 terminated",
    )
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of an error (also: REFOUND_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in (argv or []) if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="print the full traceback of an error")
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
    debug = bool(getattr(args, "debug", False)) or os.environ.get("REFOUND_DEBUG", "") not in ("", "0")
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (an embedding caller): leave signals alone
        previous = None
    try:
        return int(_load(args._module).run(args) or 0)
    except (CommandError, InputError) as exc:
        if debug:
            _traceback()
        print(f"refound {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except Terminated:
        print(f"refound {args.command}: terminated (SIGTERM); partial outputs removed, run the same command "
              "again to resume where it supports resuming", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"refound {args.command}: interrupted; partial outputs removed", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        print(f"refound {args.command}: error: out of memory; use a smaller --batch-size or extent", file=sys.stderr)
        return EXIT_INTERNAL
    except OSError as exc:  # the system failed (disk full, file vanished): not a bug, still not bad input
        if debug:
            _traceback()
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"refound {args.command}: error: {exc.strerror or exc}{where}; check free disk space and "
              "permissions (--debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    except Exception as exc:  # noqa: BLE001 - the one place internal errors become one line
        if debug:
            _traceback()
        print(f"refound {args.command}: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
              " (run again with --debug for the traceback, and please report it)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _traceback() -> None:
    import traceback

    traceback.print_exc(file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
