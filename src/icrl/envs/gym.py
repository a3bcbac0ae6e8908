"""Single-task Gymnasium environments: one task of a family, stepped as a batch of one.

    import icrl, gymnasium
    env = gymnasium.make("icrl/DarkRoom-v0", goal=(2, 3))

The task stays the same across episodes, as in-context RL needs. A task given to `gymnasium.make`
(`task=`, or its family's alias such as `goal=`) or in `reset(options={"task": ...})` is kept until
another is given; without one, a task is drawn from the env's RNG at the first reset and at every
reset given a seed.
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from . import make_family
from .base import TaskFamily

# Gymnasium id -> (task family name, the task's other keyword name or None).
GYM_IDS = {
    "icrl/DarkRoom-v0": ("darkroom", "goal"),
    "icrl/DarkRoomHard-v0": ("darkroom-hard", "goal"),
}


class FamilyEnv(gym.Env):
    """One task of `family`; episodes are truncated (never terminated) after `episode_len` steps."""

    metadata = {"render_modes": []}

    def __init__(self, family: TaskFamily, task=None, render_mode: str | None = None):
        if render_mode is not None:
            raise ValueError(f"render_mode must be None (no rendering), got {render_mode!r}")
        self.family, self.render_mode = family, render_mode
        self.observation_space = spaces.MultiDiscrete(family.obs_dims, dtype=np.int64)
        self.action_space = spaces.Discrete(family.n_actions)
        self._tasks = family.tasks()
        self._pinned = task is not None
        self.task = None if task is None else self._check_task(task)
        self._env = None

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if options and options.get("task") is not None:
            self.task, self._pinned = self._check_task(options["task"]), True
        elif self.task is None or (seed is not None and not self._pinned):
            self.task = self._tasks[self.np_random.integers(len(self._tasks))].copy()
        self._env = self.family.make(self.task[None], seed=int(self.np_random.integers(2**31)))
        return self._env.reset()[0], {"task": self.task.copy()}

    def step(self, action):
        if self._env is None:
            raise RuntimeError("call reset() before step()")
        obs, reward, done = self._env.step(np.array([action], dtype=np.int64))
        return obs[0], float(reward[0]), False, bool(done[0]), {"task": self.task.copy()}

    def _check_task(self, given) -> np.ndarray:
        name = self.family.name
        try:
            task = np.asarray(given, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"a {name} task must be numbers, got {given!r}") from None
        if task.shape != self._tasks.shape[1:]:
            raise ValueError(f"a {name} task has shape {self._tasks.shape[1:]}, "
                             f"got {given!r} of shape {task.shape}")
        if not (self._tasks == task).all(axis=1).any():
            lo, hi = self._tasks.min(axis=0).tolist(), self._tasks.max(axis=0).tolist()
            raise ValueError(f"{given!r} is not a {name} task (tasks range from {lo} to {hi})")
        return task.astype(np.int64)


def make_env(family: str, task_alias: str | None = None, task=None, render_mode=None, **kwargs):
    """The entry point of the registered ids: `kwargs` may hold the task under its alias; any
    other keyword overrides a family setting (e.g. `episode_len=`)."""
    if task_alias is not None and task_alias in kwargs:
        if task is not None:
            raise ValueError(f"give task= or {task_alias}=, not both")
        task = kwargs.pop(task_alias)
    return FamilyEnv(make_family(family, **kwargs), task, render_mode)


def register_envs() -> None:
    """Register every id in GYM_IDS with Gymnasium (safe to call more than once)."""
    for env_id, (family, alias) in GYM_IDS.items():
        if env_id not in gym.registry:
            gym.register(env_id, entry_point="icrl.envs.gym:make_env",
                         kwargs={"family": family, "task_alias": alias})
