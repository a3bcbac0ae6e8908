"""What a command needs against what the machine has: memory, disk, a usable device.

The estimates are lower bounds, so absurd sizes (10**12 episodes, a batch of 10**9 windows) end
in one line before any work, while anything that could fit still runs.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import UserError


def memory_bytes(device: str = "cpu") -> int:
    """The memory of `device`: a GPU's own, or this machine's RAM."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_disk(path: str | Path) -> tuple[Path, int]:
    """The nearest existing folder at or above `path`, and the free bytes of its file system."""
    folder = next(p for p in [Path(path).absolute(), *Path(path).absolute().parents] if p.is_dir())
    return folder, shutil.disk_usage(folder).free


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_fits(what: str, advice: str, memory: int = 0, device: str = "cpu", disk: int = 0,
               disk_path: str | Path | None = None):
    """UserError naming `what` needs more than the free disk at `disk_path` or `device`'s memory."""
    if disk and disk_path is not None:
        folder, free = free_disk(disk_path)
        if disk > free:
            raise UserError(f"{what} need about {gib(disk)} on disk, {folder} has {gib(free)} "
                            f"free; {advice}")
    if memory and memory > memory_bytes(device):
        raise UserError(f"{what} need at least {gib(memory)} of memory on {device}, which has "
                        f"{gib(memory_bytes(device))}; {advice}")


def check_device(device: str):
    """UserError unless torch can allocate on `device` here."""
    import torch

    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise UserError(f"device {device!r} is not usable here ({str(e).splitlines()[0]})") \
            from None


def check_train_size(spec, cfg):
    """Training `spec` with `cfg` (TrainConfig): float32 weights, gradients and AdamW's two
    moments, and one activation per layer and token."""
    t = spec.transformer
    params = t.n_layer * (4 * t.d_model ** 2 + 2 * t.d_model * t.d_ff)
    check_fits("this model and batch",
               "lower --batch-size, --context, --d-model, --d-ff or --layers",
               memory=16 * params + 4 * cfg.batch_size * spec.context * t.d_model * t.n_layer,
               device=cfg.device)


def check_evaluate_size(policy, batch: int):
    """`batch` parallel rollouts of a SequencePolicy: the keys, values and inputs of every row's
    window (context timesteps of tokens_per_step tokens), float32, on the policy's device."""
    t = policy.cfg.model.transformer
    tokens = policy.cfg.context * policy.tokens_per_step
    device = str(next(policy.parameters()).device)
    check_fits(f"{batch} parallel rollouts", "lower --rollouts or evaluate fewer tasks",
               memory=4 * batch * tokens * t.d_model * (2 * t.n_layer + 1), device=device)
