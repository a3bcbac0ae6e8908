"""Block reads of many rows (`HistoryStore.read` with an index array): the same arrays as the
plain per-row read for every read pattern, at most twice the requested rows read, and the
cheaper validation of dones equal to the definition."""
from unittest import mock

import h5py
import numpy as np
import pytest

import icrl.data.store as store_mod
from icrl.data.store import HistoryStore, bad_values, episode_steps

from test_store import DISCRETE, L, SMALL_IMAGE, make


def per_row(store, rows, steps=slice(None), keys=store_mod.STEP_KEYS):
    """The read as it was: one read_direct per row."""
    out = {}
    for key in keys:
        ds = store.file[key]
        n = len(range(*steps.indices(ds.shape[1])))
        out[key] = np.empty((len(rows), n, *ds.shape[2:]), ds.dtype)
        for i, row in enumerate(rows):
            ds.read_direct(out[key], np.s_[row, steps], np.s_[i])
    return out


def spy_reads(store):
    """A context that records how many rows each h5py read of the store's datasets takes."""
    rows = []
    original = h5py.Dataset.__getitem__

    def wrapped(self, sel):
        first = sel[0] if isinstance(sel, tuple) else sel
        rows.append(len(range(*first.indices(len(self)))) if isinstance(first, slice) else 1)
        return original(self, sel)
    return rows, mock.patch.object(h5py.Dataset, "__getitem__", wrapped)


H = 40
ROWS = {"sparse": [1, 7, 8, 20, 33, 39], "dense": [0, 1, 2, 3, 5, 6, 8, 9, 10, 11, 30, 31],
        "all": list(range(H)), "every third": list(range(0, H, 3)), "one": [17],
        "empty": [], "last": [38, 39], "unsorted": [9, 2, 3, 3, 30, 29], "negative": [-3, -1, 4]}


@pytest.mark.parametrize("spec", [DISCRETE, SMALL_IMAGE], ids=["discrete", "image"])
@pytest.mark.parametrize("steps", [slice(None), slice(5, 37), slice(0, 1), slice(50, None)],
                         ids=["all", "middle", "first", "end"])
def test_row_sets_read_as_row_by_row(tmp_path, spec, steps):
    data = make(tmp_path / "h.h5", spec, H=H, T=60)
    store = HistoryStore(tmp_path / "h.h5")
    for name, rows in ROWS.items():
        for as_array in (False, True):
            got = store.read(np.array(rows, dtype=np.int64) if as_array else rows, steps)
            want = per_row(store, rows, steps)
            for key in got:
                assert got[key].dtype == want[key].dtype, (name, key)
                assert np.array_equal(got[key], want[key]), (name, key)
                truth = getattr(data, key).astype(want[key].dtype)[rows][:, steps]
                assert np.array_equal(got[key], truth), (name, key)


def test_int_and_slice_rows_are_unchanged(tmp_path):
    data = make(tmp_path / "h.h5", DISCRETE, H=H, T=60)
    store = HistoryStore(tmp_path / "h.h5")
    for rows, steps in ((5, slice(None)), (-1, slice(10, 20)), (slice(3, 9), slice(None)),
                        (slice(None), slice(0, 7))):
        got = store.read(rows, steps)
        for key in got:
            assert np.array_equal(got[key], getattr(data, key)[rows, steps])


def test_out_of_range_rows_fail_as_before(tmp_path):
    make(tmp_path / "h.h5", DISCRETE, H=H, T=60)
    store = HistoryStore(tmp_path / "h.h5")
    for rows in ([3, 4, H], [H + 5], [-H - 1, 2]):
        with pytest.raises(IndexError) as new:
            store.read(rows)
        with pytest.raises(IndexError) as old:
            per_row(store, rows)
        assert str(new.value) == str(old.value)


@pytest.mark.parametrize("name", list(ROWS))
def test_reads_at_most_twice_the_rows(tmp_path, name):
    make(tmp_path / "h.h5", DISCRETE, H=H, T=60)
    store = HistoryStore(tmp_path / "h.h5")
    rows = ROWS[name]
    read, spy = spy_reads(store)
    with spy:
        store.read(rows, keys=("actions",))
    assert sum(read) <= 2 * len(rows)
    if name in ("all", "last"):
        assert read == [len(rows)]  # consecutive rows: one read


def test_large_rows_read_no_holes_and_bounded_slices(tmp_path):
    make(tmp_path / "h.h5", DISCRETE, H=H, T=60)
    store = HistoryStore(tmp_path / "h.h5")
    rows = ROWS["dense"]
    want = per_row(store, rows)
    read, spy = spy_reads(store)
    with spy, mock.patch.object(store_mod, "GAP_BYTES", 0):  # holes too dear: runs only
        got = store.read(rows, keys=("actions",))
    assert read == [4, 2, 4, 2] and np.array_equal(got["actions"], want["actions"])
    read.clear()
    with spy, mock.patch.object(store_mod, "SLAB_BYTES", 3 * 60):  # 3 rows of actions at most
        got = store.read(rows, keys=("actions",))
    assert max(read) == 3 and np.array_equal(got["actions"], want["actions"])


def test_dones_check_is_the_longest_open_run():
    """The check by counting dones over every L consecutive steps equals the definition: no
    open run (steps since the last done, plus one) of L or more."""
    rng = np.random.default_rng(0)
    meta = {"episode_len": L}
    for n in (1, L - 1, L, L + 1, 3 * L):
        for p in (0.0, 0.05, 0.1, 0.3, 1.0):
            for shape in ((n,), (7, n)):
                dones = rng.random(shape) < p
                open_run = np.where(dones, 0, episode_steps(dones) + 1).max()
                assert (bad_values("dones", dones, meta) is not None) == (open_run >= L)
