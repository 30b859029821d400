"""``refound serve``: run a checkpoint as a local backend for the QGIS plugin (docs/BACKEND.md).

Example::

    refound serve --checkpoint ckpt/uvd --device auto --port 0

Binds 127.0.0.1 only. Prints the URL and a one-line JSON ready message
(``REFOUND_BACKEND_READY {"url": ..., "token_file": ...}``); the per-process token is written to a
file only the current user can read. ``--allow-remote --token T`` is required for any other address.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder to serve")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --allow-remote)")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0 = any free port, printed)")
    parser.add_argument("--allow-remote", action="store_true", help="permit a non-loopback --host (needs --token)")
    parser.add_argument("--token", default=None, help="use this token instead of a random one (required with --allow-remote)")
    parser.add_argument("--token-file", default=None, help="where to write the token (default: a private temp folder)")
    parser.add_argument("--batch-size", type=int, default=None, help="regions per forward pass")
    parser.add_argument("--max-body-mb", type=float, default=64.0, help="largest accepted request body in MiB")
    parser.add_argument("--debug-batch-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # tests only


def run(args: argparse.Namespace) -> int:
    import logging

    from refound_core.backend.server import serve

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return serve(args.checkpoint, device=args.device, host=args.host, port=args.port, token=args.token,
                 allow_remote=args.allow_remote, token_file=args.token_file, batch_size=args.batch_size,
                 max_body_bytes=int(args.max_body_mb * 1024 * 1024), batch_delay_s=args.debug_batch_delay)
