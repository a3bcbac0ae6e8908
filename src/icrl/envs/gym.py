"""Single-task Gymnasium environments: one task of a family, stepped as a batch of one.

    import icrl, gymnasium
    env = gymnasium.make("icrl/DarkRoom-v0", goal=(2, 3))

The task stays the same across episodes, as in-context RL needs. A task given to `gymnasium.make`
(`task=`, or its family's alias such as `goal=`) or in `reset(options={"task": ...})` is kept until
another is given; without one, a task is drawn from the env's RNG at the first reset and at every
reset given a seed.

A Gym episode is one family episode, except for the bandit, whose episodes are single pulls: there
a Gym episode is a trial of `pulls` pulls (default 100), as in the in-context evaluation.
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
    "icrl/DarkKeyToDoor-v0": ("keydoor", None),        # task = (key x, key y, door x, door y)
    "icrl/AdversarialBandit-v0": ("bandit", "means"),  # task = the arm means
    "icrl/Watermaze-v0": ("watermaze", "platform"),     # task = the platform's centre (x, y)
}
RENDER_FPS = 10
DEFAULT_PULLS = 100


class FamilyEnv(gym.Env):
    """One task of `family`; episodes are truncated (never terminated) after `max_steps` steps
    (default: the family's episode length). A family episode that ends earlier starts again.

    A family whose observations are images renders with render_mode="rgb_array": `render()`
    returns the current frame (the observation itself); the others do not render."""

    metadata = {"render_modes": []}

    def __init__(self, family: TaskFamily, task=None, render_mode: str | None = None,
                 max_steps: int | None = None):
        images = family.obs_spec.kind == "image"
        if images:
            self.metadata = {"render_modes": ["rgb_array"], "render_fps": RENDER_FPS}
        if render_mode not in [None, *self.metadata["render_modes"]]:
            allowed = "None or 'rgb_array'" if images else "None (no rendering)"
            raise ValueError(f"render_mode must be {allowed} for {family.name}, got "
                             f"{render_mode!r}")
        self.max_steps = family.episode_len if max_steps is None else int(max_steps)
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.family, self.render_mode = family, render_mode
        self.observation_space = family.obs_spec.gym_space()
        self.action_space = spaces.Discrete(family.n_actions)
        self._tasks = family.tasks()
        self._pinned = task is not None
        self.task = None if task is None else self.family.check_task(task)
        self._env = None

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if options and options.get("task") is not None:
            self.task, self._pinned = self.family.check_task(options["task"]), True
        elif self.task is None or (seed is not None and not self._pinned):
            self.task = self._tasks[self.np_random.integers(len(self._tasks))].copy()
        self._env = self.family.make(self.task[None], seed=int(self.np_random.integers(2**31)))
        self._steps = 0
        self._obs = self._env.reset()[0]
        return self._obs, {"task": self.task.copy()}

    def step(self, action):
        if self._env is None:
            raise RuntimeError("call reset() before step()")
        obs, reward, done = self._env.step(np.array([action], dtype=np.int64))
        self._steps += 1
        truncated = self._steps >= self.max_steps
        if done[0] and not truncated:
            obs = self._env.reset()
        self._obs = obs[0]
        return obs[0], float(reward[0]), False, truncated, {"task": self.task.copy()}

    def render(self):
        """The current frame (H, W, 3) uint8 with render_mode="rgb_array"; None without one."""
        if self.render_mode is None:
            return None
        if self._env is None:
            raise RuntimeError("call reset() before render()")
        return self._obs.copy()

def make_env(family: str, task_alias: str | None = None, task=None, render_mode=None,
             pulls: int | None = None, **kwargs):
    """The entry point of the registered ids: `kwargs` may hold the task under its alias; any
    other keyword overrides a family setting (e.g. `episode_len=`). `pulls`: bandit only."""
    if task_alias is not None and task_alias in kwargs:
        if task is not None:
            raise ValueError(f"give task= or {task_alias}=, not both")
        task = kwargs.pop(task_alias)
    fam = make_family(family, **kwargs)
    if pulls is not None and fam.episode_len != 1:
        raise ValueError(f"pulls= applies to the bandit, not to {family}")
    if fam.episode_len == 1:
        pulls = DEFAULT_PULLS if pulls is None else pulls
    return FamilyEnv(fam, task, render_mode, max_steps=pulls)


def register_envs() -> None:
    """Register every id in GYM_IDS with Gymnasium (safe to call more than once)."""
    for env_id, (family, alias) in GYM_IDS.items():
        if env_id not in gym.registry:
            gym.register(env_id, entry_point="icrl.envs.gym:make_env",
                         kwargs={"family": family, "task_alias": alias})
