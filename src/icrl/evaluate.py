"""In-context evaluation: frozen weights, empty contexts, many consecutive episodes, all tasks in
one batch. The cached agent is the default; the recomputing one exists to check and benchmark it."""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .agent import InContextAgent
from .envs.base import TaskFamily
from .models.ad import InContextPolicy
from .models.transformer import window_after_slide


class RecomputingAgent(InContextAgent):
    """Same interface and same windows, no cache: re-runs the whole window at every step."""

    def start(self, n):
        super().start(n)
        self.tokens = {k: [] for k in ("obs", "prev_action", "prev_reward", "step")}

    def reset(self, rows):
        raise NotImplementedError("the recomputing agent keeps one shared window; use start()")

    @torch.no_grad()
    def logits(self, obs):
        self._check_started()
        if self.pending is not None:
            raise RuntimeError("call observe(rewards, done) after each act()")
        obs = self._observations(obs)
        new = {"obs": obs, "prev_action": self.prev_action, "prev_reward": self.prev_reward,
               "step": self.step_in_episode}
        if len(self.tokens["obs"]) == self.policy.cfg.context:  # slide as the cache does
            keep = window_after_slide(self.policy.cfg.context)
            self.tokens = {k: v[-keep:] for k, v in self.tokens.items()}
        for key, value in new.items():
            self.tokens[key].append(value)
        window = {k: torch.stack(v, dim=1) for k, v in self.tokens.items()}
        return self.policy(**window)[:, -1]


def rollout(policy: InContextPolicy, family: TaskFamily, tasks: np.ndarray, n_episodes: int, *,
            greedy: bool = False, temperature: float = 1.0, seed: int = 0, cache: bool = True,
            progress: bool = False) -> np.ndarray:
    """Returns (n_tasks, n_episodes): each task's return in each consecutive in-context episode."""
    tasks = _check_inputs(policy, family, tasks, n_episodes)
    agent_cls = InContextAgent if cache else RecomputingAgent
    agent = agent_cls(policy, greedy=greedy, temperature=temperature, seed=seed)
    env = family.make(tasks, seed=seed)
    agent.start(len(tasks))
    returns = np.zeros((len(tasks), n_episodes))
    obs = env.reset()
    for e in tqdm(range(n_episodes), desc="in-context episodes", disable=not progress, leave=False):
        done = np.zeros(len(tasks), dtype=bool)
        while not done.all():
            obs, reward, step_done = env.step(agent.act(obs))
            agent.observe(reward, step_done)
            returns[:, e] += reward * ~done
            done |= step_done
        obs = env.reset()
    return returns


def evaluate(policy, family, tasks, n_episodes: int, rollouts_per_task: int = 1, **kwargs):
    """Rollouts batched over tasks x repeats: returns (rollouts_per_task, n_tasks, n_episodes)."""
    tasks = _check_inputs(policy, family, tasks, n_episodes)
    if isinstance(rollouts_per_task, bool) or not isinstance(rollouts_per_task, (int, np.integer)) \
            or rollouts_per_task < 1:
        raise ValueError(f"rollouts_per_task must be an integer >= 1, got {rollouts_per_task!r}")
    batch = np.repeat(tasks[None], rollouts_per_task, axis=0).reshape(-1, tasks.shape[1])
    returns = rollout(policy, family, batch, n_episodes, **kwargs)
    return returns.reshape(rollouts_per_task, len(tasks), n_episodes)


def _check_inputs(policy, family: TaskFamily, tasks, n_episodes) -> np.ndarray:
    """ValueError, in one line, for inputs that would otherwise fail deep inside a rollout (or,
    worse, run: a policy of another family indexes embeddings with foreign observations)."""
    if not isinstance(policy, InContextPolicy):
        raise TypeError(f"policy must be an InContextPolicy, got {type(policy).__name__}")
    if not isinstance(family, TaskFamily):
        raise TypeError(f"family must be a TaskFamily, got {type(family).__name__}")
    cfg = policy.cfg
    have = (tuple(cfg.obs_dims), cfg.n_actions, cfg.episode_len)
    want = (tuple(family.obs_dims), family.n_actions, family.episode_len)
    if have != want:
        raise ValueError(f"the policy (observations, actions, episode length {have}) was not "
                         f"made for {family.name} {want}")
    if isinstance(n_episodes, bool) or not isinstance(n_episodes, (int, np.integer)) \
            or n_episodes < 1:
        raise ValueError(f"n_episodes must be an integer >= 1, got {n_episodes!r}")
    table = family.tasks()
    try:  # float64 first: a cast to the table's int64 would truncate 2.5 to a valid 2
        tasks = np.asarray(tasks, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"tasks must be an array of {family.name} task parameters") from None
    if tasks.ndim != 2 or tasks.shape[1:] != table.shape[1:] or len(tasks) == 0:
        raise ValueError(f"tasks must have shape (n_tasks >= 1, {table.shape[1]}) for "
                         f"{family.name} (rows of family.tasks()), got {tasks.shape}")
    for task in np.unique(tasks, axis=0):
        family.check_task(task)  # ValueError naming a row that is no task of the family
    return tasks.astype(table.dtype)
