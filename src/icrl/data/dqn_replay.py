"""Import the DQN Replay Dataset (Agarwal et al., 2020): the data of the Multi-Game Decision
Transformer, as one history store of kind "replay" for one Atari game.

The dataset keeps each DQN run as Dopamine replay-buffer checkpoints, in `GAME/RUN/replay_logs/`:
for a checkpoint N, `$store$_observation_ckpt.N.gz` (frames, (n, 84, 84) uint8),
`$store$_action_ckpt.N.gz` (int32 indices into the game's *minimal* action set),
`$store$_reward_ckpt.N.gz` (float32), `$store$_terminal_ckpt.N.gz` (uint8: 1 where an episode
ends) and `add_count_ckpt.N.gz` (how many transitions were ever added), each an `np.save`d array
in a gzip file. Transition i is (frame i, the action taken on it, its reward, whether the
episode ended with it), as in our stores.

What the import does with them:
- **Order.** The buffer is a ring: once more transitions were added than it holds, the oldest sits
  at add_count % size, and is rolled to the front; a buffer not yet full holds add_count
  transitions. Without `add_count_ckpt.N.gz` the buffer is read as it lies (full, oldest first).
- **Padding.** Dopamine opens every episode with stack_size - 1 = 3 blank transitions (zero frame,
  action, reward) so that its frame stacks never reach into the previous episode; they are not
  steps of the game and are dropped (and checked to be blank: other data is refused). The oldest
  steps of a full ring may be the tail of such padding whose episode end was overwritten: those
  (at most 3) are kept, in a first episode that is not counted anyway.
- **Actions** are mapped into the Atari suite's shared 18-action set (`Atari.legal_actions`).
  An action index beyond the game's minimal set is refused: the files are probably another
  game's. That is the only check of the game: the files do not name it, and a game with at
  least as many actions as the one claimed passes, so name the right game.
- **Rewards** are clipped to their sign, as the MGDT paper's reward tokens and DQN's targets use
  them (Dopamine already stores them clipped to [-1, 1]; Atari's rewards are integers).
- **Rows.** Each checkpoint becomes one history row (seed = the checkpoint's number). Rows of a
  store have one length, so every row is trimmed to the shortest (its oldest steps kept); the
  lengths before trimming are kept in the metadata (`source.config.steps`) and, with progress on,
  a trim is reported on stderr. A row starts and ends mid-episode (the buffer is a window of a
  longer run): `episode_returns` holds the clipped returns of the episodes wholly inside it,
  NaN-padded (the first counts only for a buffer that holds its run from the start).

Episodes are up to 27,000 steps (DQN-Replay's time limit, the suite's `max_steps`); their end is
`terminal` whether the game ended or the time ran out (Dopamine does not tell them apart). The
data was collected with sticky actions (25%), the suite plays without them.

One checkpoint is read at a time and its frames stream from the gzip file straight into place,
so memory holds one row of frames (a full checkpoint of 1M steps: 7 GB) and nothing more.
"""
from __future__ import annotations

import gzip
import re
import sys
import zlib
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..atomic import output_lock
from ..envs.atari import SIZE, Atari
from ..errors import UserError
from ..resources import check_fits
from .store import HistoryArrays, HistoryStore, bad_values, write_store

STORE = "$store$_{}_ckpt.{}.gz"      # Dopamine's file names
ADD_COUNT = "add_count_ckpt.{}.gz"
ARRAYS = ("observation", "action", "reward", "terminal")
PADDING = 3            # blank transitions that open each episode (Dopamine's stack_size 4, - 1)
BLOCK = 4096           # frames decompressed at a time
SOURCE = "dqn-replay"


def game_name(game: str) -> str:
    """ALE's name for a game, also given DQN-Replay's folder name (SpaceInvaders)."""
    return re.sub(r"(?<=[^_])(?=[A-Z])", "_", str(game)).lower()


def find_checkpoints(replay_dir: str | Path) -> list[int]:
    """The checkpoint numbers N with a `$store$_observation_ckpt.N.gz` in `replay_dir`, sorted."""
    found = (re.fullmatch(r"\$store\$_observation_ckpt\.(\d+)\.gz", p.name)
             for p in Path(replay_dir).iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def import_dqn_replay(replay_dir: str | Path, game: str, out: str | Path,
                      checkpoints=None, progress: bool = True) -> Path:
    """Write the DQN-Replay checkpoints in `replay_dir` (a run's `replay_logs` folder) of Atari
    `game` to the history file `out` and return its path. `checkpoints`: their numbers (default:
    every one there), one history row each. See the module docstring for what is kept and how.

    Rerunning with the same arguments returns the file already there; any other file at `out` is
    refused. Every problem with the inputs is a one-line UserError: before any writing where the
    names, headers and small arrays show it (layouts, lengths, action ranges), else as the frames
    are read (a damaged observation file), and then nothing is left at `out`."""
    replay_dir, out = Path(replay_dir), Path(out)
    game = game_name(game)
    if game not in Atari.known:
        raise UserError(f"unknown Atari game {game!r}; choose from {', '.join(Atari.known)}")
    if not replay_dir.is_dir():
        raise UserError(f"{replay_dir}: no such directory" if not replay_dir.exists() else
                        f"{replay_dir} is not a directory")
    numbers = _checkpoint_list(replay_dir, checkpoints)
    family = Atari(games=[game])
    legal = np.asarray(family.legal_actions(game), dtype=np.uint8)
    source = {"name": SOURCE, "config": {"dir": str(replay_dir.resolve()), "game": game,
                                         "checkpoints": numbers}}
    with output_lock(out):
        if _finished(out, source):
            return out
        meta = {"kind": "replay", "family": family.config(),
                "split": {"seed": 0, **{k: v.tolist() for k, v in family.split().items()}},
                "source": source, "obs_spec": family.obs_spec.to_dict(),
                "n_actions": family.n_actions, "episode_len": family.episode_len,
                "n_episodes": None, "every": 1, "record_from": 0}
        # Pass 1, on the small arrays: the layout of every row, so that the rows' common length
        # and most episodes are known before the first frame is written.
        rows = [_Checkpoint(replay_dir, n, len(legal), meta) for n in numbers]
        T = min(r.length for r in rows)
        check_fits(f"the {T} frames of a checkpoint", "they are held in memory while written: "
                   "use a machine with more memory", memory=T * SIZE * SIZE)
        source["config"]["steps"] = [r.length for r in rows]
        if progress and any(r.length > T for r in rows):
            print(f"import-dqn-replay: checkpoints hold {min(r.length for r in rows)} to "
                  f"{max(r.length for r in rows)} steps; every row is trimmed to {T}",
                  file=sys.stderr)
        meta["n_episodes"] = max(1, max(r.n_finished(T) for r in rows))

        def parts():
            for row in tqdm(rows, desc=f"import {out.name} (checkpoints)", disable=not progress):
                yield row.read(T, legal, meta["n_episodes"])

        return write_store(out, parts(), meta)


def _checkpoint_list(replay_dir: Path, checkpoints) -> list[int]:
    if checkpoints is None:
        numbers = find_checkpoints(replay_dir)
        if not numbers:
            raise UserError(f"{replay_dir}: no DQN-Replay checkpoints "
                            f"({STORE.format('observation', 'N')}); the dataset keeps them in "
                            f"GAME/RUN/replay_logs")
    else:
        numbers = list(checkpoints) if not isinstance(checkpoints, (int, str)) else [checkpoints]
        if not numbers or any(isinstance(n, bool) or not isinstance(n, (int, np.integer))
                              or n < 0 for n in numbers) or len(set(numbers)) != len(numbers):
            raise UserError(f"checkpoints must be distinct integers >= 0, got {checkpoints!r}")
        numbers = [int(n) for n in numbers]
    for n in numbers:
        missing = [STORE.format(a, n) for a in ARRAYS if not (replay_dir / STORE.format(a, n))
                   .is_file()]
        if missing:
            raise UserError(f"{replay_dir}: checkpoint {n} lacks {', '.join(missing)}")
    return numbers


def _finished(out: Path, source: dict) -> bool:
    """Whether `out` already holds this import; anything else there is refused."""
    if not (out.exists() or out.is_symlink()):
        return False
    if out.is_dir():
        raise UserError(f"{out} is a directory, expected a file path")
    try:
        with HistoryStore(out) as store:
            stored = store.meta["source"]
    except UserError:
        raise UserError(f"{out} exists and is not an icrl history file; not overwriting it "
                        f"(delete it or choose another path)") from None
    mine = {**source, "config": {k: v for k, v in source["config"].items() if k != "steps"}}
    theirs = {**stored, "config": {k: v for k, v in stored.get("config", {}).items()
                                   if k != "steps"}} if isinstance(stored, dict) else stored
    if theirs != mine:
        raise UserError(f"{out} holds another dataset; delete it or choose another output path")
    return True


class _Checkpoint:
    """One checkpoint's layout, from its small arrays: the file index of every kept step in time
    order (`kept`), the blank padding (`pad`), and where episodes end."""

    def __init__(self, folder: Path, number: int, n_legal: int, meta: dict):
        self.folder, self.number = folder, number
        path = folder / STORE.format("observation", number)
        with _opened(path) as f:
            shape, dtype = _header(f, path)
            if len(shape) != 3 or shape[1:] != (SIZE, SIZE) or dtype != np.uint8:
                raise UserError(f"{path}: observations of shape {shape} and dtype {dtype}, "
                                f"expected (n, {SIZE}, {SIZE}) uint8")
            size = shape[0]
            head = _body(f, path, (min(PADDING, size), SIZE, SIZE), dtype, last=False)
        action, reward, terminal = self._small()
        lengths = {"observation": size, "action": len(action), "reward": len(reward),
                   "terminal": len(terminal)}
        if len(set(lengths.values())) != 1:
            raise UserError(f"{folder}: checkpoint {number} has arrays of different lengths ("
                            + ", ".join(f"{k} {v}" for k, v in lengths.items()) + ")")
        if action.size and (action.min() < 0 or action.max() >= n_legal):
            bad = action[(action < 0) | (action >= n_legal)][0]
            raise UserError(f"{folder}: checkpoint {number} holds action {bad}, outside the "
                            f"{n_legal} actions of {meta['family']['games'][0]}: probably "
                            f"another game's data")
        if not np.isin(terminal, (0, 1)).all():
            raise UserError(f"{folder}: checkpoint {number} has terminal flags other than 0 "
                            f"and 1")
        count = self._add_count()
        if size == 0 or count == 0:
            raise UserError(f"{folder}: checkpoint {number} holds no transitions")
        if count is None:    # read as it lies; from a run's start if it opens with the padding
            self.order = np.arange(size)
            self.from_start = size >= PADDING and not (head.any() or action[:PADDING].any()
                                                       or reward[:PADDING].any()
                                                       or terminal[:PADDING].any())
        elif count >= size:  # full: the oldest at the cursor
            self.order = np.roll(np.arange(size), -(count % size))
            self.from_start = count == size
        else:                # not full yet: the first `count` slots, in order
            self.order = np.arange(count)
            self.from_start = True
        ended = terminal[self.order].astype(bool)
        starts = np.flatnonzero(ended) + 1
        if self.from_start:
            starts = np.concatenate([[0], starts])
        pad = np.zeros(len(self.order), dtype=bool)
        spots = (starts[:, None] + np.arange(PADDING)).ravel()
        pad[spots[spots < len(pad)]] = True
        i = self.order[pad]
        if (action[i] != 0).any() or (reward[i] != 0).any() or ended[pad].any():
            raise UserError(f"{folder}: checkpoint {number} does not open its episodes with "
                            f"Dopamine's {PADDING} blank transitions; not a DQN-Replay buffer?")
        self.pad, self.kept = self.order[pad], self.order[~pad]
        self.ends = np.flatnonzero(ended[~pad])
        self.length = len(self.kept)
        if not self.length:
            raise UserError(f"{folder}: checkpoint {number} holds no steps of a game")
        dones = np.zeros(self.length, dtype=bool)
        dones[self.ends] = True
        problem = bad_values("dones", dones, meta)
        if problem:
            raise UserError(f"{folder}: checkpoint {number} {problem}")

    def _small(self) -> list[np.ndarray]:
        """The action, reward and terminal arrays, checked for kind and shape."""
        arrays = []
        for name, kinds in (("action", "iu"), ("reward", "iuf"), ("terminal", "iub")):
            path = self.folder / STORE.format(name, self.number)
            with _opened(path) as f:
                shape, dtype = _header(f, path)
                if len(shape) != 1 or dtype.kind not in kinds:
                    what = "numbers" if "f" in kinds else "integers"
                    raise UserError(f"{path}: an array of shape {shape} and dtype {dtype}, "
                                    f"expected a vector of {what}")
                values = _body(f, path, shape, dtype)
            if dtype.kind == "f" and not np.isfinite(values).all():
                raise UserError(f"{path}: holds a non-finite reward")
            arrays.append(values)
        return arrays

    def _add_count(self) -> int | None:
        path = self.folder / ADD_COUNT.format(self.number)
        if not path.exists():
            return None
        with _opened(path) as f:
            shape, dtype = _header(f, path)
            if shape not in ((), (1,)) or dtype.kind not in "iu":
                raise UserError(f"{path}: expected one integer, got shape {shape} dtype {dtype}")
            count = int(_body(f, path, shape, dtype).reshape(-1)[0])
        if count < 0:
            raise UserError(f"{path}: a negative count ({count})")
        return count

    def n_finished(self, T: int) -> int:
        """Episodes wholly inside the first T kept steps."""
        return max(0, int((self.ends < T).sum()) - (not self.from_start))

    def read(self, T: int, legal: np.ndarray, n_episodes: int) -> HistoryArrays:
        """The first T kept steps as one history row; frames streamed from the gzip file."""
        action, reward, terminal = self._small()   # small: read again rather than kept
        take = self.kept[:T]
        reward = np.sign(reward[take]).astype(np.float32)
        dones = terminal[take].astype(bool)
        ends = np.flatnonzero(dones)
        sums = np.diff(np.concatenate([[0.0], np.cumsum(reward, dtype=np.float64)[ends]]))
        returns = np.full(n_episodes, np.nan, dtype=np.float32)
        finished = sums if self.from_start else sums[1:]
        returns[:len(finished)] = finished
        return HistoryArrays(obs=self._frames(take)[None, ..., None],
                             actions=legal[action[take]][None], rewards=reward[None],
                             dones=dones[None], task_ids=np.zeros(1, dtype=np.int32),
                             tasks=np.zeros((1, 1)), seeds=np.array([self.number]),
                             episode_returns=returns[None])

    def _frames(self, take: np.ndarray) -> np.ndarray:
        """The frames at file indices `take`, in that order. `take` is a few runs of consecutive
        slots (broken by padding and the ring's seam); the file is decompressed in blocks of
        BLOCK frames and each run's part of a block copied as a slice. The padding must be
        blank."""
        path = self.folder / STORE.format("observation", self.number)
        out = np.empty((len(take), SIZE, SIZE), dtype=np.uint8)
        breaks = np.flatnonzero(np.diff(take) != 1) + 1
        firsts = np.concatenate([[0], breaks])           # row position where each run starts
        ends = np.concatenate([breaks, [len(take)]])
        by_slot = np.argsort(take[firsts])                 # the runs in file order
        slots, firsts, ends = take[firsts][by_slot], firsts[by_slot], ends[by_slot]
        stops = slots + (ends - firsts)
        with _opened(path) as f:
            shape, _ = _header(f, path)
            blank = np.zeros(shape[0], dtype=bool)
            blank[self.pad] = True
            block = np.empty((min(BLOCK, shape[0]), SIZE, SIZE), dtype=np.uint8)
            for a in range(0, shape[0], BLOCK):
                part = block[:min(BLOCK, shape[0] - a)]
                _into(f, path, part)
                b = a + len(part)
                for i in range(np.searchsorted(stops, a, "right"), np.searchsorted(slots, b)):
                    lo, hi = max(a, slots[i]), min(b, stops[i])   # the run's part of the block
                    out[firsts[i] + lo - slots[i]:firsts[i] + hi - slots[i]] = part[lo - a:hi - a]
                if part[blank[a:b]].any():
                    raise UserError(f"{path}: a padding transition (after an episode's end) has "
                                    f"a frame that is not blank; not a DQN-Replay buffer?")
            _at_end(f, path)
        return out


class _opened:
    """A gzip file, whose read errors (truncated, corrupt, not gzip) become one-line UserErrors."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        try:
            self.file = gzip.open(self.path, "rb")
        except OSError as e:
            raise UserError(f"{self.path}: cannot open ({_short(e)})") from None
        return self.file

    def __exit__(self, kind, error, trace):
        self.file.close()
        if isinstance(error, (EOFError, OSError, ValueError, zlib.error)):
            raise UserError(f"{self.path}: not a gzip-compressed .npy array, or truncated or "
                            f"corrupt ({_short(error)})") from None
        return False


def _header(f, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a .npy header; arrays needing pickle or in Fortran order refused."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise UserError(f"{path}: .npy format version {version}, expected 1.0 or 2.0")
    if dtype.hasobject or (fortran and len(shape) > 1):
        raise UserError(f"{path}: an array of Python objects or in Fortran order; expected "
                        f"np.save's plain arrays")
    return shape, dtype


def _body(f, path: Path, shape, dtype: np.dtype, last: bool = True) -> np.ndarray:
    """The next array of `shape` in the file; with `last`, the file must end there (which also
    makes gzip check its CRC)."""
    n = int(np.prod(shape)) * dtype.itemsize
    data = f.read(n)
    if len(data) != n:
        raise UserError(f"{path}: truncated ({len(data)} of {n} bytes of array data)")
    if last:
        _at_end(f, path)
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="),
                                                                   copy=False)


def _into(f, path: Path, out: np.ndarray) -> None:
    """Fill `out` with the file's next bytes, decompressed into place (several times faster than
    `read`, for blocks of a few tens of MB)."""
    view, done = memoryview(out).cast("B"), 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise UserError(f"{path}: truncated ({done} of {len(view)} bytes of a block of "
                            f"frames)")
        done += n


def _at_end(f, path: Path) -> None:
    if f.read(1):
        raise UserError(f"{path}: more data after the array; not an np.save'd array")


def _short(err: Exception) -> str:
    return str(err).splitlines()[0][:160] if str(err) else type(err).__name__
