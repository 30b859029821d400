"""Process-group set-up from torchrun's environment (one CPU process up to many GPUs).

``torchrun --nproc_per_node N -m training.cli pretrain ...`` sets ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``; without them the run is a single process and nothing here talks to a process
group. Backend: NCCL when every rank has its own GPU, gloo on CPU. Rank 0 alone logs and saves
(``DistInfo.is_main``); every other side effect is the same on all ranks.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from refound_core.errors import InputError


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` = this rank's GPU when CUDA is available, else the CPU."""
    pref = (preference or "auto").lower()
    if pref not in ("auto", "cpu", "cuda") and not pref.startswith("cuda:"):
        raise InputError(f"--device must be auto, cpu or cuda, got {preference!r}")
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError("--device cuda was requested but torch sees no CUDA GPU; use --device cpu "
                         "or install a CUDA build of torch")
    if pref.startswith("cuda:"):
        return torch.device(pref)
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device_preference: str = "auto") -> DistInfo:
    """Join torchrun's process group when its environment is present; else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world <= 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistInfo(0, 0, 1, device, "")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30), **kwargs)
    return DistInfo(rank, local_rank, world, device, backend)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        if info.backend == "nccl":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """In-place sum over ranks (identity in a single process)."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
