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

import numpy as np
import torch

from .checkpoint import load_policy
from .models.ad import InContextPolicy


class InContextAgent:
    def __init__(self, policy: InContextPolicy, greedy: bool = False, temperature: float = 1.0,
                 seed: int = 0):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
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
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        self.n = int(n)
        self.cache = self.policy.new_cache(self.n)
        self.prev_action = torch.full((self.n,), self.policy.cfg.n_actions, device=self.device)
        self.prev_reward = torch.zeros(self.n, device=self.device)
        self.step_in_episode = torch.zeros(self.n, dtype=torch.long, device=self.device)
        self.pending = None

    def reset(self, rows):
        """Empty the context of some rows (e.g. they now face a new task)."""
        mask = self._mask(rows)
        self.cache.reset(mask)
        self.prev_action[mask] = self.policy.cfg.n_actions
        self.prev_reward[mask] = 0.0
        self.step_in_episode[mask] = 0

    @torch.no_grad()
    def logits(self, obs) -> torch.Tensor:
        """Action logits (n, n_actions) for observations (n, k); adds the step to the context."""
        if self.cache is None:
            raise RuntimeError("call start(n) before acting")
        if self.pending is not None:
            raise RuntimeError("call observe(rewards, done) after each act()")
        obs = torch.as_tensor(np.asarray(obs), dtype=torch.long, device=self.device)
        if obs.shape != (self.n, len(self.policy.cfg.obs_dims)):
            raise ValueError(f"expected observations of shape {(self.n, len(self.policy.cfg.obs_dims))}"
                             f", got {tuple(obs.shape)}")
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
        if self.pending is None:
            raise RuntimeError("observe() must follow act()")
        self.prev_action = self.pending
        self.prev_reward = torch.as_tensor(np.asarray(rewards), dtype=torch.float32,
                                           device=self.device).reshape(self.n)
        done = self._mask(done)
        self.step_in_episode = torch.where(done, 0, self.step_in_episode + 1)
        self.pending = None

    def _mask(self, rows) -> torch.Tensor:
        rows = torch.as_tensor(np.asarray(rows), device=self.device)
        if rows.dtype == torch.bool:
            return rows.reshape(self.n)
        mask = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        mask[rows.long()] = True
        return mask
