"""The history store (format 3) and the window sampler: round trips of discrete and image data with
variable-length episodes, per-step fields against brute force, the disk and in-memory read paths,
store mixtures, the single-store random stream, saved positions, checksums, validation of what is
read, and the refusal of older files."""
import json
from unittest import mock

import h5py
import numpy as np
import pytest
import torch

import icrl.data.store as store_mod
from icrl.data.store import HEADER_BYTES, HistoryArrays, HistoryStore, write_store
from icrl.data.windows import WindowSampler
from icrl.envs.spec import ObsSpec
from icrl.errors import UserError

L = 10  # episode_len: the longest episode


def histories(spec: ObsSpec, H: int, T: int, seed: int = 0, n_actions: int = 4, offset: int = 0):
    """Random histories whose episodes last 1 to L steps (the last one may be cut off by the
    history's end). Each observation names its (row + offset, step): in components 0 and 1 of a
    discrete observation, in the first pixel's channels of an image."""
    rng = np.random.default_rng(seed)
    dones = np.zeros((H, T), bool)
    for h in range(H):
        ends = np.cumsum(rng.integers(1, L + 1, size=T)) - 1
        dones[h, ends[ends < T]] = True
    t = np.broadcast_to(np.arange(T), (H, T))
    rows = np.broadcast_to(np.arange(H)[:, None] + offset, (H, T))
    if spec.kind == "discrete":
        obs = np.stack([rows, t, rng.integers(0, spec.high[2], (H, T))], axis=-1)
    else:
        obs = rng.integers(0, 256, (H, T, *spec.shape))
        obs[..., 0, 0, :] = np.stack([rows, t % 256, t // 256], axis=-1)
    return HistoryArrays(obs=obs.astype(spec.store_dtype),
                         actions=rng.integers(0, n_actions, (H, T)),
                         rewards=(rng.integers(-4, 5, (H, T)) / 4).astype(np.float16),
                         dones=dones, task_ids=np.arange(H), tasks=rng.random((H, 2)),
                         seeds=np.zeros(H, int),
                         episode_returns=rng.random((H, 3)).astype(np.float32))


def meta_for(spec: ObsSpec, n_actions: int = 4) -> dict:
    return {"kind": "histories", "family": {"name": "test"}, "obs_spec": spec.to_dict(),
            "n_actions": n_actions, "split": {}, "source": {}, "episode_len": L,
            "n_episodes": 3, "every": 1, "record_from": 0}


def make(path, spec, H=12, T=200, seed=0, **kw):
    data = histories(spec, H, T, seed, **kw)
    write_store(path, data, meta_for(spec, kw.get("n_actions", 4)))
    return data


DISCRETE = ObsSpec.discrete((64, 400, 7))     # (row, step, noise): uint16 storage
SMALL_IMAGE = ObsSpec.image(6, 5, 3)
IMAGE = ObsSpec.image(72, 96, 3)              # Watermaze's frames


def brute_force(data: HistoryArrays):
    """Steps since the episode began and returns-to-go of every step, one step at a time."""
    H, T = data.dones.shape
    step, rtg = np.zeros((H, T), int), np.zeros((H, T))
    for h in range(H):
        for t in range(T):
            step[h, t] = 0 if t == 0 or data.dones[h, t - 1] else step[h, t - 1] + 1
        for t in reversed(range(T)):
            later = 0.0 if data.dones[h, t] or t == T - 1 else rtg[h, t + 1]
            rtg[h, t] = float(data.rewards[h, t]) + later
    return step, rtg.astype(np.float32)


def where_from(batch, spec):
    """(row, first step) of every window, read off its first observation."""
    o = batch["obs"][:, 0].numpy().astype(int)
    if spec.kind == "discrete":
        return o[:, 0], o[:, 1]
    return o[:, 0, 0, 0], o[:, 0, 0, 1] + 256 * o[:, 0, 0, 2]


@pytest.mark.parametrize("spec", [DISCRETE, SMALL_IMAGE], ids=["discrete", "image"])
def test_round_trip(tmp_path, spec):
    data = make(tmp_path / "h.h5", spec)
    with HistoryStore(tmp_path / "h.h5") as store:
        assert store.obs_spec == spec and store.n_actions == 4 and store.episode_len == L
        assert (store.n_histories, store.n_steps) == (12, 200)
        got = store.read(slice(None))
        for key in ("obs", "actions", "rewards", "dones"):
            want = getattr(data, key)
            assert got[key].dtype == store_mod.DTYPES.get(key, spec.store_dtype), key
            np.testing.assert_array_equal(got[key], want, err_msg=key)
        part = store.read([2, 5], slice(40, 70))
        np.testing.assert_array_equal(part["obs"], data.obs[[2, 5], 40:70])
        for key in ("task_ids", "tasks", "seeds", "episode_returns"):
            np.testing.assert_array_equal(store.column(key), getattr(data, key), err_msg=key)
        fp = store.fingerprint()
        assert fp["name"] == "h.h5" and len(fp["sha256"]) == 64
        assert (fp["n_histories"], fp["n_steps"]) == (12, 200)
    with h5py.File(tmp_path / "h.h5") as f:
        assert all(f[key].fletcher32 and f[key].compression == "gzip" for key in f)
        assert f["obs"].chunks == ((1, 64, *spec.shape) if spec.kind == "image"
                                   else (1, 200, *spec.shape))  # windows / whole histories
        assert json.loads(f.attrs["meta"])["obs_spec"] == spec.to_dict()


def test_fingerprint_is_the_contents_not_the_parts(tmp_path):
    data = histories(DISCRETE, 12, 50)
    split = [HistoryArrays(**{k: v[rows] for k, v in vars(data).items()})
             for rows in (slice(0, 5), slice(5, 6), slice(6, 12))]
    write_store(tmp_path / "one.h5", data, meta_for(DISCRETE))
    write_store(tmp_path / "three.h5", split, meta_for(DISCRETE))
    other = histories(DISCRETE, 12, 50, seed=1)
    write_store(tmp_path / "other.h5", other, meta_for(DISCRETE))
    sha = {n: HistoryStore(tmp_path / f"{n}.h5").fingerprint()["sha256"]
           for n in ("one", "three", "other")}
    assert sha["one"] == sha["three"] != sha["other"]


@pytest.mark.parametrize("spec", [DISCRETE, SMALL_IMAGE], ids=["discrete", "image"])
def test_window_fields_match_brute_force(tmp_path, spec):
    data = make(tmp_path / "h.h5", spec)
    step, rtg = brute_force(data)
    c = 25
    sampler = WindowSampler(HistoryStore(tmp_path / "h.h5"), c, 16, seed=3, block=5)
    seen_first = seen_last = 0
    for _ in range(40):
        b = sampler.__next__()
        assert b["obs"].dtype == (torch.uint8 if spec.kind == "image" else torch.int64)
        assert b["obs"].shape == (16, c, *spec.shape)
        rows, starts = where_from(b, spec)
        for i, (h, s) in enumerate(zip(rows, starts)):
            t = np.arange(s, s + c)
            np.testing.assert_array_equal(b["obs"][i].numpy(), data.obs[h, t])
            np.testing.assert_array_equal(b["actions"][i].numpy(), data.actions[h, t])
            np.testing.assert_array_equal(b["rewards"][i].numpy(), data.rewards[h, t])
            np.testing.assert_array_equal(b["dones"][i].numpy(), data.dones[h, t])
            prev_a = np.where(t > 0, data.actions[h, t - 1], -1)
            prev_r = np.where(t > 0, data.rewards[h, t - 1].astype(np.float32), 0)
            np.testing.assert_array_equal(b["prev_action"][i].numpy(), prev_a)
            np.testing.assert_array_equal(b["prev_reward"][i].numpy(), prev_r)
            np.testing.assert_array_equal(b["step"][i].numpy(), step[h, t])
            np.testing.assert_array_equal(b["returns_to_go"][i].numpy(), rtg[h, t])
            seen_first += s == 0
            seen_last += s + c == data.dones.shape[1]
        assert b["store"].tolist() == [0] * 16
        for key, dtype in (("actions", torch.int64), ("rewards", torch.float32),
                           ("dones", torch.bool), ("prev_action", torch.int64),
                           ("prev_reward", torch.float32), ("step", torch.int64),
                           ("returns_to_go", torch.float32)):
            assert b[key].dtype == dtype and b[key].shape == (16, c), key
    assert not data.dones[:, -1].all()  # some histories end mid-episode (returns to their end)


@pytest.mark.parametrize("spec", [DISCRETE, IMAGE], ids=["discrete", "image"])
def test_disk_and_memory_paths_give_the_same_windows(tmp_path, spec):
    """Histories too large for the memory budget are read window by window: same batches."""
    H, T = (12, 200) if spec.kind == "discrete" else (3, 150)
    make(tmp_path / "h.h5", spec, H=H, T=T)
    store = HistoryStore(tmp_path / "h.h5")
    memory = WindowSampler(store, 30, 8, seed=5, block=4)
    disk = WindowSampler(store, 30, 8, seed=5, block=4, memory=1000)
    assert memory.readers[0].in_memory and not disk.readers[0].in_memory
    for _ in range(12):  # several blocks
        a, b = next(memory), next(disk)
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_block_shrinks_to_the_memory_budget(tmp_path):
    make(tmp_path / "h.h5", DISCRETE)  # 200 steps of 2 * 3 + 4 bytes per history
    sampler = WindowSampler(HistoryStore(tmp_path / "h.h5"), 30, 8, block=10, memory=5 * 2000)
    assert sampler.readers[0].in_memory and sampler.readers[0].block == 5
    next(sampler)
    assert len(sampler.readers[0].data["obs"]) == 5


def old_stream_windows(H, T, c, B, seed, block, n_batches):
    """(row, start) of every window the single-store stream of format 2 drew: its formula."""
    rng = np.random.default_rng(seed)
    block = min(block, H)
    per_block = max(1, block // B, round(block * (T - c + 1) / (B * c)))
    out, left = [], 0
    for _ in range(n_batches):
        if left == 0:
            rows, left = np.sort(rng.choice(H, size=block, replace=False)), per_block
        left -= 1
        pick = rng.integers(block, size=B)
        start = rng.integers(0, T - c + 1, size=B)
        out.append((rows[pick].tolist(), start.tolist()))
    return out


# The first two batches of that formula for 20 histories of 300 steps, c 30, B 8, block 7, seed 1.
SAVED_EXPECTATION = [[(16, 204), (2, 227), (6, 145), (12, 221), (7, 89), (0, 122), (0, 213),
                      (19, 33)],
                     [(6, 55), (0, 136), (7, 71), (19, 5), (0, 203), (6, 16), (6, 75), (19, 135)]]


@pytest.mark.parametrize("memory", [1 << 30, 1000], ids=["memory", "disk"])
def test_single_store_draws_as_the_old_stream(tmp_path, memory):
    make(tmp_path / "h.h5", DISCRETE, H=20, T=300)
    sampler = WindowSampler(HistoryStore(tmp_path / "h.h5"), 30, 8, seed=1, block=7, memory=memory)
    expected = old_stream_windows(20, 300, 30, 8, seed=1, block=7, n_batches=30)
    assert [list(zip(*e)) for e in expected[:2]] == SAVED_EXPECTATION
    for rows, starts in expected:
        got = where_from(next(sampler), DISCRETE)
        assert (got[0].tolist(), got[1].tolist()) == (rows, starts)


def test_mixture_picks_stores_by_weight(tmp_path):
    make(tmp_path / "a.h5", DISCRETE, H=10, T=100, seed=0)
    make(tmp_path / "b.h5", DISCRETE, H=10, T=120, seed=1, offset=30)  # rows 30..39
    a, b = HistoryStore(tmp_path / "a.h5"), HistoryStore(tmp_path / "b.h5")
    sampler = WindowSampler([(a, 3.0), (b, 1.0)], 20, 32, seed=0, block=4)
    counts = np.zeros(2)
    for _ in range(100):
        batch = next(sampler)
        which = batch["store"].numpy()
        counts += np.bincount(which, minlength=2)
        rows, _ = where_from(batch, DISCRETE)
        assert ((rows >= 30) == (which == 1)).all()  # each window from the store it names
    assert abs(counts[0] / counts.sum() - 0.75) < 0.02, counts


def test_mixture_needs_the_same_observations_and_actions(tmp_path):
    make(tmp_path / "a.h5", DISCRETE, H=4, T=50)
    make(tmp_path / "img.h5", SMALL_IMAGE, H=4, T=50)
    make(tmp_path / "acts.h5", DISCRETE, H=4, T=50, n_actions=6)
    a = HistoryStore(tmp_path / "a.h5")
    for other in ("img.h5", "acts.h5"):
        with pytest.raises(UserError, match="cannot be mixed"):
            WindowSampler([(a, 1), (HistoryStore(tmp_path / other), 1)], 10, 4)
    with pytest.raises(UserError, match="weights"):
        WindowSampler([(a, 1), (a, 0)], 10, 4)
    with pytest.raises(UserError, match="context 51 is longer"):
        WindowSampler(a, 51, 4)


@pytest.mark.parametrize("memory", [1 << 30, 1000], ids=["memory", "disk"])
def test_restored_sampler_continues_exactly(tmp_path, memory):
    make(tmp_path / "a.h5", DISCRETE, H=10, T=100)
    make(tmp_path / "b.h5", DISCRETE, H=10, T=100, seed=2)
    stores = [(HistoryStore(tmp_path / "a.h5"), 1), (HistoryStore(tmp_path / "b.h5"), 2)]
    for sources in (stores[0][0], stores):
        first = WindowSampler(sources, 20, 8, seed=4, block=3, memory=memory)
        for _ in range(7):  # into a later block
            next(first)
        torch.save(first.state_dict(), tmp_path / "state.pt")
        second = WindowSampler(sources, 20, 8, seed=99, block=3, memory=memory)
        second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
        for _ in range(10):
            a, b = next(first), next(second)
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_opening_reads_no_data(tmp_path):
    make(tmp_path / "h.h5", SMALL_IMAGE)
    read = []

    def spy(method):
        def wrapped(self, *args, **kw):
            read.append(self.name)
            return method(self, *args, **kw)
        return wrapped

    with mock.patch.object(h5py.Dataset, "__getitem__", spy(h5py.Dataset.__getitem__)), \
            mock.patch.object(h5py.Dataset, "read_direct", spy(h5py.Dataset.read_direct)):
        store = HistoryStore(tmp_path / "h.h5")
        assert read == [] and store.fingerprint()["n_steps"] == 200
        store.read(3, slice(0, 5))
        assert read == ["/obs", "/actions", "/rewards", "/dones"]
        store.read([1, 2, 9], keys=("dones",))
    assert read[4:] == ["/dones"] * 2  # rows 1 and 2 in one read, 9 in another


def flip_in_chunk(path, dataset: str, index: int):
    """Flip one byte in the middle of one stored chunk of `dataset`."""
    with h5py.File(path) as f:
        info = f[dataset].id.get_chunk_info(index)
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + info.byte_offset + info.size // 2] ^= 0x10  # offsets skip the user block
    path.write_bytes(bytes(data))


def test_flipped_byte_in_an_image_chunk_is_caught_on_read(tmp_path):
    path = tmp_path / "h.h5"
    make(path, IMAGE, H=2, T=150)
    with h5py.File(path) as f:
        assert f["obs"].chunks == (1, 64, 72, 96, 3) and f["obs"].id.get_num_chunks() == 6
    flip_in_chunk(path, "obs", 4)  # history 1, steps 64..127
    store = HistoryStore(path)  # opening reads no chunk: fine
    assert store.read(0)["obs"].shape == (150, 72, 96, 3)  # other chunks still read
    for rows, steps in ((1, slice(None)), (1, slice(100, 110))):
        with pytest.raises(UserError) as err:
            store.read(rows, steps)
        msg = str(err.value)
        assert msg.startswith(f"{path}: dataset 'obs' is corrupt") and "\n" not in msg
    sampler = WindowSampler(store, 140, 4, memory=1000)  # the disk path meets it too
    with pytest.raises(UserError, match="dataset 'obs' is corrupt"):
        for _ in range(10):
            next(sampler)


def test_flipped_byte_in_a_grid_chunk_is_caught_on_read(tmp_path):
    path = tmp_path / "h.h5"
    make(path, DISCRETE)
    flip_in_chunk(path, "rewards", 7)
    with pytest.raises(UserError, match="dataset 'rewards' is corrupt"):
        WindowSampler(HistoryStore(path), 20, 8, block=12).__next__()


def test_truncated_or_extended_file_is_refused_on_open(tmp_path):
    path = tmp_path / "h.h5"
    make(path, DISCRETE)
    whole = path.read_bytes()
    for name, data in (("half", whole[: len(whole) // 2]), ("cut", whole[:-1]),
                       ("longer", whole + b"\0")):
        bad = tmp_path / f"{name}.h5"
        bad.write_bytes(data)
        with pytest.raises(UserError, match="corrupt or truncated"):
            HistoryStore(bad)


def test_damaged_metadata_or_header_is_refused_on_open(tmp_path):
    """The metadata lives in an HDF5 heap without a checksum: its hash in the header is checked
    (a changed digit in the split would otherwise go unnoticed), and the header's own."""
    path = tmp_path / "h.h5"
    make(path, DISCRETE, H=3, T=40)
    whole = path.read_bytes()
    at = whole.index(b'"n_actions": 4')
    for offset, message in ((at + len('"n_actions": '), "metadata checksum mismatch"),
                            (whole.index(b"sha256 ") + 10, "damaged header")):
        data = bytearray(whole)
        data[offset] ^= 0x01  # "4" -> "5"; a hex digit -> another
        path.write_bytes(bytes(data))
        with pytest.raises(UserError, match=f"corrupt or truncated \\({message}\\)"):
            HistoryStore(path)


def write_unchecked(path, data, spec, **meta):
    """Write bad contents, as a foreign or damaged writer could (the writer refuses them)."""
    with mock.patch.object(store_mod, "bad_values", lambda *a: None):
        write_store(path, data, {**meta_for(spec), **meta})


@pytest.mark.parametrize("case", ["obs", "actions", "rewards", "dones"])
def test_bad_contents_are_refused_when_read(tmp_path, case):
    data = histories(DISCRETE, 6, 60)
    change, message = {
        "obs": (lambda d: d.obs.__setitem__((4, 33, 2), 7),
                "dataset 'obs' holds observation component 2 = 7, outside [0, 7)"),
        "actions": (lambda d: d.actions.__setitem__((4, 33), 4),
                    "dataset 'actions' holds action 4, but the family has 4 actions"),
        "rewards": (lambda d: d.rewards.__setitem__((4, 33), np.nan),
                    "dataset 'rewards' holds a non-finite value (nan)"),
        "dones": (lambda d: d.dones.__setitem__((4, slice(20, 40)), False),
                  "dataset 'dones' holds an episode of more than episode_len = 10 steps"),
    }[case]
    change(data)
    with pytest.raises(ValueError):
        write_store(tmp_path / "refused.h5", data, meta_for(DISCRETE))
    path = tmp_path / "h.h5"
    write_unchecked(path, data, DISCRETE)
    store = HistoryStore(path)  # opening reads no data
    store.read(3)  # other histories are fine
    for read in (lambda: store.read([2, 4]), lambda: store.read(4, slice(25, 36))):
        with pytest.raises(UserError) as err:
            read()
        assert str(err.value) == f"{path}: {message}"
    for memory in (1 << 30, 1000):  # in memory and from disk
        with pytest.raises(UserError, match=message.split(" holds")[0]):
            sampler = WindowSampler(store, 30, 64, memory=memory)
            for _ in range(5):
                next(sampler)


def test_bad_columns_are_refused_when_read(tmp_path):
    data = histories(DISCRETE, 6, 60)
    data.tasks[2, 1] = np.inf
    write_unchecked(tmp_path / "h.h5", data, DISCRETE)
    with pytest.raises(UserError, match="dataset 'tasks' holds a non-finite value"):
        HistoryStore(tmp_path / "h.h5").column("tasks")


def test_format_2_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "old.h5"
    make(path, DISCRETE, H=3, T=40)
    data = bytearray(path.read_bytes())
    data[:HEADER_BYTES] = f"icrl history file\nsha256 {'0' * 64}\n".encode().ljust(HEADER_BYTES,
                                                                                 b"\0")
    path.write_bytes(bytes(data))
    with pytest.raises(UserError) as err:
        HistoryStore(path)
    assert str(err.value) == (f"{path}: history file format 2 was written by an older icrl; "
                              "regenerate it with `icrl generate` (or `icrl run ... --fresh`)")


def edited(path, edit):
    """The file changed in place through h5py, its header made right again (size, metadata hash,
    header hash): a file whose layout or metadata something other than icrl changed."""
    with h5py.File(path, "r+") as f:
        edit(f)
        meta = f.attrs["meta"]
    data = bytearray(path.read_bytes())
    lines = data[:HEADER_BYTES].rstrip(b"\0").decode().splitlines()[:3]
    header = "\n".join(lines + [f"size {len(data)}", f"meta {store_mod._sha(meta)}"]) + "\n"
    header += f"check {store_mod._sha(header)}\n"
    data[:HEADER_BYTES] = header.encode().ljust(HEADER_BYTES, b"\0")
    path.write_bytes(bytes(data))
    return path


def set_meta(**changes):
    def edit(f):
        f.attrs["meta"] = json.dumps({**json.loads(f.attrs["meta"]), **changes})
    return edit


@pytest.mark.parametrize("edit, message", [
    (set_meta(obs_spec={"kind": "image"}), "bad obs_spec in the metadata ('shape')"),
    (set_meta(n_actions=0), "n_actions must be a positive integer, got 0"),
    (set_meta(format_version=2), "format version 2, this icrl reads version 3"),
    (set_meta(obs_spec=ObsSpec.discrete((64, 400)).to_dict()),
     "dataset 'obs' has shape (3, 40, 3), expected (3, 40, 2)"),
    (lambda f: f.__delitem__("dones"), "dataset 'dones' is missing"),
    (lambda f: (f.__delitem__("dones"), f.create_dataset("dones", data=np.ones((3, 40), bool))),
     "dataset 'dones' is bool without checksums, expected bool with checksums"),
], ids=["spec", "actions", "version", "shape", "missing", "no checksums"])
def test_metadata_and_layout_are_checked_on_open(tmp_path, edit, message):
    path = tmp_path / "h.h5"
    make(path, DISCRETE, H=3, T=40)
    HistoryStore(edited(path, lambda f: None)).close()  # the edit itself is harmless
    with pytest.raises(UserError) as err:
        HistoryStore(edited(path, edit))
    assert str(err.value) == f"{path}: {message}"
