"""Training windows: c consecutive steps of one history, streamed from disk block by block.

A window never straddles two histories. Each step becomes one token holding (a_{t-1}, r_{t-1}, o_t,
t mod episode_len) and is trained to predict a_t; at a history's first step a_{t-1} is the
"no previous action" index n_actions.
"""
from __future__ import annotations

import numpy as np
import torch

from .store import HistoryStore


def make_tokens(obs, actions, rewards, start: np.ndarray, context: int, n_actions: int,
                episode_len: int) -> dict[str, torch.Tensor]:
    """Cut windows [start, start + context) out of per-row arrays (rows aligned with `start`)."""
    rows = np.arange(len(start))[:, None]
    t = start[:, None] + np.arange(context)
    prev = t - 1
    has_prev = prev >= 0
    prev = np.maximum(prev, 0)
    prev_action = np.where(has_prev, actions[rows, prev], n_actions)
    prev_reward = np.where(has_prev, rewards[rows, prev], 0.0)
    return {
        "obs": torch.from_numpy(obs[rows, t].astype(np.int64)),
        "prev_action": torch.from_numpy(prev_action.astype(np.int64)),
        "prev_reward": torch.from_numpy(prev_reward.astype(np.float32)),
        "step": torch.from_numpy((t % episode_len).astype(np.int64)),
        "target": torch.from_numpy(actions[rows, t].astype(np.int64)),
    }


class WindowStream:
    """Endless random batches of windows. Reads `block` histories at a time (random rows), draws
    windows from them in proportion to their size, then moves to another block: memory stays
    bounded by the block however large the file."""

    def __init__(self, store: HistoryStore, context: int, batch_size: int, n_actions: int,
                 seed: int = 0, block: int = 512):
        if context > store.n_steps:
            raise ValueError(f"context {context} is longer than the histories "
                             f"({store.n_steps} steps) in {store.path}")
        self.store, self.context, self.batch_size = store, context, batch_size
        self.n_actions, self.episode_len = n_actions, store.meta["episode_len"]
        self.block = min(block, store.n_histories)
        self.rng = np.random.default_rng(seed)

    def __iter__(self):
        H, T, c = self.store.n_histories, self.store.n_steps, self.context
        # Windows per block ~ the block's share of all distinct windows, at least one batch.
        batches = max(1, round(self.block * (T - c + 1) / (self.batch_size * c)))
        while True:
            rows = np.sort(self.rng.choice(H, size=self.block, replace=False))
            data = self.store.read(rows)
            for _ in range(batches):
                pick = self.rng.integers(self.block, size=self.batch_size)
                start = self.rng.integers(0, T - c + 1, size=self.batch_size)
                yield make_tokens(data["obs"][pick], data["actions"][pick],
                                  data["rewards"][pick].astype(np.float32), start, c,
                                  self.n_actions, self.episode_len)
