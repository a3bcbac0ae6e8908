"""Dark Key-to-Door: find an invisible key, then an invisible door, observing only your own (x, y).

9x9 grid, 50 steps, a random start cell each episode, 5 actions (as Dark Room). Reward 1 on the
first step that ends on the key, then reward 1 on the first later step that ends on the door; at
most one reward per step, so a door on the key's cell pays one step after the key. Maximum return
2, reachable from every start (at most 16 + 16 + 1 steps). A task is (key x, key y, door x, door y):
81^2 = 6,561 tasks.
"""
from __future__ import annotations

import numpy as np

from .spec import ObsSpec
from .base import BatchedEnv, TaskFamily
from .darkroom import MOVES


class KeyToDoorEnv(BatchedEnv):
    def __init__(self, tasks: np.ndarray, size: int, episode_len: int, seed: int = 0):
        tasks = np.asarray(tasks, dtype=np.int64).reshape(-1, 4)
        self.key, self.door = tasks[:, :2], tasks[:, 2:]
        self.n, self.size, self.episode_len = len(tasks), size, episode_len
        self.rng = np.random.default_rng(seed)
        self.pos = np.zeros((self.n, 2), dtype=np.int64)
        self.t = np.zeros(self.n, dtype=np.int64)
        self.has_key = np.zeros(self.n, dtype=bool)
        self.opened = np.zeros(self.n, dtype=bool)
        self.reset()

    def reset(self, mask=None):
        mask = np.ones(self.n, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        self.pos[mask] = self.rng.integers(self.size, size=(int(mask.sum()), 2))
        self.t[mask] = 0
        self.has_key[mask] = False
        self.opened[mask] = False
        return self.pos.copy()

    def step(self, actions):
        actions = np.asarray(actions, dtype=np.int64)
        self.pos = np.clip(self.pos + MOVES[actions], 0, self.size - 1)
        # The door test uses the key held *before* this step: one reward per step at most.
        door = self.has_key & ~self.opened & (self.pos == self.door).all(axis=1)
        key = ~self.has_key & (self.pos == self.key).all(axis=1)
        self.has_key |= key
        self.opened |= door
        self.t += 1
        return self.pos.copy(), (key | door).astype(np.float32), self.t >= self.episode_len


class DarkKeyToDoor(TaskFamily):
    n_actions = 5

    def __init__(self, size: int = 9, episode_len: int = 50):
        self.size, self.episode_len = size, episode_len
        self.name = "keydoor"
        self.obs_spec = ObsSpec.discrete((size, size))

    def config(self):
        return {"name": self.name, "size": self.size, "episode_len": self.episode_len}

    def _cells(self) -> np.ndarray:
        """Every (x, y) of the grid, (size², 2)."""
        xs, ys = np.meshgrid(np.arange(self.size), np.arange(self.size), indexing="ij")
        return np.stack([xs.ravel(), ys.ravel()], axis=1)

    def tasks(self):
        cells = self._cells()
        key, door = np.repeat(cells, len(cells), axis=0), np.tile(cells, (len(cells), 1))
        return np.concatenate([key, door], axis=1).astype(np.int64)

    def make(self, tasks, seed=0):
        return KeyToDoorEnv(tasks, self.size, self.episode_len, seed)

    def oracle_returns(self, tasks):
        """Expected over the uniform random start: a step must end on the key (1 step if it starts
        there) and then on the door (1 step if it is the key's cell)."""
        tasks = np.asarray(tasks, dtype=np.int64)
        to_key = np.abs(self._cells()[None] - tasks[:, None, :2]).sum(-1)    # (n, cells)
        to_key = np.maximum(to_key, 1)
        to_door = np.maximum(np.abs(tasks[:, :2] - tasks[:, 2:]).sum(-1), 1)  # (n,)
        T = self.episode_len
        return ((to_key <= T).astype(float) + (to_key + to_door[:, None] <= T)).mean(axis=1)
