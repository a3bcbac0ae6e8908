"""MinAtar's five games (Young & Tian, 2019) as one suite: the CPU-scale Multi-Game benchmark.

Frames are 10x10 with one channel per kind of object (Breakout 4, Asterix 4, Freeway 7, Seaquest
10, Space Invaders 6). The suite pads every game to 10 channels, so the games share one
observation spec and a model trained on some of them can be fine-tuned on another, and stores a
present object as 255 (uint8 frames, as every image family here). The shared action set is
MinAtar's own six actions; a game's illegal actions do nothing, as in MinAtar.

Sticky actions are off (the MGDT paper evaluates with them off; MinAtar's default is 0.1), and
difficulty ramping is on (MinAtar's default). Each row's game has its own seeded random state.
"""
from __future__ import annotations

from importlib import import_module

import numpy as np

from .games import GameEnv, GameSuite
from .spec import ObsSpec

CHANNELS = 10   # the most any game has (Seaquest)
ACTIONS = ("noop", "left", "up", "right", "down", "fire")   # MinAtar's own order


class MinAtarEnv(GameEnv):
    def __init__(self, games: tuple[str, ...], game_ids: np.ndarray, seed: int, max_steps: int):
        modules = {g: import_module(f"minatar.environments.{g}") for g in set(games[i]
                                                                             for i in game_ids)}
        seeds = np.random.SeedSequence(seed).generate_state(len(game_ids))
        self.envs = []
        for i, g in zip(seeds, game_ids):
            env = modules[games[g]].Env(ramping=True)
            env.random = np.random.RandomState(int(i))
            self.envs.append(env)
        self.n, self.max_steps, self.n_actions = len(self.envs), max_steps, len(ACTIONS)
        self.t = np.zeros(self.n, dtype=np.int64)
        self.terminal = np.zeros(self.n, dtype=bool)
        self.frames = np.zeros((self.n, 10, 10, CHANNELS), dtype=np.uint8)

    def _observe(self, rows) -> None:
        for i in rows:
            state = self.envs[i].state()
            self.frames[i] = 0
            self.frames[i, :, :, :state.shape[2]] = state * np.uint8(255)

    def reset(self, mask=None):
        rows = range(self.n) if mask is None else np.flatnonzero(mask)
        for i in rows:
            self.envs[i].reset()
        self.t[rows] = 0
        self._observe(rows)
        return self.frames.copy()

    def step(self, actions):
        actions = self.check_actions(actions)
        reward = np.zeros(self.n, dtype=np.float32)
        for i, (env, a) in enumerate(zip(self.envs, actions.tolist())):
            reward[i], self.terminal[i] = env.act(a)
        self.t += 1
        self._observe(range(self.n))
        return self.frames.copy(), reward, self.terminal | (self.t >= self.max_steps)


class MinAtar(GameSuite):
    name = "minatar"
    known = ("breakout", "asterix", "freeway", "seaquest", "space_invaders")
    action_names = ACTIONS
    obs_spec = ObsSpec.image(10, 10, CHANNELS)

    def make(self, tasks, seed: int = 0) -> MinAtarEnv:
        return MinAtarEnv(self.games, self.game_ids(tasks), seed, self.max_steps)

    def legal_actions(self, game: str) -> list[int]:
        env = import_module(f"minatar.environments.{game}").Env()
        # MinAtar's action_map is the shared set in the same order: its indices are ours
        assert [_NAMES[a] for a in env.action_map] == list(self.action_names)
        return [int(a) for a in env.minimal_action_set()]


_NAMES = {"n": "noop", "l": "left", "u": "up", "r": "right", "d": "down", "f": "fire"}
