"""Advantage actor-critic (A2C), one small network per task, all networks in batched weight tensors.

The AD paper generated Dark Room histories with A3C; this is its synchronous sibling. Each task has
its own MLP (one-hot observation components -> tanh hidden layer -> policy logits and a value), but
every weight carries a leading task axis and is applied with einsum, so n tasks cost one forward
pass. The loss is a SUM over tasks of per-task losses, so each task's gradient is what it would be
alone, and Adam is elementwise, so no statistic is shared: the tasks learn independently.

Transitions are gathered for `n_steps` steps (or until an episode ends) and turned into n-step
returns. Dark Room episodes end by a time limit, not in a terminal state, so the return is always
bootstrapped from the critic's value of the last next-observation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .base import Source


@dataclass
class ActorCriticConfig:
    lr: float = 0.003
    gamma: float = 0.9
    n_steps: int = 5                 # transitions per update (fewer when an episode ends first)
    hidden: int = 64
    entropy_coef: float = 0.02       # constant bonus keeps the policy from collapsing early
    value_coef: float = 0.5


class ActorCritic(Source):
    name = "actor-critic"
    obs_kinds = ("discrete",)  # one-hot components in, no image encoder

    def __init__(self, obs_dims, n_actions: int, n: int, config: ActorCriticConfig | None = None,
                 seed: int = 0):
        self.config = c = config or ActorCriticConfig()
        self.obs_dims, self.n_actions, self.n = tuple(obs_dims), n_actions, n
        self.gen = torch.Generator().manual_seed(seed)
        # Each observation component k is one-hot encoded at its own offset in the input vector.
        self.offsets = torch.tensor(np.concatenate([[0], np.cumsum(self.obs_dims)[:-1]]))
        n_in = int(sum(self.obs_dims))

        def layer(fan_in, fan_out, scale=1.0):
            bound = scale / np.sqrt(fan_in)
            w = (torch.rand(n, fan_in, fan_out, generator=self.gen) * 2 - 1) * bound
            return w.requires_grad_(), torch.zeros(n, fan_out, requires_grad=True)

        self.w1, self.b1 = layer(n_in, c.hidden)
        self.w_pi, self.b_pi = layer(c.hidden, n_actions, scale=0.01)  # near-uniform initial policy
        # A zero critic gives zero advantages until some reward arrives. A random one would steer
        # the policy by its own initial noise, which Adam's normalised steps amplify.
        self.w_v, self.b_v = layer(c.hidden, 1, scale=0.0)
        self.params = [self.w1, self.b1, self.w_pi, self.b_pi, self.w_v, self.b_v]
        self.optimizer = torch.optim.Adam(self.params, lr=c.lr)
        # One entry per step since the last update: (x, action, reward, x_next, done).
        self.buffer: list[tuple[torch.Tensor, ...]] = []

    def hyperparameters(self) -> dict:
        return asdict(self.config)

    def _one_hot(self, obs) -> torch.Tensor:
        """(n, ..., k) int observations -> (n, ..., sum(obs_dims)) float inputs."""
        idx = torch.as_tensor(np.asarray(obs), dtype=torch.int64) + self.offsets
        x = torch.zeros(*idx.shape[:-1], int(sum(self.obs_dims)))
        return x.scatter_(-1, idx, 1.0)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (n, B, in) -> logits (n, B, A) and values (n, B), task i through network i."""
        h = torch.tanh(torch.einsum("nbi,nih->nbh", x, self.w1) + self.b1[:, None])
        logits = torch.einsum("nbh,nha->nba", h, self.w_pi) + self.b_pi[:, None]
        values = torch.einsum("nbh,nho->nbo", h, self.w_v)[..., 0] + self.b_v
        return logits, values

    @torch.no_grad()
    def act(self, obs, greedy=False):
        logits, _ = self._forward(self._one_hot(obs)[:, None])
        logits = logits[:, 0]
        if greedy:
            return logits.argmax(dim=1).numpy()
        probs = torch.softmax(logits, dim=1)
        return torch.multinomial(probs, 1, generator=self.gen)[:, 0].numpy()

    def update(self, obs, actions, rewards, next_obs, done, terminal=None):
        self.buffer.append((self._one_hot(obs),
                            torch.as_tensor(np.asarray(actions), dtype=torch.int64),
                            torch.as_tensor(np.asarray(rewards), dtype=torch.float32),
                            self._one_hot(next_obs),
                            torch.as_tensor(np.asarray(done), dtype=torch.bool)))
        if len(self.buffer) >= self.config.n_steps or bool(np.any(done)):
            self._learn()

    def _learn(self):
        c = self.config
        x, actions, rewards, x_next, done = (torch.stack(b, dim=1) for b in zip(*self.buffer))
        self.buffer = []
        steps = x.shape[1]
        # One forward pass over the rollout's observations and their successors (for bootstraps).
        logits, values = self._forward(torch.cat([x, x_next], dim=1))
        logits, next_values = logits[:, :steps], values[:, steps:].detach()
        values = values[:, :steps]

        # n-step returns, backwards. A done step bootstraps from its own next obs (time limit, not
        # a terminal state); otherwise the return continues into the next step of the episode.
        returns = torch.empty_like(rewards)
        g = next_values[:, -1]
        for t in reversed(range(steps)):
            g = torch.where(done[:, t], next_values[:, t], g)
            g = rewards[:, t] + c.gamma * g
            returns[:, t] = g

        log_probs = torch.log_softmax(logits, dim=2)
        log_pi_a = log_probs.gather(2, actions[..., None])[..., 0]
        entropy = -(log_probs.exp() * log_probs).sum(dim=2)
        advantage = (returns - values).detach()
        per_task = (-(log_pi_a * advantage).mean(dim=1)
                    + c.value_coef * (returns - values).pow(2).mean(dim=1)
                    - c.entropy_coef * entropy.mean(dim=1))
        self.optimizer.zero_grad()
        per_task.sum().backward()   # sum, not mean: each task's gradient is independent of n
        self.optimizer.step()

    def end_episode(self):
        if self.buffer:             # only when a caller stopped mid-rollout without a done
            self._learn()
