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
    bounded by the block however large the file.

    An iterator whose position can be saved (`state_dict`) and restored (`load_state_dict`): a
    restored stream yields exactly the batches the saved one would have yielded next, which is
    what lets an interrupted training run continue as if it had never stopped."""

    def __init__(self, store: HistoryStore, context: int, batch_size: int, n_actions: int,
                 seed: int = 0, block: int = 512):
        if context > store.n_steps:
            raise ValueError(f"context {context} is longer than the histories "
                             f"({store.n_steps} steps) in {store.path}")
        self.store, self.context, self.batch_size = store, context, batch_size
        self.n_actions, self.episode_len = n_actions, store.meta["episode_len"]
        self.block = min(block, store.n_histories)
        self.rng = np.random.default_rng(seed)
        # Windows per block ~ the block's share of all distinct windows, and at least enough
        # batches to use each history of the block about once (a block read is slow).
        T, c = store.n_steps, context
        self.batches_per_block = max(1, self.block // batch_size,
                                     round(self.block * (T - c + 1) / (batch_size * c)))
        self.rows, self.data, self.batches_left = None, None, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.batches_left == 0:
            self._load_block(np.sort(self.rng.choice(self.store.n_histories, size=self.block,
                                                     replace=False)))
            self.batches_left = self.batches_per_block
        self.batches_left -= 1
        c, d = self.context, self.data
        pick = self.rng.integers(self.block, size=self.batch_size)
        start = self.rng.integers(0, self.store.n_steps - c + 1, size=self.batch_size)
        return make_tokens(d["obs"][pick], d["actions"][pick],
                           d["rewards"][pick].astype(np.float32), start, c, self.n_actions,
                           self.episode_len)

    def _load_block(self, rows: np.ndarray):
        self.rows, self.data = rows, self.store.read(rows)

    def state_dict(self) -> dict:
        """The position: generator state, current block's rows, batches left in it. Plain Python
        values only, so it loads with torch.load(weights_only=True)."""
        return {"rng": self.rng.bit_generator.state, "batches_left": self.batches_left,
                "rows": None if self.rows is None else self.rows.tolist()}

    def load_state_dict(self, state: dict):
        self.rng.bit_generator.state = state["rng"]
        self.batches_left = state["batches_left"]
        if state["rows"] is not None:  # re-read the block the saved stream was drawing from
            self._load_block(np.asarray(state["rows"], dtype=np.int64))
