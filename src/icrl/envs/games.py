"""Game suites: several games as one task family, for the Multi-Game Decision Transformer.

A task is a game: its index in the suite's `games`. Every game of a suite shares one observation
spec and one action space (the suite's full action set; each game's legal actions are a subset of
it, and the others act as a no-op, as Atari's full 18-action set does), so one model plays them
all and a batch of environments may mix games.

Unlike the AD families, games are not held out: the Decision Transformer is evaluated on the games
it was trained on, in fresh episodes (the MGDT paper's protocol), so a suite's split trains and
evaluates on every game. A game held out for fine-tuning is a suite of its own.

Episodes end when the game does (`terminal`) or after `max_steps` steps (a time limit, like
Atari's 108,000 frames); a learner must bootstrap through the second kind only.
"""
from __future__ import annotations

import numpy as np

from .base import BatchedEnv, TaskFamily


class GameEnv(BatchedEnv):
    """Rows that each play one game; `terminal[i]` says whether row i's last `done` was the
    game's own end (not the time limit)."""

    terminal: np.ndarray
    n_actions: int

    def check_actions(self, actions) -> np.ndarray:
        """`actions` as (n,) integers of the shared action set; ValueError otherwise."""
        actions = np.asarray(actions)
        if actions.shape != (self.n,):
            raise ValueError(f"expected {self.n} actions, got shape {actions.shape}")
        if actions.size and (not np.issubdtype(actions.dtype, np.integer)
                             or actions.min() < 0 or actions.max() >= self.n_actions):
            raise ValueError(f"actions must be integers in [0, {self.n_actions}), got "
                             f"{actions.tolist()}")
        return actions


class GameSuite(TaskFamily):
    known: tuple[str, ...]          # the games this suite can hold
    action_names: tuple[str, ...]   # the shared action set
    disjoint_split = False          # evaluated on the games it trains on

    def __init__(self, games=None, max_steps: int = 2500):
        games = tuple(self.known if games is None else games)
        if not games or len(set(games)) != len(games):
            raise ValueError(f"a {self.name} suite needs distinct games, got {list(games)}")
        unknown = [g for g in games if g not in self.known]
        if unknown:
            raise ValueError(f"unknown {self.name} game(s) {', '.join(map(str, unknown))}; "
                             f"choose from {', '.join(self.known)}")
        if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) \
                or max_steps < 1:
            raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
        self.games, self.max_steps = games, int(max_steps)
        self.episode_len = self.max_steps
        self.n_actions = len(self.action_names)

    def config(self) -> dict:
        return {"name": self.name, "games": list(self.games), "max_steps": self.max_steps}

    def tasks(self) -> np.ndarray:
        return np.arange(len(self.games), dtype=np.int64)[:, None]

    def game_ids(self, tasks) -> np.ndarray:
        """The game index of each task row; ValueError for an index outside the suite."""
        ids = np.asarray(tasks, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.games)):
            raise ValueError(f"game indices must lie in [0, {len(self.games)}), got {ids}")
        return ids

    def legal_actions(self, game: str) -> list[int]:
        """The game's own actions as indices into the shared action set."""
        raise NotImplementedError

    def oracle_returns(self, tasks) -> np.ndarray:
        return np.full(len(tasks), np.nan)   # unknown: scores are normalised by the data instead

    def split(self, n_test: int = 0, seed: int = 0, n_train: int | None = None) -> dict:
        every = np.arange(len(self.games))
        return {"train": every, "test": every.copy()}

    def random_returns(self, n_episodes: int = 100, seed: int = 0) -> np.ndarray:
        """Each game's mean return under uniformly random legal actions: the 0 of normalised
        scores. All games' episodes run in one batch, (n_games,)."""
        ids = np.repeat(np.arange(len(self.games)), n_episodes)
        env = self.make(ids[:, None], seed=seed)
        rng = np.random.default_rng(seed)
        legal = [self.legal_actions(g) for g in self.games]
        table = np.array([a + a[:1] * (self.n_actions - len(a)) for a in legal])  # padded
        counts = np.array([len(a) for a in legal])[ids]
        returns, finished = np.zeros(len(ids)), np.zeros(len(ids), dtype=bool)
        env.reset()
        while not finished.all():
            actions = table[ids, rng.integers(counts)]
            _, reward, done = env.step(actions)
            returns += np.where(finished, 0.0, reward)
            finished |= done
            if done.any():
                env.reset(done)
        return returns.reshape(len(self.games), n_episodes).mean(axis=1)
