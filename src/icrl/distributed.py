"""Data-parallel training under torchrun: who this process is, and the few collective steps the
training loop needs.

`torchrun --nproc-per-node N ... -m icrl.cli train ...` starts N copies of the same command with
RANK, WORLD_SIZE, LOCAL_RANK and a rendezvous address in their environment; `join()` then makes
them one process group (gloo on CPU, NCCL on GPU). Without torchrun (WORLD_SIZE unset or 1) it
is a group of one and every collective here is a no-op.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1
    device: str = "cpu"     # this process's device: a GPU per local rank under torchrun
    owner: bool = False     # whether join() started the process group (and so ends it)

    @property
    def main(self) -> bool:
        """The one process that writes checkpoints, logs and reports."""
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the processes."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order (a picklable value)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's `t` (the same shape on each), joined along the first axis in rank
        order."""
        if self.world == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t)
        return torch.cat(parts)

    def sum_(self, tensors: list[torch.Tensor]):
        """Replace each tensor (in place) by its element-wise sum over the processes, in one
        all-reduce of a flat buffer (the tensors share a dtype and device)."""
        if self.world == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def leave(self):
        if self.owner and dist.is_initialized():
            # Free what still refers to the group (a wrapped model in a reference cycle) while
            # the interpreter is whole: Gloo work freed during its shutdown can abort the process.
            gc.collect()
            dist.destroy_process_group()


def is_main_process() -> bool:
    """Whether this is the first (or only) process of its torchrun group."""
    return int(os.environ.get("RANK", "0")) == 0


def join(device: str) -> Group:
    """This process's place in the torchrun group (joining it on first use), or a group of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group(device=device)
    cuda = torch.device(device).type == "cuda"
    if cuda:  # one GPU per process on each machine
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    owner = not dist.is_initialized()
    if owner:
        try:
            dist.init_process_group("nccl" if cuda else "gloo")
        except (ValueError, RuntimeError) as e:
            raise UserError(f"could not join the torchrun process group: {e}") from None
    return Group(dist.get_rank(), dist.get_world_size(), device, owner)


def wrap(module: torch.nn.Module, group: Group) -> torch.nn.Module:
    """`module` under DistributedDataParallel when there are several processes: its backward
    pass averages the gradients over them, in buckets overlapped with the computation."""
    if group.world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(group.device).index] if torch.device(group.device).type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)
