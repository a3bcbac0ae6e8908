"""The task-family interface: a family of tasks and a NumPy environment that steps a batch of them.

Each family declares its observations in `obs_spec` (icrl/envs/spec.py): a few integer components
(Dark Room: the agent's (x, y)) or an image.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from .spec import ObsSpec


class BatchedEnv(ABC):
    """`n` independent tasks stepped together. Episodes have a fixed length in every family here,
    but callers must not rely on lockstep: `done` is per task and `reset(mask)` resets a subset."""

    n: int

    @abstractmethod
    def reset(self, mask: np.ndarray | None = None) -> np.ndarray:
        """Start a new episode for the tasks in `mask` (all if None); return every task's obs."""

    @abstractmethod
    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Apply actions (n,) and return (obs (n, *obs_spec.shape), reward (n,) float32,
        done (n,) bool)."""

    def advance(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`step` without the observations: (reward, done). Pixel families override it to skip
        drawing frames nobody looks at (a learner on the state, in episodes not recorded)."""
        _, reward, done = self.step(actions)
        return reward, done


class TaskFamily(ABC):
    """A distribution of tasks (the thing AD must generalise across) and how to instantiate them."""

    name: str
    obs_spec: ObsSpec
    n_actions: int
    episode_len: int
    # The true state as integers for learners that cannot read the observations: env.state().
    state_spec: ObsSpec | None = None
    # Whether a split's held-out sets must be disjoint from its training set (game suites
    # evaluate on the games they train on, in fresh episodes).
    disjoint_split: bool = True

    @abstractmethod
    def tasks(self) -> np.ndarray:
        """Every task's parameters, (n_tasks, task_dim), in a fixed order (int64 for grid tasks,
        float64 for bandit arm means)."""

    @abstractmethod
    def make(self, tasks: np.ndarray, seed: int = 0) -> BatchedEnv:
        """A batched environment over the given task parameters."""

    @abstractmethod
    def oracle_returns(self, tasks: np.ndarray) -> np.ndarray:
        """Expected return of an optimal policy that knows the task, per task (float64)."""

    def config(self) -> dict:
        """What identifies this family and its settings; stored with every dataset and checkpoint."""
        return {"name": self.name}

    def split(self, n_test: int, seed: int = 0, n_train: int | None = None) -> dict[str, np.ndarray]:
        """A seeded partition of task indices: {"train": ..., "test": ...} (each sorted), plus
        any further evaluation sets the family defines (e.g. "ood"). `n_train` caps the training
        side (default: every task not held out). Stored with the data."""
        return self._partition(len(self.tasks()), n_test, seed, n_train)

    def _partition(self, n: int, n_test: int, seed: int, n_train: int | None) -> dict:
        """Disjoint train/test indices among the first `n` tasks."""
        if not 0 < n_test < n:
            raise ValueError(f"n_test must be between 1 and {n - 1} for {self.name}, got {n_test}")
        if n_train is not None and not 0 < n_train <= n - n_test:
            raise ValueError(f"n_train must be between 1 and {n - n_test} for {self.name} with "
                             f"{n_test} test tasks, got {n_train}")
        perm = np.random.default_rng(seed).permutation(n)
        return {"train": np.sort(perm[n_test:][:n_train]), "test": np.sort(perm[:n_test])}

    def check_split(self, split) -> None:
        """ValueError unless `split` (as stored with data and checkpoints: {"seed": ...,
        set name: task indices}) names only distinct tasks of this family, in disjoint sets."""
        sets = {k: v for k, v in split.items() if k != "seed"} if isinstance(split, dict) else {}
        n = len(self.tasks())
        if "train" not in sets:
            raise ValueError("the stored split has no 'train' set")
        for name, ids in sets.items():
            if not (isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                                  and 0 <= i < n for i in ids)
                    and len(set(ids)) == len(ids)):
                raise ValueError(f"the stored split's {name!r} set is not a list of distinct "
                                 f"{self.name} task indices in [0, {n})")
        if self.disjoint_split and any(set(sets["train"]) & set(ids)
                                       for name, ids in sets.items() if name != "train"):
            raise ValueError("the stored split trains on held-out tasks")

    def check_task(self, task) -> np.ndarray:
        """`task` as this family's parameter vector; ValueError if it is not one of its tasks."""
        table = self.tasks()
        try:
            task = np.asarray(task, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"a {self.name} task must be numbers, got {task!r}") from None
        if task.shape != table.shape[1:]:
            raise ValueError(f"a {self.name} task has shape {table.shape[1:]}, got shape "
                             f"{task.shape}")
        if not (table == task).all(axis=1).any():
            lo, hi = table.min(axis=0).tolist(), table.max(axis=0).tolist()
            raise ValueError(f"{task.tolist()} is not a {self.name} task (parameters range from "
                             f"{lo} to {hi})")
        return task.astype(table.dtype)
