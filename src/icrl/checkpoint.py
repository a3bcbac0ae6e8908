"""Checkpoints: weights plus everything needed to rebuild and judge them (configs, family, split).

Saved atomically (temporary name, then rename); validated on load with one-line errors."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import UserError
from .models.ad import InContextPolicy, PolicyConfig

FORMAT_VERSION = 1
KIND = "icrl-policy"


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save({"format_version": FORMAT_VERSION, "kind": KIND, **payload}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_checkpoint(path: str | Path, device="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # torch raises many types (and pages of text) for a damaged file
        raise UserError(f"{path}: not a readable checkpoint (truncated, corrupt or another "
                        f"kind of file)") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != KIND:
        raise UserError(f"{path}: not an icrl policy checkpoint")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format {ckpt.get('format_version')}, "
                        f"this icrl reads {FORMAT_VERSION}")
    for key in ("policy_config", "state_dict", "family", "split"):
        if key not in ckpt:
            raise UserError(f"{path}: checkpoint lacks {key!r}")
    return ckpt


def load_policy(path: str | Path, device="cpu") -> tuple[InContextPolicy, dict]:
    """The policy in eval mode and the whole checkpoint dict (family, split, configs...)."""
    ckpt = read_checkpoint(path, device)
    try:
        policy = InContextPolicy(PolicyConfig.from_dict(ckpt["policy_config"]))
        policy.load_state_dict(ckpt["state_dict"])
    except (TypeError, KeyError, RuntimeError, ValueError) as e:
        raise UserError(f"{path}: checkpoint does not match its model config "
                        f"({str(e).splitlines()[0][:120]})") from None
    return policy.to(device).eval(), ckpt
