"""Checkpoints: weights plus everything needed to rebuild and judge them (configs, family, split),
and training states: what an interrupted training run needs to continue exactly.

Saved atomically (temporary name, then rename); validated on load with one-line errors."""
from __future__ import annotations

import zipfile
from dataclasses import asdict
from pathlib import Path

import torch

from .atomic import atomic_write
from .envs import family_from_config
from .errors import UserError
from .models.policy import ModelSpec, PolicyConfig, SequencePolicy

FORMAT_VERSION = 2          # 1: the first core's AD-only policy, upgraded on load
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
    if ckpt.get("format_version") == 1:
        ckpt = _upgrade_v1(ckpt)
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


def load_policy(path: str | Path, device="cpu") -> tuple[SequencePolicy, dict]:
    """The policy in eval mode and the whole checkpoint dict (family, split, configs...), checked
    against what it claims: weights that fit the config, finite, a model that fits the stored
    family, and a split whose task indices exist."""
    ckpt = read_checkpoint(path, device)
    try:
        policy = SequencePolicy(PolicyConfig.from_dict(ckpt["policy_config"]))
        policy.load_state_dict(ckpt["state_dict"])
    except (TypeError, KeyError, RuntimeError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: checkpoint does not match its model config "
                        f"({str(e).splitlines()[0][:120]})") from None
    bad = [name for name, t in policy.state_dict().items()
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise UserError(f"{path}: checkpoint holds non-finite weights ({', '.join(bad[:3])})")
    family = _check_family(path, policy.cfg, ckpt["family"])
    try:
        family.check_split(ckpt["split"])
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    return policy.to(device).eval(), ckpt


def _check_family(path: Path, cfg: PolicyConfig, family_config):
    """The model must fit the family stored beside it (observations, actions, episode length)."""
    try:
        family = family_from_config(family_config)
    except (TypeError, ValueError, AttributeError) as e:  # settings the family does not take
        raise UserError(f"{path}: checkpoint's family config is not valid "
                        f"({str(e).splitlines()[0][:120]})") from None
    misfit = cfg.misfit(family)
    if misfit:
        raise UserError(f"{path}: its model does not fit its family {family.name}: {misfit}")
    return family


def _upgrade_v1(ckpt: dict) -> dict:
    """A first-core checkpoint (AD's fused one-token policy) in today's names."""
    try:
        old = ckpt["policy_config"]
        model = {"context": old["context"], "transformer": old["transformer"]}
        config = {"obs_spec": {"kind": "discrete", "shape": [len(old["obs_dims"])],
                               "high": list(old["obs_dims"])},
                  "n_actions": old["n_actions"], "episode_len": old["episode_len"],
                  "model": {**asdict(ModelSpec()), **model}}
        renames = (("obs_embed.", "encoder.tables."), ("transformer.", "backbone."),
                   ("head.", "heads.action."))
        state = {}
        for key, value in ckpt["state_dict"].items():
            for a, b in renames:
                if key.startswith(a):
                    key = b + key[len(a):]
                    break
            state[key] = value
    except (KeyError, TypeError, AttributeError):
        return ckpt  # not a v1 checkpoint after all: the format check names it
    return {**ckpt, "format_version": FORMAT_VERSION, "policy_config": config,
            "state_dict": state}
