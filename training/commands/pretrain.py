"""``refound pretrain``: pre-train ReFound on a region dataset and its teacher cache (paper 4.2, A.2.1).

Settings come from, lowest to highest precedence: the defaults (the paper's, ``TrainConfig``),
the saved configuration of the run when ``--resume`` is given, a ``--config`` file (YAML or JSON
with the same keys; ``model:`` and ``losses:`` sections), and the command-line flags. The resolved
configuration is written to ``CKPT/training/pretrain_config.json``.

Examples::

    refound pretrain --preset tiny --data DS --steps 200 --out runs/tiny
    refound pretrain --preset base --data DS --epochs 300 --out runs/base      # paper A.2.1
    refound pretrain --out runs/base --resume                                  # after a crash
    refound pretrain --init runs/base --data MY_IMAGERY --steps 500 --out runs/base-mine  # continued
    torchrun --nproc_per_node 4 -m training.cli pretrain --preset base --data DS --epochs 300 \\
        --batch-size 20 --out runs/base                                       # 4 GPUs, global batch 80
    refound pretrain ... --no-cmsa          # ablation "w/o CMSA" (paper 5.2.2); --no-moge = "w/o MoGE"
"""
from __future__ import annotations

import json
import sys

from training.pretrain.options import ABLATION_FLAGS, S, add_arguments, resolve_config  # noqa: F401 - the command's interface


def run(args) -> int:
    from refound_core.errors import InputError
    from training.pretrain.engine import NonFiniteLossError, TrainConfig, train

    d = resolve_config(args)
    try:
        cfg = TrainConfig.from_dict(d)
    except TypeError as exc:
        raise InputError(f"bad pre-training settings: {exc}") from None
    try:
        result = train(cfg, resume=bool(getattr(args, "resume", False)))
    except NonFiniteLossError as exc:
        print(f"refound pretrain: stopped: {exc}", file=sys.stderr)
        return 3
    if not result.is_main:
        return 0
    shown = {k: round(v, 4) for k, v in result.last.items() if k in ("loss", "dlfm", "dvfm", "dvlfm", "mgdm", "cmsa")}
    print(json.dumps({"checkpoint": str(result.out), "steps": result.steps, "skipped": result.skipped,
                      "last": shown}))
    return 0
