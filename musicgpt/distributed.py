"""Where a training process sits in a torchrun launch, and the agreements its ranks must reach.

One process is rank 0 of 1 and needs none of this; under torchrun (WORLD_SIZE > 1) each rank
joins the process group, takes the GPU of its local rank, and stops after the same step as the
others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from musicgpt.devices import pick_device
from musicgpt.interrupts import StopRequest


@dataclass
class Ranks:
    """Where this process sits in a torchrun launch (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def join_process_group(device: str) -> Ranks:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    if not dist.is_initialized():
        wants_cuda = device != "cpu" and torch.cuda.is_available()
        dist.init_process_group(backend="nccl" if wants_cuda else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def training_device(name: str, ranks: Ranks) -> str:
    """`pick_device`, with each torchrun process on the GPU of its local rank."""
    device = pick_device(name)
    if device.startswith("cuda") and (ranks.world > 1 or os.environ.get("LOCAL_RANK")):
        device = f"cuda:{ranks.local_rank}"
    return device


def any_rank_stopped(request: StopRequest, ranks: Ranks, device: str) -> bool:
    """Whether any rank was asked to stop (`musicgpt.interrupts`): every rank must stop after the
    same step, or the others would wait forever in the next step's all-reduce."""
    if ranks.world == 1:
        return bool(request)
    flag = torch.tensor([request.signum or 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() and not request:
        request.signum = int(flag.item())
    return bool(flag.item())
