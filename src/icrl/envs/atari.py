"""Atari 2600 games as one suite, through the Arcade Learning Environment: the Multi-Game Decision
Transformer's benchmark (Lee et al., 2022) on DQN's preprocessing (Mnih et al., 2015).

- **Frames**: 84x84 grayscale, one channel (ObsSpec image(84, 84, 1)). Each agent step repeats its
  action for 4 emulator frames and observes the pixelwise max of the last two (Atari sprites
  flicker between frames), shrunk from 210x160 by area averaging: two fixed matrices,
  frame' = A @ frame @ B, for every row at once (no OpenCV).
- **Actions**: the full 18-action joystick set (ALE's `Action` order) is the shared action space.
  A game's legal actions are its minimal action set (`legal_actions`); the others do nothing
  (they are sent to the emulator as NOOP), so one policy head serves every game.
- **Sticky actions are off** (repeat_action_probability 0), as the MGDT paper evaluates. ALE is
  then deterministic, so every reset also plays a random number of no-op steps, at most
  `noop_max` (DQN's evaluation protocol; 0 turns it off): that is where the seed comes in.
- **Episodes** end at game over (`terminal`, lives are not episodes) or after `max_steps` agent
  steps (default 27,000 = 108,000 frames, the usual limit), which is a `done` without `terminal`.

The ROMs ship in the ale-py wheel (`ale_py.roms`); nothing is downloaded. Each row of a batch
holds its own emulator (ALE is C++: rows are stepped in a Python loop; building one loads the ROM
in about 0.1 s).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .games import GameEnv, GameSuite
from .spec import ObsSpec

SIZE = 84          # frames are SIZE x SIZE
SCREEN = (210, 160)
FRAME_SKIP = 4     # emulator frames per agent step
# The Atari games with DQN-Replay data (Agarwal et al., 2020), ALE's names. The MGDT paper trains
# on 41 of them and holds out alien, ms_pacman, pong, space_invaders and star_gunner.
GAMES = (
    "air_raid", "alien", "amidar", "assault", "asterix", "asteroids", "atlantis", "bank_heist",
    "battle_zone", "beam_rider", "berzerk", "bowling", "boxing", "breakout", "carnival",
    "centipede", "chopper_command", "crazy_climber", "demon_attack", "double_dunk",
    "elevator_action", "enduro", "fishing_derby", "freeway", "frostbite", "gopher", "gravitar",
    "hero", "ice_hockey", "jamesbond", "journey_escape", "kangaroo", "krull", "kung_fu_master",
    "montezuma_revenge", "ms_pacman", "name_this_game", "phoenix", "pitfall", "pong", "pooyan",
    "private_eye", "qbert", "riverraid", "road_runner", "robotank", "seaquest", "skiing",
    "solaris", "space_invaders", "star_gunner", "tennis", "time_pilot", "tutankham", "up_n_down",
    "venture", "video_pinball", "wizard_of_wor", "yars_revenge", "zaxxon")
# The default suite: the five games MinAtar miniaturises, so results can be set side by side.
DEFAULT_GAMES = ("breakout", "asterix", "freeway", "seaquest", "space_invaders")


def _ale():
    import ale_py   # imported on use: the other families do not need it

    # ALE prints a banner and the seed on every ROM load unless told to report errors only
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
    return ale_py


def area_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights that average n_in pixels into n_out by area: output pixel i covers
    input interval [i, i + 1) * n_in / n_out, and each input pixel counts by its overlap."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    left, right = edges[:-1, None], edges[1:, None]
    pixel = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(right, pixel + 1) - np.maximum(left, pixel), 0, None)
    return (overlap / (n_in / n_out)).astype(np.float32)


_ROWS = area_matrix(SIZE, SCREEN[0])       # frame' = _ROWS @ frame @ _COLS
_COLS = area_matrix(SIZE, SCREEN[1]).T


def shrink(screens: np.ndarray) -> np.ndarray:
    """Grayscale screens (n, 210, 160) uint8 as (n, 84, 84) uint8, by area averaging."""
    # PyTorch's products rather than NumPy's: OpenBLAS spreads even these small ones over
    # every core, which made them several times slower with 2 threads than with 1 (and data
    # generation as a whole 2.6x slower: docs/atari.md); PyTorch's do not slow down so.
    import torch

    small = torch.from_numpy(_ROWS) @ torch.from_numpy(screens).float() @ torch.from_numpy(_COLS)
    return small.round_().clamp_(0, 255).to(torch.uint8).numpy()


@lru_cache(maxsize=None)
def minimal_actions(game: str) -> tuple[int, ...]:
    """A game's minimal action set as indices into ALE's 18 actions (loads the ROM once)."""
    ale_py = _ale()
    ale = ale_py.ALEInterface()
    ale.loadROM(ale_py.roms.get_rom_path(game))
    return tuple(a.value for a in ale.getMinimalActionSet())


class AtariEnv(GameEnv):
    def __init__(self, games: tuple[str, ...], game_ids: np.ndarray, seed: int, max_steps: int,
                 noop_max: int):
        ale_py = _ale()
        actions = list(ale_py.Action)
        self.n, self.max_steps, self.noop_max = len(game_ids), max_steps, noop_max
        self.n_actions = len(actions)
        self.ales, self.table = [], []
        rows = np.random.SeedSequence(seed).spawn(self.n)
        self.rngs = [np.random.default_rng(row) for row in rows]
        for row, g in zip(rows, game_ids):
            ale = ale_py.ALEInterface()
            ale.setInt("random_seed", int(row.generate_state(1)[0] % 2**31))
            ale.setFloat("repeat_action_probability", 0.0)
            ale.loadROM(ale_py.roms.get_rom_path(games[g]))
            self.ales.append(ale)
            # the shared action index -> the emulator's action: NOOP where the game has none
            legal = set(minimal_actions(games[g]))
            self.table.append([a if i in legal else actions[0] for i, a in enumerate(actions)])
        self.noop = actions[0]
        self.t = np.zeros(self.n, dtype=np.int64)
        self.terminal = np.zeros(self.n, dtype=bool)
        self.screens = np.zeros((self.n, 2, *SCREEN), dtype=np.uint8)  # the last two frames
        self.frames = np.zeros((self.n, SIZE, SIZE, 1), dtype=np.uint8)

    def _repeat(self, i: int, action, grab: bool) -> float:
        """Play `action` for FRAME_SKIP frames on row i (fewer if the game ends); with `grab`,
        keep the screens of the last two frames played."""
        ale, screens = self.ales[i], self.screens[i]
        total = 0
        for k in range(FRAME_SKIP):
            total += ale.act(action)
            over = ale.game_over()
            if grab and (over or k >= FRAME_SKIP - 2):
                ale.getScreenGrayscale(screens[1 if over else k - FRAME_SKIP + 2])
                if over and k < FRAME_SKIP - 1:   # no second frame: max over the one
                    screens[0] = screens[1]
            if over:
                break
        return float(total)

    def _observe(self, rows) -> None:
        self.frames[rows, :, :, 0] = shrink(self.screens[rows].max(axis=1))

    def reset(self, mask=None):
        rows = np.arange(self.n) if mask is None else np.flatnonzero(mask)
        for i in rows.tolist():
            ale = self.ales[i]
            ale.reset_game()
            self.screens[i] = ale.getScreenGrayscale()[None]
            for _ in range(self.rngs[i].integers(self.noop_max + 1)):
                self._repeat(i, self.noop, grab=True)
                if ale.game_over():   # cannot happen in a few steps of any game here; be safe
                    ale.reset_game()
                    self.screens[i] = ale.getScreenGrayscale()[None]
        self.t[rows] = 0
        self.terminal[rows] = False
        self._observe(rows)
        return self.frames.copy()

    def _step(self, actions, observe: bool):
        actions = self.check_actions(actions)
        reward = np.zeros(self.n, dtype=np.float32)
        for i, a in enumerate(actions.tolist()):
            reward[i] = self._repeat(i, self.table[i][a], observe)
            self.terminal[i] = self.ales[i].game_over()
        self.t += 1
        if observe:
            self._observe(np.arange(self.n))
        return reward, self.terminal | (self.t >= self.max_steps)

    def step(self, actions):
        reward, done = self._step(actions, observe=True)
        return self.frames.copy(), reward, done

    def advance(self, actions):
        return self._step(actions, observe=False)   # no screens grabbed, no frames shrunk


class Atari(GameSuite):
    name = "atari"
    known = GAMES
    action_names = ("noop", "fire", "up", "right", "left", "down", "upright", "upleft",
                    "downright", "downleft", "upfire", "rightfire", "leftfire", "downfire",
                    "uprightfire", "upleftfire", "downrightfire", "downleftfire")
    obs_spec = ObsSpec.image(SIZE, SIZE, 1)

    def __init__(self, games=None, max_steps: int = 27_000, noop_max: int = 30):
        super().__init__(DEFAULT_GAMES if games is None else games, max_steps)
        if isinstance(noop_max, bool) or not isinstance(noop_max, (int, np.integer)) \
                or noop_max < 0:
            raise ValueError(f"noop_max must be an integer >= 0, got {noop_max!r}")
        self.noop_max = int(noop_max)

    def config(self) -> dict:
        return {**super().config(), "noop_max": self.noop_max}

    def make(self, tasks, seed: int = 0) -> AtariEnv:
        return AtariEnv(self.games, self.game_ids(tasks), seed, self.max_steps, self.noop_max)

    def legal_actions(self, game: str) -> list[int]:
        if game not in self.known:
            raise ValueError(f"unknown {self.name} game {game!r}; choose from "
                             f"{', '.join(self.known)}")
        return list(minimal_actions(game))
