"""Results an experiment computes once: saved beside what they were computed from, with the key of
their settings, and reused by a rerun while the key is the same (a changed checkpoint, dataset or
setting computes them again). Arrays go to .npz files, JSON values (scores, baselines) to .json."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from ..atomic import atomic_write, file_sha256
from ..checkpoint import load_policy
from ..evaluate import evaluate
from ..report import write_json


def cached_returns(path: Path, key: dict, compute) -> np.ndarray:
    """The array saved at `path` with the same `key` (any JSON value), else `compute()`, saved
    there (atomically) with its key."""
    key_text = json.dumps(key, sort_keys=True)
    try:
        with np.load(path) as f:
            if str(f["key"]) == key_text:
                return f["returns"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # missing or unreadable: computed again
    returns = np.asarray(compute())
    with atomic_write(path) as tmp:
        np.savez(tmp, returns=returns, key=np.array(key_text))
    return returns


def cached_json(path: Path, key: dict, compute):
    """The JSON value saved at `path` with the same `key`, else `compute()`, saved there (a
    readable file: {"key": ..., "value": ...})."""
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == json.loads(json.dumps(key)):
                return saved["value"]
        except (OSError, ValueError):
            pass  # unreadable: computed again
    value = compute()
    write_json(path, {"key": key, "value": value})
    return value


def cached_evaluation(ckpt: Path, family, tasks, episodes: int, rollouts: int, *,
                      temperature: float, seed: int, progress: bool) -> np.ndarray:
    """`evaluate` of the checkpoint, saved as eval.npz beside it; reused while the checkpoint's
    contents and the evaluation's settings are the same."""
    key = {"checkpoint_sha256": file_sha256(ckpt),
           "tasks": np.asarray(tasks).tolist(), "episodes": episodes, "rollouts": rollouts,
           "temperature": temperature, "seed": seed}

    def compute():
        policy, _ = load_policy(ckpt)
        return evaluate(policy, family, tasks, episodes, rollouts, temperature=temperature,
                        seed=seed, progress=progress)
    return cached_returns(Path(ckpt).parent / "eval.npz", key, compute)
