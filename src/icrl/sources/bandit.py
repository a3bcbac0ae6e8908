"""Bandit learners, one per task, all held in (n, arms) arrays: UCB1, Thompson sampling and the
uniform random policy (a reference that works for any family). Observations are ignored."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .base import Source


@dataclass
class UCBConfig:
    c: float = 1.0            # exploration bonus: mean + c * sqrt(2 ln t / pulls)


@dataclass
class ThompsonConfig:
    prior_successes: float = 1.0     # Beta(prior_successes, prior_failures) on each arm's mean
    prior_failures: float = 1.0


@dataclass
class RandomConfig:
    pass


class _ArmCounts(Source):
    """Per-task pull counts and reward sums; greedy = the best empirical mean (ties at random)."""

    def __init__(self, obs_dims, n_actions: int, n: int, config, seed: int = 0):
        self.config, self.n, self.n_actions = config, n, n_actions
        self.pulls = np.zeros((n, n_actions))
        self.wins = np.zeros((n, n_actions))
        self.rows = np.arange(n)
        self.rng = np.random.default_rng(seed)

    def hyperparameters(self) -> dict:
        return asdict(self.config)

    def _argmax(self, scores):
        """Row-wise argmax with exact ties broken uniformly at random (untried arms score inf,
        so they are tried first, in a random order)."""
        ties = scores == scores.max(axis=1, keepdims=True)
        return np.argmax(ties * (1 + self.rng.random(scores.shape)), axis=1)

    def _greedy(self):
        return self._argmax(np.where(self.pulls > 0, self.wins / np.maximum(self.pulls, 1), -1.0))

    def update(self, obs, actions, rewards, next_obs, done, terminal=None):
        self.pulls[self.rows, actions] += 1
        self.wins[self.rows, actions] += rewards


class UCB(_ArmCounts):
    name = "ucb"
    families = ("bandit",)  # one pull per episode, observations ignored

    def act(self, obs, greedy=False):
        if greedy:
            return self._greedy()
        t = self.pulls.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            bonus = self.config.c * np.sqrt(2 * np.log(np.maximum(t, 1)) / self.pulls)
            scores = self.wins / self.pulls + bonus
        return self._argmax(np.where(self.pulls == 0, np.inf, scores))


class Thompson(_ArmCounts):
    name = "thompson"
    families = ("bandit",)  # Bernoulli rewards, one pull per episode

    def act(self, obs, greedy=False):
        if greedy:
            return self._greedy()
        c = self.config
        return self._argmax(self.rng.beta(c.prior_successes + self.wins,
                                          c.prior_failures + self.pulls - self.wins))


class RandomPolicy(_ArmCounts):
    name = "random"

    def act(self, obs, greedy=False):
        return self.rng.integers(self.n_actions, size=self.n)
