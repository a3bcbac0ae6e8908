"""Checkpoints: weights plus everything needed to rebuild and judge them (configs, family, split),
and training states: what an interrupted training run needs to continue exactly.

Saved atomically (temporary name, then rename); validated on load with one-line errors."""
from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from .atomic import atomic_write
from .envs import family_from_config
from .errors import UserError
from .models.ad import InContextPolicy, PolicyConfig

FORMAT_VERSION = 1
KIND = "icrl-policy"
STATE_KIND = "icrl-train-state"


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    return _save_atomic(path, {"format_version": FORMAT_VERSION, "kind": KIND, **payload})


def save_train_state(path: str | Path, state: dict) -> Path:
    return _save_atomic(path, {"format_version": FORMAT_VERSION, "kind": STATE_KIND, **state})


def read_train_state(path: str | Path) -> dict:
    """A training state written by `save_train_state`, on the CPU (the caller moves it)."""
    path = Path(path)
    try:
        _check_crc(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # as for checkpoints: many exception types for a damaged file
        raise UserError(f"{path}: not a readable training state (truncated or corrupt); "
                        f"start over with --fresh") from None
    if not isinstance(state, dict) or state.get("kind") != STATE_KIND \
            or state.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: not an icrl training state this version can resume; "
                        f"start over with --fresh")
    return state


def _save_atomic(path: str | Path, obj: dict) -> Path:
    """torch.save to a temporary name, then rename: a kill never leaves a half-written file."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def read_checkpoint(path: str | Path, device="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory, expected a checkpoint file (model.pt)")
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        _check_crc(path)
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


def _check_crc(path: Path):
    """torch.load does not check the CRC-32 that torch.save stores for every record of its zip
    archive: a flipped byte in the weights would load silently. Raises on any mismatch."""
    if zipfile.is_zipfile(path):  # not a zip: torch.load judges it (and refuses garbage)
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise ValueError(f"CRC mismatch in {bad}")


def load_policy(path: str | Path, device="cpu") -> tuple[InContextPolicy, dict]:
    """The policy in eval mode and the whole checkpoint dict (family, split, configs...)."""
    ckpt = read_checkpoint(path, device)
    try:
        policy = InContextPolicy(PolicyConfig.from_dict(ckpt["policy_config"]))
        policy.load_state_dict(ckpt["state_dict"])
    except (TypeError, KeyError, RuntimeError, ValueError) as e:
        raise UserError(f"{path}: checkpoint does not match its model config "
                        f"({str(e).splitlines()[0][:120]})") from None
    _check_family(path, policy.cfg, ckpt["family"])
    return policy.to(device).eval(), ckpt


def _check_family(path: Path, cfg: PolicyConfig, family_config):
    """The model must fit the family stored beside it (observations, actions, episode length)."""
    try:
        family = family_from_config(family_config)
    except (TypeError, ValueError, AttributeError) as e:  # settings the family does not take
        raise UserError(f"{path}: checkpoint's family config is not valid "
                        f"({str(e).splitlines()[0][:120]})") from None
    have = (tuple(cfg.obs_dims), cfg.n_actions, cfg.episode_len)
    want = (tuple(family.obs_dims), family.n_actions, family.episode_len)
    if have != want:
        raise UserError(f"{path}: its model (observations, actions, episode length {have}) "
                        f"does not fit its family {family.name} {want}")
