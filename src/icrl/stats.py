"""Aggregate scores over games as the MGDT paper and `rliable` do: the interquartile mean (IQM)
with a stratified bootstrap confidence interval.

The IQM is the mean of the middle half of all scores pooled over games (a quarter cut from each
end, as scipy's `trim_mean(x, 0.25)`): robust to one game's outliers, less noisy than the median.
The bootstrap resamples each game's scores with replacement within the game (stratified, so every
replicate keeps every game and its number of scores) and takes the IQM of each replicate; the
interval is the replicates' 2.5th and 97.5th percentiles. Games may hold different numbers of
scores (a dataset's episodes).
"""
from __future__ import annotations

import numpy as np


def iqm(scores) -> float:
    """Interquartile mean of all values in `scores` (an array, or a list of arrays)."""
    x = np.sort(_pooled(scores))
    cut = int(0.25 * len(x))
    return float(x[cut:len(x) - cut].mean())


def iqm_with_ci(per_game: list, reps: int = 2000, confidence: float = 0.95,
                seed: int = 0) -> dict:
    """{"mean": IQM, "ci": [low, high]} of per-game score arrays, by a stratified bootstrap of
    `reps` replicates (games of unequal counts: weighted, see the module docstring)."""
    per_game = [np.asarray(g, dtype=np.float64).ravel() for g in per_game]
    if not per_game or any(len(g) == 0 for g in per_game):
        raise ValueError("every game needs at least one score")
    rng = np.random.default_rng(seed)
    replicates = np.concatenate([g[rng.integers(len(g), size=(reps, len(g)))] for g in per_game],
                                axis=1)
    if len({len(g) for g in per_game}) == 1:
        replicates.sort(axis=1)
        cut = int(0.25 * replicates.shape[1])
        means = replicates[:, cut:replicates.shape[1] - cut].mean(axis=1)
        point = iqm(per_game)
    else:
        weights = np.concatenate([np.full(len(g), 1.0 / len(g)) for g in per_game])
        means = _weighted_iqm(replicates, weights)
        point = float(_weighted_iqm(np.concatenate(per_game)[None], weights)[0])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"mean": round(point, 4), "ci": [round(float(low), 4), round(float(high), 4)]}


def _weighted_iqm(rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The mean of the middle half of the weight of each row of scores (rows, n)."""
    order = np.argsort(rows, axis=1)
    x = np.take_along_axis(rows, order, axis=1)
    w = weights[order] / weights.sum()
    top = np.cumsum(w, axis=1)
    inside = np.clip(np.minimum(top, 0.75) - np.maximum(top - w, 0.25), 0.0, None)
    return (inside * x).sum(axis=1) / 0.5


def _pooled(scores) -> np.ndarray:
    if isinstance(scores, (list, tuple)):
        x = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in scores])
    else:
        x = np.asarray(scores, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("no scores")
    return x
