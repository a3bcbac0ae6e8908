"""The task-family interface: a family of tasks and a NumPy environment that steps a batch of them.

Observations are small vectors of non-negative integers, one per component, each below its entry in
`obs_dims` (Dark Room: the agent's (x, y)). Models embed each component separately, which is what
lets them generalise across cells they never saw rewarded.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class BatchedEnv(ABC):
    """`n` independent tasks stepped together. Episodes have a fixed length in every family here,
    but callers must not rely on lockstep: `done` is per task and `reset(mask)` resets a subset."""

    n: int

    @abstractmethod
    def reset(self, mask: np.ndarray | None = None) -> np.ndarray:
        """Start a new episode for the tasks in `mask` (all if None); return every task's obs (n, k)."""

    @abstractmethod
    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Apply actions (n,) and return (obs (n, k) int64, reward (n,) float32, done (n,) bool)."""


class TaskFamily(ABC):
    """A distribution of tasks (the thing AD must generalise across) and how to instantiate them."""

    name: str
    obs_dims: tuple[int, ...]
    n_actions: int
    episode_len: int

    @abstractmethod
    def tasks(self) -> np.ndarray:
        """Every task's parameters, (n_tasks, task_dim) int64, in a fixed order."""

    @abstractmethod
    def make(self, tasks: np.ndarray, seed: int = 0) -> BatchedEnv:
        """A batched environment over the given task parameters."""

    @abstractmethod
    def oracle_returns(self, tasks: np.ndarray) -> np.ndarray:
        """Expected return of an optimal policy that knows the task, per task (float64)."""

    def config(self) -> dict:
        """What identifies this family and its settings; stored with every dataset and checkpoint."""
        return {"name": self.name}

    def split(self, n_test: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """A seeded train/test partition of task indices (sorted). Stored with the data."""
        n = len(self.tasks())
        if not 0 < n_test < n:
            raise ValueError(f"n_test must be between 1 and {n - 1} for {self.name}, got {n_test}")
        perm = np.random.default_rng(seed).permutation(n)
        return np.sort(perm[n_test:]), np.sort(perm[:n_test])
