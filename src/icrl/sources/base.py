"""The source-algorithm interface and the loop that turns a batch of learners into histories."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from ..envs.base import TaskFamily


class Source(ABC):
    """One independent learner per task, all held and updated together (never a loop over tasks).

    A source whose `obs_kinds` do not take a family's observations may still learn on the
    family's true state (`TaskFamily.state_spec`): `make_source` then sets `observes_state`, and
    `collect` hands it `env.state()` in place of the observations, which it still records."""

    name: str
    observes_state: bool = False

    @abstractmethod
    def act(self, obs: np.ndarray, greedy: bool = False) -> np.ndarray:
        """Actions (n,) for observations (n, k); `greedy` picks the learner's current best action."""

    @abstractmethod
    def update(self, obs, actions, rewards, next_obs, done, terminal=None) -> None:
        """Learn from one batched transition (each argument has a leading task axis). `terminal`
        (bool, or None: all False) marks episodes that ended in a terminal state, which a learner
        must not bootstrap through; `done` alone may be a time limit."""

    def track(self, rewards: np.ndarray, done: np.ndarray) -> None:
        """Called after every step, learning or not (e.g. to follow progress within an episode)."""

    def end_episode(self) -> None:
        """Called when every task finished an episode (e.g. to decay exploration)."""


@dataclass
class Histories:
    """Recorded steps of n tasks: obs (n, T, *obs_spec.shape) in obs_spec.store_dtype, actions
    (n, T) uint8, rewards (n, T) float32, dones (n, T) bool (True where an episode ends with that
    step), plus every episode's return (n, n_episodes), recorded or not: the source's learning
    curve."""

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    episode_returns: np.ndarray
    dones: np.ndarray

    @classmethod
    def empty(cls, n: int, steps: int, spec, n_episodes: int = 0) -> "Histories":
        """Zeros for n rows of `steps` steps of observations of ObsSpec `spec`."""
        return cls(np.zeros((n, steps, *spec.shape), dtype=spec.store_dtype),
                   np.zeros((n, steps), dtype=np.uint8), np.zeros((n, steps), dtype=np.float32),
                   np.zeros((n, n_episodes), dtype=np.float32), np.zeros((n, steps), dtype=bool))


def collect(family: TaskFamily, tasks: np.ndarray, source: Source, n_episodes: int, *,
            every: int = 1, record_from: int = 0, greedy_from: int | None = None, seed: int = 0,
            progress: bool = False) -> Histories:
    """Run `source` for `n_episodes` episodes on each task, all tasks at once.

    Episodes e >= record_from with (e - record_from) % every == 0 are recorded (subsampling keeps
    every k-th episode, as in the paper's Fig. 6). From episode `greedy_from` on, the learner acts
    greedily and stops learning: that is how expert (converged-policy) data is made. A source that
    `observes_state` acts and learns on `env.state()`; the observations are recorded either way.
    """
    if source.observes_state and family.state_spec is None:
        raise ValueError(f"{source.name} observes the state, but {family.name} has no state_spec")
    env = family.make(tasks, seed=seed)
    seen = env.state if source.observes_state else None   # what the learner sees, if not obs
    n, T = len(tasks), family.episode_len
    kept = [e for e in range(record_from, n_episodes) if (e - record_from) % every == 0]
    hist = Histories.empty(n, len(kept) * T, family.obs_spec, n_episodes)
    slot = 0
    for e in tqdm(range(n_episodes), desc=f"{source.name} episodes", disable=not progress,
                  leave=False):
        greedy = greedy_from is not None and e >= greedy_from
        record = slot < len(kept) and kept[slot] == e
        obs = env.reset()
        state = obs if seen is None else seen()
        for t in range(T):
            actions = source.act(state, greedy=greedy)
            if record or seen is None:
                next_obs, rewards, done = env.step(actions)
            else:  # a learner on the state needs no frames of the episodes not kept
                next_obs, (rewards, done) = None, env.advance(actions)
            next_state = next_obs if seen is None else seen()
            if not greedy:
                source.update(state, actions, rewards, next_state, done)
            source.track(rewards, done)
            if record:
                i = slot * T + t
                hist.obs[:, i], hist.actions[:, i], hist.rewards[:, i], hist.dones[:, i] = \
                    obs, actions, rewards, done
            hist.episode_returns[:, e] += rewards
            obs, state = next_obs, next_state
        if not done.all():
            raise RuntimeError(f"{family.name}: episodes must end after episode_len steps")
        source.end_episode()
        slot += record
    return hist


def collect_run(family: TaskFamily, tasks: np.ndarray, source: Source, n_steps: int, *,
                seed: int = 0, progress: bool = False) -> Histories:
    """Run `source` for `n_steps` environment steps on each task, all tasks at once, and record
    every transition: a whole learning run as replay data (DQN-Replay). Each task starts a new
    episode as soon as its last one ends, so episodes have any length up to episode_len and rows
    need not be in step. `episode_returns` holds each row's finished episodes, NaN after its
    last. The learner learns throughout (`end_episode` is not called: its exploration decays by
    steps); environments that tell a game's end from a time limit (`env.terminal`) pass it on."""
    if source.observes_state and family.state_spec is None:
        raise ValueError(f"{source.name} observes the state, but {family.name} has no state_spec")
    env = family.make(tasks, seed=seed)
    seen = env.state if source.observes_state else None
    n = len(tasks)
    hist = Histories.empty(n, n_steps, family.obs_spec)
    finished: list[list[float]] = [[] for _ in range(n)]
    running = np.zeros(n, dtype=np.float64)
    obs = env.reset()
    state = obs if seen is None else seen()
    for t in tqdm(range(n_steps), desc=f"{source.name} steps", disable=not progress,
                  leave=False, mininterval=1.0):
        actions = source.act(state)
        next_obs, rewards, done = env.step(actions)
        next_state = next_obs if seen is None else seen()
        terminal = getattr(env, "terminal", None)
        source.update(state, actions, rewards, next_state, done,
                      terminal=None if terminal is None else terminal & done)
        source.track(rewards, done)
        hist.obs[:, t], hist.actions[:, t], hist.rewards[:, t], hist.dones[:, t] = \
            obs, actions, rewards, done
        running += rewards
        if done.any():
            for i in np.flatnonzero(done):
                finished[i].append(running[i])
            running[done] = 0.0
            next_obs = env.reset(done)
            next_state = next_obs if seen is None else seen()
        obs, state = next_obs, next_state
    hist.episode_returns = np.full((n, max(1, max(map(len, finished)))), np.nan, np.float32)
    for i, row in enumerate(finished):
        hist.episode_returns[i, :len(row)] = row
    return hist
