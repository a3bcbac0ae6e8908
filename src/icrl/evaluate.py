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
    batch = np.repeat(tasks[None], rollouts_per_task, axis=0).reshape(-1, tasks.shape[1])
    returns = rollout(policy, family, batch, n_episodes, **kwargs)
    return returns.reshape(rollouts_per_task, len(tasks), n_episodes)
