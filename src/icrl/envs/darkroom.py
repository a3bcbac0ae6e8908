"""Dark Room and Dark Room Hard: find an invisible goal on a grid, observing only your own (x, y).

Dark Room: 9x9, reward 1 on every step spent on the goal. Hard: 17x17, reward 1 only the first time
the goal is reached in an episode. Both: 20 steps, start at the centre, 5 actions.

With `pixels=True` the agent sees its position drawn as an image instead: a (size, size, 1) uint8
frame, 255 on its cell and 0 elsewhere. The same task as an image-observation family (registered
small, as `darkroom-pixels`) to exercise the image encoders end to end.
"""
from __future__ import annotations

import numpy as np

from .spec import ObsSpec
from .base import BatchedEnv, TaskFamily

# (dx, dy) per action: up, down, left, right, no-op.
MOVES = np.array([[0, 1], [0, -1], [-1, 0], [1, 0], [0, 0]], dtype=np.int64)
ACTION_NAMES = ("up", "down", "left", "right", "noop")


class DarkRoomEnv(BatchedEnv):
    def __init__(self, goals: np.ndarray, size: int, episode_len: int, sparse: bool,
                 pixels: bool = False):
        self.goals = np.asarray(goals, dtype=np.int64).reshape(-1, 2)
        self.n = len(self.goals)
        self.size, self.episode_len, self.sparse, self.pixels = size, episode_len, sparse, pixels
        self.pos = np.empty((self.n, 2), dtype=np.int64)
        self.t = np.zeros(self.n, dtype=np.int64)
        self.reached = np.zeros(self.n, dtype=bool)
        self.reset()

    def reset(self, mask=None):
        mask = np.ones(self.n, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        self.pos[mask] = self.size // 2
        self.t[mask] = 0
        self.reached[mask] = False
        return self._observe()

    def _observe(self) -> np.ndarray:
        if not self.pixels:
            return self.pos.copy()
        frames = np.zeros((self.n, self.size, self.size, 1), dtype=np.uint8)
        frames[np.arange(self.n), self.pos[:, 1], self.pos[:, 0], 0] = 255  # row y, column x
        return frames

    def step(self, actions):
        actions = np.asarray(actions, dtype=np.int64)
        self.pos = np.clip(self.pos + MOVES[actions], 0, self.size - 1)
        on_goal = (self.pos == self.goals).all(axis=1)
        reward = on_goal & ~self.reached if self.sparse else on_goal
        if self.sparse:
            self.reached |= on_goal
        self.t += 1
        return self._observe(), reward.astype(np.float32), self.t >= self.episode_len


class DarkRoom(TaskFamily):
    n_actions = 5

    def __init__(self, size: int = 9, episode_len: int = 20, sparse: bool = False,
                 pixels: bool = False):
        self.size, self.episode_len, self.sparse, self.pixels = size, episode_len, sparse, pixels
        self.name = "darkroom-hard" if sparse else "darkroom-pixels" if pixels else "darkroom"
        self.obs_spec = ObsSpec.image(size, size, 1) if pixels else ObsSpec.discrete((size, size))

    def config(self):
        return {"name": self.name, "size": self.size, "episode_len": self.episode_len,
                "sparse": self.sparse, **({"pixels": True} if self.pixels else {})}

    def tasks(self):
        xs, ys = np.meshgrid(np.arange(self.size), np.arange(self.size), indexing="ij")
        return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)

    def make(self, tasks, seed=0):
        return DarkRoomEnv(tasks, self.size, self.episode_len, self.sparse, self.pixels)

    def oracle_returns(self, tasks):
        dist = np.abs(np.asarray(tasks) - self.size // 2).sum(axis=1)
        reachable = dist <= self.episode_len
        if self.sparse:
            return reachable.astype(np.float64)
        # Reach the goal after d steps, then stay: rewarded on steps d..T (d >= 1); T if it starts there.
        return np.where(dist == 0, self.episode_len,
                        np.maximum(self.episode_len - dist + 1, 0)).astype(np.float64)
