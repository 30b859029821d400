"""``refound convert-paddle``: official PaddlePaddle ReFound weights -> refound checkpoint folder.

Example::

    refound convert-paddle --weights refound.pdparams --config official_config.json --out ckpt/refound_official
    refound convert-paddle --weights uvd_ft.pdparams --config official_config.json --out ckpt/uvd --task uvd

The .pdparams pickle is read with a restricted unpickler that only rebuilds numpy arrays
(refound_core/model/convert_paddle.py); paddle is not needed.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="official weights: .pdparams (paddle.save state dict) or .npz")
    parser.add_argument("--config", required=True, help="official model configuration as JSON (keys of configuration.py)")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--task", choices=("uvd", "pop", "cap"), default=None,
                        help="also convert this task's fine-tuned head (target_prediction.*, attn_agg.*)")
    parser.add_argument("--fusion", choices=("average", "attention"), default=None,
                        help="region fusion of the head (default: the config's 'agg': avr -> average, attn -> attention)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer vocab folder to store in the checkpoint")
    parser.add_argument("--category-vocab", default=None, help="POI category vocabulary file to store in the checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint folder")


def run(args: argparse.Namespace) -> int:
    from refound_core.model.convert_paddle import convert

    summary = convert(args.weights, args.config, args.out, task=args.task, fusion=args.fusion,
                      tokenizer_dir=args.tokenizer, category_vocab=args.category_vocab, overwrite=args.overwrite)
    cfg = summary["config"]
    print(f"wrote {summary['out']}: {cfg['num_layers']} layers x {cfg['hidden_size']} hidden, "
          f"{summary['num_params']:,} backbone parameters")
    if summary["task"]:
        print(f"head: {summary['task']['name']} ({summary['task']['kind']}, fusion {summary['fusion']})")
    if summary["ignored"]:
        print(f"ignored {len(summary['ignored'])} non-encoder tensors (pre-training heads), e.g. {summary['ignored'][:3]}")
    return 0
