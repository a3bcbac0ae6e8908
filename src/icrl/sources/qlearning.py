"""Tabular Q-learning, one Q-table per task, all tables in one (n, S, A) array.

Optimistic initial values drive systematic exploration (untried actions look good until tried), and
epsilon-greedy noise decays over episodes; the histories go from random to optimal.

With `planning_sweeps` > 0 it is Dyna-style Q-learning: it also remembers the last outcome of
every tried (state, action) and, after each episode, replays all of them `planning_sweeps` times
(a task's remaining sweeps are skipped once one leaves its values unchanged: the same result, bit
for bit, at a fraction of the cost; docs/benchmarks.md). Values then travel the whole grid at
once: the learner heads for the nearest untried action until it finds reward, and from the next
episode on goes straight back to it — a fast, systematic learner whose histories are short and
whose improvement is easy to see within a few episodes.

With `reward_stages` = m > 1 the learner's state is (observation, rewards collected so far this
episode, capped at m - 1): in Key-to-Door the observation (x, y) alone does not say whether the key
is held, but the learner knows whether it has been paid for it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .base import Source


@dataclass
class QLearningConfig:
    lr: float = 0.5
    gamma: float = 0.9
    init_value: float = 1.0          # optimism: >= any reachable value explores more
    eps_start: float = 0.2
    eps_end: float = 0.0
    eps_decay_episodes: int = 30     # linear decay from eps_start to eps_end
    planning_sweeps: int = 0         # Dyna replay sweeps over all tried (s, a) after each episode
    reward_stages: int = 1           # > 1: the state also counts this episode's rewards (capped)
    optimism_decay: float = 1.0      # < 1: untried actions' value is init_value * decay**episode


class QLearning(Source):
    name = "qlearning"
    obs_kinds = ("discrete",)  # a table indexed by the observation's components

    def __init__(self, obs_dims, n_actions: int, n: int, config: QLearningConfig | None = None,
                 seed: int = 0):
        self.config = config or QLearningConfig()
        self.obs_dims, self.n_actions, self.n = tuple(obs_dims), n_actions, n
        if self.config.reward_stages < 1:
            raise ValueError("reward_stages must be >= 1")
        if not 0 < self.config.optimism_decay <= 1:
            raise ValueError("optimism_decay must be in (0, 1]")
        if self.config.optimism_decay < 1 and self.config.planning_sweeps < 1:
            raise ValueError("optimism_decay < 1 needs planning_sweeps >= 1 (its model knows "
                             "which actions were tried)")
        n_states = int(np.prod(obs_dims)) * self.config.reward_stages
        self.q = np.full((n, n_states, n_actions), self.config.init_value, dtype=np.float32)
        self.stage = np.zeros(n, dtype=np.int64)
        self.rng = np.random.default_rng(seed)
        if self.config.planning_sweeps > 0:  # the learned deterministic model
            self.tried = np.zeros(self.q.shape, dtype=bool)
            self.next_state = np.zeros(self.q.shape, dtype=np.int64)
            self.reward = np.zeros(self.q.shape, dtype=np.float32)
        self.rows = np.arange(n)
        self.episode = 0

    def hyperparameters(self) -> dict:
        # optimism_decay came later: left out at its default (none), stores made before it and
        # with the same settings still match.
        settings = asdict(self.config)
        if settings["optimism_decay"] == 1.0:
            del settings["optimism_decay"]
        return settings

    def _state(self, obs, stage):
        cell = np.ravel_multi_index(tuple(np.asarray(obs).T), self.obs_dims)
        return cell * self.config.reward_stages + stage

    def _next_stage(self, rewards):
        return np.minimum(self.stage + (np.asarray(rewards) > 0), self.config.reward_stages - 1)

    @property
    def epsilon(self) -> float:
        c = self.config
        frac = min(self.episode / max(c.eps_decay_episodes, 1), 1.0)
        return c.eps_start + frac * (c.eps_end - c.eps_start)

    def act(self, obs, greedy=False):
        q = self.q[self.rows, self._state(obs, self.stage)]
        # Random tie-breaking: among equal values, every action is equally likely.
        best = np.argmax(q + self.rng.random(q.shape) * 1e-9, axis=1)
        if greedy:
            return best
        explore = self.rng.random(self.n) < self.epsilon
        return np.where(explore, self.rng.integers(self.n_actions, size=self.n), best)

    def update(self, obs, actions, rewards, next_obs, done, terminal=None):
        s, s2 = self._state(obs, self.stage), self._state(next_obs, self._next_stage(rewards))
        # Episodes end by a time limit, not in a terminal state: always bootstrap.
        target = rewards + self.config.gamma * self.q[self.rows, s2].max(axis=1)
        q_sa = self.q[self.rows, s, actions]
        self.q[self.rows, s, actions] = q_sa + self.config.lr * (target - q_sa)
        if self.config.planning_sweeps > 0:
            self.tried[self.rows, s, actions] = True
            self.next_state[self.rows, s, actions] = s2
            # The best reward seen: in Dark Room Hard the goal pays only on the first visit.
            self.reward[self.rows, s, actions] = np.maximum(self.reward[self.rows, s, actions],
                                                            rewards)

    def track(self, rewards, done):
        self.stage = np.where(done, 0, self._next_stage(rewards))

    def end_episode(self):
        self.episode += 1
        if self.config.planning_sweeps == 0:
            return
        if self.config.optimism_decay < 1:   # before the sweeps, so they back up the new values
            self.q[~self.tried] = self.config.init_value * self.config.optimism_decay ** self.episode
        # Synchronous sweeps over the tried (task, s, a) only, as flat indices into q (sorted,
        # so grouped by task): Q(s, a) <- Q + lr * (r + gamma * max_a' Q(s', a') - Q), every
        # backup from the values before the sweep.
        n_states, n_actions = self.q.shape[1:]
        tried = np.flatnonzero(self.tried)
        task = tried // (n_states * n_actions)
        next_row = self.next_state.reshape(-1)[tried] + task * n_states   # row of q_rows
        reward = self.reward.reshape(-1)[tried]
        q, q_rows = self.q.reshape(-1), self.q.reshape(-1, n_actions)
        for _ in range(self.config.planning_sweeps):
            after = q_rows[next_row]
            value = after[:, 0].copy()  # a running maximum beats numpy's max over a short axis
            for a in range(1, n_actions):
                np.maximum(value, after[:, a], out=value)
            before = q[tried]
            new = before + self.config.lr * (reward + self.config.gamma * value - before)
            q[tried] = new
            # A task whose values came out of a sweep bit for bit unchanged would go through
            # every later sweep unchanged too: only the tasks that changed go on.
            changed = new.view(np.uint32) != before.view(np.uint32)
            if not changed.all():
                going = np.zeros(self.n, dtype=bool)
                going[task[changed]] = True
                keep = going[task]
                if not keep.any():
                    break
                tried, task = tried[keep], task[keep]
                next_row, reward = next_row[keep], reward[keep]
