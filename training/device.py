"""Device choice shared by the headless commands: ``auto`` = CUDA when present, else CPU with a notice."""
from __future__ import annotations

import sys

from refound_core.errors import InputError


def resolve_device(name: str = "auto") -> str:
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        print("notice: no CUDA GPU found, running on the CPU", file=sys.stderr)
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name} was asked for but torch sees no CUDA GPU "
                         f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu or auto")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise InputError(f"--device {name!r} is not one of auto, cpu, cuda, cuda:N")
    return name
