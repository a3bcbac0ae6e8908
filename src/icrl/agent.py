"""Drive a trained in-context agent step by step, batched, from your own environment loop.

    agent = InContextAgent.load("runs/darkroom/ad/model.pt")
    agent.start(n=32)                       # 32 empty contexts
    obs = env.reset()
    for t in range(800):
        actions = agent.act(obs)            # (32,) ints
        obs, rewards, done = env.step(actions)
        agent.observe(rewards, done)        # done rows begin a new episode (context kept)
        obs = env.reset(done) if done.any() else obs

The weights stay frozen; everything the agent learns lives in its context (a KV cache over the
last `context` steps).
"""
from __future__ import annotations

import numbers

import numpy as np
import torch

from .checkpoint import load_policy
from .models.ad import InContextPolicy


class InContextAgent:
    def __init__(self, policy: InContextPolicy, greedy: bool = False, temperature: float = 1.0,
                 seed: int = 0):
        if not isinstance(policy, InContextPolicy):
            raise TypeError(f"policy must be an InContextPolicy, got {type(policy).__name__}")
        _check_temperature(temperature)
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.policy = policy.eval()
        self.greedy, self.temperature = greedy, temperature
        self.device = next(policy.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.cache = None
        self.n = 0

    @classmethod
    def load(cls, checkpoint, device="cpu", greedy: bool = False, temperature: float = 1.0,
             seed: int = 0):
        policy, _ = load_policy(checkpoint, device)
        return cls(policy, greedy=greedy, temperature=temperature, seed=seed)

    def start(self, n: int):
        """Begin `n` empty contexts (one per task / environment copy)."""
        if not _is_int(n) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        self.n = int(n)
        self.cache = self.policy.new_cache(self.n)
        self.prev_action = torch.full((self.n,), self.policy.cfg.n_actions, device=self.device)
        self.prev_reward = torch.zeros(self.n, device=self.device)
        self.step_in_episode = torch.zeros(self.n, dtype=torch.long, device=self.device)
        self.pending = None

    def reset(self, rows):
        """Empty the context of some rows (indices or a bool mask), e.g. they now face a new task.
        Call it between observe() and the next act()."""
        self._check_started()
        if self.pending is not None:
            raise RuntimeError("reset() between act() and observe(): call observe() first")
        mask = self._mask(rows)
        self.cache.reset(mask)
        self.prev_action[mask] = self.policy.cfg.n_actions
        self.prev_reward[mask] = 0.0
        self.step_in_episode[mask] = 0

    @torch.no_grad()
    def logits(self, obs) -> torch.Tensor:
        """Action logits (n, n_actions) for observations (n, k); adds the step to the context."""
        self._check_started()
        if self.pending is not None:
            raise RuntimeError("call observe(rewards, done) after each act()")
        obs = self._observations(obs)
        return self.policy.step(self.cache, obs, self.prev_action, self.prev_reward,
                                self.step_in_episode)

    def act(self, obs) -> np.ndarray:
        """Actions (n,) for observations (n, k): sampled (at `temperature`), or the most likely
        if greedy."""
        logits = self.logits(obs) / self.temperature
        if self.greedy:
            actions = logits.argmax(-1)
        else:
            actions = torch.multinomial(logits.softmax(-1), 1, generator=self.generator)[:, 0]
        self.pending = actions
        return actions.cpu().numpy()

    def observe(self, rewards, done):
        """Feed back each row's reward and whether its episode ended with that step."""
        self._check_started()
        if self.pending is None:
            raise RuntimeError("observe() must follow act()")
        rewards, done = np.asarray(rewards, dtype=np.float32), np.asarray(done)
        if rewards.shape != (self.n,) or done.shape != (self.n,) or done.dtype != bool:
            raise ValueError(f"expected rewards of shape ({self.n},) and a bool done of shape "
                             f"({self.n},), got {rewards.shape} and {done.dtype} {done.shape}")
        self.prev_action = self.pending
        self.prev_reward = torch.as_tensor(rewards, device=self.device)
        done = torch.as_tensor(done, device=self.device)
        self.step_in_episode = torch.where(done, 0, self.step_in_episode + 1)
        self.pending = None

    def _check_started(self):
        if self.cache is None:
            raise RuntimeError("call start(n) first")

    def _observations(self, obs) -> torch.Tensor:
        dims = np.asarray(self.policy.cfg.obs_dims)
        obs = np.asarray(obs)
        if obs.shape != (self.n, len(dims)):
            raise ValueError(f"expected observations of shape {(self.n, len(dims))}, "
                             f"got {obs.shape}")
        if not np.issubdtype(obs.dtype, np.integer) or (obs < 0).any() or (obs >= dims).any():
            raise ValueError(f"observations must be integers in [0, {dims.tolist()}) per "
                             f"component, got {obs.dtype} values from {obs.min()} to {obs.max()}")
        return torch.as_tensor(obs, dtype=torch.long, device=self.device)

    def _mask(self, rows) -> torch.Tensor:
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if rows.shape != (self.n,):
                raise ValueError(f"a bool mask of rows must have shape ({self.n},), "
                                 f"got {rows.shape}")
            return torch.as_tensor(rows, device=self.device)
        if rows.size and (not np.issubdtype(rows.dtype, np.integer) or rows.min() < 0
                          or rows.max() >= self.n):
            raise ValueError(f"rows must be a bool mask or indices in [0, {self.n}), got {rows}")
        mask = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        mask[torch.as_tensor(rows.reshape(-1), dtype=torch.long, device=self.device)] = True
        return mask


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_temperature(temperature):
    """A finite number > 0 (inf would flatten every policy to uniform, nan poisons sampling)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not np.isfinite(temperature) or not temperature > 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
