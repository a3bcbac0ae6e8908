"""Importing DQN-Replay checkpoints: files written in Dopamine's exact layout (np.save into gzip,
`$store$_` names, a ring buffer with blank padding before every episode) by a small stand-in for
Dopamine's replay buffer, which also logs what a faithful import must give back."""
import gzip

import numpy as np
import pytest

from icrl.data.dqn_replay import find_checkpoints, game_name, import_dqn_replay
from icrl.data.store import HistoryStore
from icrl.data.windows import returns_to_go
from icrl.errors import UserError

BREAKOUT = [0, 1, 3, 4]   # Breakout's minimal action set in the 18-action set


class Dopamine:
    """Dopamine's OutOfGraphReplayBuffer as far as its checkpoints go (stack size 4)."""

    def __init__(self, capacity: int):
        self.cap = capacity
        self.store = {"observation": np.zeros((capacity, 84, 84), np.uint8),
                      "action": np.zeros(capacity, np.int32),
                      "reward": np.zeros(capacity, np.float32),
                      "terminal": np.zeros(capacity, np.uint8)}
        self.add_count = np.array(0)
        self.log = []      # every slot ever written: (frame value, action, reward, terminal)
        self.frame = 0

    def _add(self, value, action, reward, terminal):
        i = int(self.add_count) % self.cap
        self.store["observation"][i] = value
        self.store["action"][i], self.store["reward"][i] = action, reward
        self.store["terminal"][i] = terminal
        self.add_count += 1
        self.log.append(None if value == 0 else (value, action, reward, terminal))

    def add(self, action, reward, terminal):
        last = self.store["terminal"][(int(self.add_count) - 1) % self.cap]
        if self.add_count == 0 or last == 1:
            for _ in range(3):
                self._add(0, 0, 0.0, 0)
        self.frame = self.frame % 250 + 1      # never blank
        self._add(self.frame, action, reward, terminal)

    def episode(self, rng, length, finish=True):
        for t in range(length):
            self.add(rng.integers(4), rng.choice([0.0, 0.0, 1.0, 4.0, -2.0]),
                     int(finish and t == length - 1))

    def save(self, folder, n):
        folder.mkdir(exist_ok=True)
        for name, array in self.store.items():
            with gzip.open(folder / f"$store$_{name}_ckpt.{n}.gz", "wb") as f:
                np.save(f, array, allow_pickle=False)
        for name, array in (("add_count", self.add_count),
                            ("invalid_range", np.zeros(4))):
            with gzip.open(folder / f"{name}_ckpt.{n}.gz", "wb") as f:
                np.save(f, array, allow_pickle=False)

    def window(self):
        """The real transitions the buffer holds, oldest first."""
        return [e for e in self.log[-self.cap:] if e is not None]


def make_replay(folder):
    """Checkpoint 0: a buffer not yet full (episodes of 6 and 9 steps and 4 steps of a third);
    checkpoint 1: the same run later, the ring wrapped. Returns what each should import as."""
    rng = np.random.default_rng(0)
    buf = Dopamine(capacity=48)
    buf.episode(rng, 6)
    buf.episode(rng, 9)
    buf.episode(rng, 4, finish=False)
    buf.save(folder, 0)
    first = buf.window()
    buf.episode(rng, 5)                     # the third episode ends after 9 steps
    for length in (7, 8, 11):
        buf.episode(rng, length)
    buf.episode(rng, 3, finish=False)
    buf.save(folder, 1)
    assert buf.add_count > buf.cap and buf.add_count % buf.cap
    assert buf.log[-buf.cap] is not None    # the ring's oldest slot is a step of the game
    return first, buf.window()


def expect(window, T, from_start):
    values, actions, rewards, dones = (np.array(x) for x in zip(*window[:T]))
    clipped = np.sign(rewards)
    ends = np.flatnonzero(dones)
    sums = np.diff(np.concatenate([[0], np.cumsum(clipped)[ends]]))
    return values, np.array(BREAKOUT)[actions], clipped, dones.astype(bool), \
        sums if from_start else sums[1:]


def test_import_maps_clips_rolls_and_trims(tmp_path):
    first, second = make_replay(tmp_path / "logs")
    assert len(first) == 19 and len(second) > 19
    out = import_dqn_replay(tmp_path / "logs", "breakout", tmp_path / "b.h5", progress=False)
    with HistoryStore(out) as store:
        meta = store.meta
        assert meta["kind"] == "replay" and meta["n_actions"] == 18
        assert meta["family"] == {"name": "atari", "games": ["breakout"], "max_steps": 27_000,
                                  "noop_max": 30}
        assert meta["split"] == {"seed": 0, "train": [0], "test": [0]}
        assert meta["source"]["config"]["steps"] == [19, len(second)]
        assert store.n_histories == 2 and store.n_steps == 19     # trimmed to the shortest
        data = store.read(slice(None))
        returns = store.column("episode_returns")
        assert store.column("seeds").tolist() == [0, 1]
        assert store.column("task_ids").tolist() == [0, 0]
        assert store.column("tasks").tolist() == [[0.0], [0.0]]
    for row, (window, from_start) in enumerate(((first, True), (second, False))):
        values, actions, rewards, dones, sums = expect(window, 19, from_start)
        assert (data["obs"][row, :, 0, 0, 0] == values).all()
        assert (data["obs"][row] == values[:, None, None, None]).all()
        assert (data["actions"][row] == actions).all()
        assert (data["rewards"][row] == rewards).all() and set(np.unique(rewards)) <= {-1, 0, 1}
        assert (data["dones"][row] == dones).all()
        got = returns[row]
        assert np.allclose(got[:len(sums)], sums) and np.isnan(got[len(sums):]).all()
    # the first row opens the run: its episodes of 6 and 9 steps both count
    assert np.flatnonzero(data["dones"][0]).tolist() == [5, 14]
    rtg = returns_to_go(data["rewards"][0].astype(np.float64), data["dones"][0])
    assert rtg[0] == returns[0, 0] and rtg[6] == returns[0, 1]


def test_rerun_returns_the_file_and_other_files_are_refused(tmp_path):
    make_replay(tmp_path / "logs")
    out = import_dqn_replay(tmp_path / "logs", "Breakout", tmp_path / "b.h5", checkpoints=[1],
                            progress=False)
    stamp = out.stat().st_mtime_ns
    assert import_dqn_replay(tmp_path / "logs", "breakout", out, checkpoints=[1],
                             progress=False) == out and out.stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="holds another dataset"):
        import_dqn_replay(tmp_path / "logs", "breakout", out, checkpoints=[0], progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an icrl history file"):
        import_dqn_replay(tmp_path / "logs", "breakout", tmp_path / "notes.txt", progress=False)


def test_without_add_count(tmp_path):
    first, _ = make_replay(tmp_path / "logs")
    for n in (0, 1):
        (tmp_path / "logs" / f"add_count_ckpt.{n}.gz").unlink()
    # checkpoint 0's unused slots are zeros: read as it lies, its blank tail is padding too
    out = import_dqn_replay(tmp_path / "logs", "breakout", tmp_path / "b.h5", checkpoints=[0],
                            progress=False)
    with HistoryStore(out) as store:
        data = store.read(slice(None))
        assert (data["obs"][0, :19, 0, 0, 0] == [v for v, *_ in first]).all()
        assert np.allclose(store.column("episode_returns")[0, :2],
                           expect(first, 19, True)[4])


def test_names():
    assert game_name("SpaceInvaders") == "space_invaders"
    assert game_name("UpNDown") == "up_n_down" and game_name("MsPacman") == "ms_pacman"


def one_line(excinfo):
    assert isinstance(excinfo.value, UserError) and "\n" not in str(excinfo.value)
    return str(excinfo.value)


def save(path, array):
    with gzip.open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


@pytest.fixture
def logs(tmp_path):
    make_replay(tmp_path / "logs")
    return tmp_path / "logs"


def run(logs, game="breakout", checkpoints=None):
    out = logs.parent / "out.h5"
    try:
        with pytest.raises(UserError) as excinfo:
            import_dqn_replay(logs, game, out, checkpoints=checkpoints, progress=False)
        return one_line(excinfo)
    finally:
        assert not out.exists()     # nothing half-written is left behind


def test_missing_things(logs, tmp_path):
    assert find_checkpoints(logs) == [0, 1]
    assert "no such directory" in run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "no DQN-Replay checkpoints" in run(tmp_path / "empty")
    assert "unknown Atari game 'pongg'" in run(logs, game="pongg")
    assert "checkpoint 7 lacks" in run(logs, checkpoints=[7])
    assert "distinct integers" in run(logs, checkpoints=[1, 1])
    (logs / "$store$_reward_ckpt.1.gz").unlink()
    assert "checkpoint 1 lacks $store$_reward_ckpt.1.gz" in run(logs)


@pytest.mark.parametrize("name", ["observation", "action"])
def test_truncated_file(logs, name):
    path = logs / f"$store$_{name}_ckpt.1.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])
    assert "truncated or corrupt (Compressed file ended" in run(logs)


def test_corrupt_and_foreign_files(logs):
    path = logs / "$store$_observation_ckpt.0.gz"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert "corrupt" in run(logs)
    path.write_bytes(b"not gzip at all")
    assert "not a gzip-compressed .npy array" in run(logs)
    with gzip.open(path, "wb") as f:
        f.write(b"plain text, not .npy")
    assert "not a gzip-compressed .npy array" in run(logs)


def test_wrong_layouts(logs):
    save(logs / "$store$_observation_ckpt.1.gz", np.zeros((48, 84, 80), np.uint8))
    assert "expected (n, 84, 84) uint8" in run(logs)
    save(logs / "$store$_observation_ckpt.1.gz", np.zeros((48, 84, 84), np.float32))
    assert "expected (n, 84, 84) uint8" in run(logs)
    save(logs / "$store$_observation_ckpt.1.gz", np.zeros((48, 84, 84), np.uint8))
    save(logs / "$store$_action_ckpt.1.gz", np.zeros(47, np.int32))
    assert "different lengths (observation 48, action 47" in run(logs)
    save(logs / "$store$_action_ckpt.1.gz", np.zeros((48, 2), np.int32))
    assert "expected a vector" in run(logs)


def test_actions_of_another_game(logs):
    action = np.zeros(48, np.int32)
    action[10] = 5                      # Pong has 6 actions, Breakout 4
    save(logs / "$store$_action_ckpt.1.gz", action)
    message = run(logs)
    assert "action 5" in message and "another game's data" in message


def test_not_dopamine_padding(logs):
    path = logs / "$store$_observation_ckpt.0.gz"
    with gzip.open(path) as f:
        frames = np.load(f)
    frames[1] = 9                       # a padding slot that is not blank
    save(path, frames)
    assert "not blank" in run(logs)
    reward = np.zeros(48, np.float32)
    reward[0] = 1.0                     # nor is a padding reward
    save(logs / "$store$_reward_ckpt.0.gz", reward)
    assert "blank transitions" in run(logs)
