"""Resumable `icrl generate`: a run killed with SIGKILL at any point and started again with the
same settings ends with exactly the dataset of an uninterrupted run (every array, the metadata,
the file's bytes), leaves no chunk folder and no temporary file behind; damaged chunks are redone;
other settings are refused in one line; a finished file is left alone.

The kills come from outside (`icrl generate` runs in a subprocess) at seeded-random moments found
by watching the chunk folder, plus SIGKILLs the process sends itself at exact moments of the join
that a watcher cannot hit reliably."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

import icrl.generate
from icrl.cli import main
from icrl.data.store import HistoryStore
from icrl.envs import make_family
from icrl.generate import GenerateConfig, generate
from icrl.parts import chunk_seed
from icrl.sources import collect, make_source

# Dark Room, 65 training tasks x 3 seeds = 195 histories in 13 chunks of 16 (the last one 3 rows):
# a few seconds of work, a chunk every ~0.25 s, so a watcher can stop it between any two chunks.
OPTIONS = ["--episodes", "40", "--seeds-per-task", "3", "--chunk-size", "16",
           "--set", "planning_sweeps=10"]
ROWS, CHUNK = 195, 16
N_CHUNKS = -(-ROWS // CHUNK)
KEYS = ("obs", "actions", "rewards", "dones", "task_ids", "tasks", "seeds", "episode_returns")
CHUNK_KEYS = ("obs", "actions", "rewards", "dones", "episode_returns")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT = 180  # generous: the machine may be busy with other work

# `icrl generate` that SIGKILLs itself at an exact moment, found by watching os.replace (the atomic
# rename every file of a run goes through): just before the joined output is renamed into place,
# or just after.
SELF_KILLING = """
import os, signal, sys
from icrl.cli import main
point, argv = sys.argv[1], sys.argv[2:]
real_replace = os.replace
def die():
    os.kill(os.getpid(), signal.SIGKILL)
    os._exit(99)  # not reached
def replace(src, dst):
    name = os.path.basename(dst)
    if point == "before-join-rename" and name.endswith(".h5"):
        die()
    real_replace(src, dst)
    if point == "after-join-rename" and name.endswith(".h5"):
        die()
os.replace = replace
sys.exit(main(argv))
"""


def generate_argv(out, *changes):
    return ["generate", "darkroom", "--out", str(out), *OPTIONS, *changes]


def parts_of(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def chunk_files(parts: Path) -> list[Path]:
    return sorted(parts.glob("chunk-*.npz")) if parts.is_dir() else []


def stamp(path: Path):
    """Changes whenever the file is rewritten (every save renames a new file into place)."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def dotfiles(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def read_dataset(path: Path):
    with HistoryStore(path) as store:
        return {key: store.column(key) for key in KEYS}, store.meta


class Reference:
    def __init__(self, path: Path, complete_parts: Path):
        self.path, self.complete_parts = path, complete_parts
        self.arrays, self.meta = read_dataset(path)
        self.bytes = path.read_bytes()

    def chunk(self, i: int) -> dict:
        rows = slice(i * CHUNK, (i + 1) * CHUNK)
        return {key: self.arrays[key][rows] for key in CHUNK_KEYS}


def assert_same_dataset(path: Path, ref: Reference):
    arrays, meta = read_dataset(path)
    for key in KEYS:
        assert arrays[key].dtype == ref.arrays[key].dtype, key
        assert arrays[key].shape == ref.arrays[key].shape, key
        assert np.array_equal(arrays[key], ref.arrays[key]), key
    assert meta == ref.meta
    # HDF5 files written by h5py here carry no timestamps or names: the bytes are the same too
    assert path.read_bytes() == ref.bytes


def assert_clean(out: Path):
    """No chunk folder, no temporary file (of the output or of a chunk) left next to the output."""
    assert not parts_of(out).exists(), sorted(os.listdir(parts_of(out)))
    assert dotfiles(out.parent) == []
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def assert_finished_chunks_match(parts: Path, ref: Reference) -> dict:
    """Every chunk file in `parts` (all are whole: they are renamed into place) holds exactly the
    reference's rows; returns their stamps."""
    stamps = {}
    for path in chunk_files(parts):
        i = int(path.stem.split("-")[1])
        with np.load(path) as f:
            data = {key: f[key] for key in CHUNK_KEYS}
        for key, want in ref.chunk(i).items():
            assert data[key].dtype == want.dtype and np.array_equal(data[key], want), (path, key)
        stamps[path.name] = stamp(path)
    return stamps


def launch(argv, log: Path, prefix=("-m", "icrl.cli")) -> subprocess.Popen:
    with open(log, "w") as err:  # a file, not a pipe: a full pipe would block the child
        return subprocess.Popen([sys.executable, *prefix, *argv], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=err)


def wait_until(proc: subprocess.Popen, condition, log: Path, what: str):
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"not {what} after {TIMEOUT} s"
        time.sleep(0.002)


def sigkill(proc: subprocess.Popen, log: Path):
    assert proc.poll() is None, f"finished before the kill:\n{log.read_text()}"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=TIMEOUT) == -signal.SIGKILL


def kill_after_chunks(out: Path, n: int, delay: float, log: Path) -> str:
    """Run `icrl generate` on `out`, SIGKILL it `delay` s after the n-th chunk file exists; say
    where the kill landed."""
    parts = parts_of(out)
    proc = launch(generate_argv(out), log)
    try:
        wait_until(proc, lambda: len(chunk_files(parts)) >= n, log, f"{n} chunks were saved")
        time.sleep(delay)
        sigkill(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return where(out)


def where(out: Path) -> str:
    done = len(chunk_files(parts_of(out)))
    if out.exists():
        return f"after the join ({done} chunks)"
    if any(name.startswith(f".{out.name}.tmp") for name in dotfiles(out.parent)):
        return f"during the join ({done} chunks)"
    return f"with {done} of {N_CHUNKS} chunks saved"


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Reference:
    """An uninterrupted run (in this process, through the same command line), and a copy of its
    chunk folder taken when all chunks were saved, just before they were joined."""
    d = tmp_path_factory.mktemp("reference")
    out, complete = d / "out" / "data.h5", d / "complete.parts"
    real_write_store = icrl.generate.write_store

    def copy_then_join(path, parts, meta):
        shutil.copytree(parts_of(Path(path)), complete)
        return real_write_store(path, parts, meta)

    with mock.patch.object(icrl.generate, "write_store", copy_then_join):
        assert main(generate_argv(out)) == 0
    assert_clean(out)
    assert len(chunk_files(complete)) == N_CHUNKS
    reference = Reference(out, complete)
    assert len(reference.arrays["actions"]) == ROWS
    assert reference.meta["generate"]["chunk_size"] == CHUNK
    assert_finished_chunks_match(complete, reference)
    return reference


@pytest.fixture(scope="module")
def killed(tmp_path_factory, ref):
    """A run SIGKILLed at a seeded-random moment after its 3rd to 5th chunk: (a copy of) the chunk
    folder it left, and where the kill landed."""
    d = tmp_path_factory.mktemp("killed")
    out = d / "out" / "data.h5"
    out.parent.mkdir()
    rng = random.Random(7)
    landed = kill_after_chunks(out, rng.randint(3, 5), rng.uniform(0.0, 0.25), d / "log")
    assert not out.exists(), landed
    n = len(chunk_files(parts_of(out)))
    assert 3 <= n < N_CHUNKS, landed
    assert_finished_chunks_match(parts_of(out), ref)
    shutil.copytree(parts_of(out), d / "killed.parts")
    return d / "killed.parts", landed


def test_sigkill_at_random_points_then_rerun_gives_the_uninterrupted_dataset(ref, killed,
                                                                            tmp_path):
    """Killed three times (the `killed` fixture's run, then two resumed runs: one at a random
    moment further on, one as soon as the last chunk is saved, i.e. in or near the join), then
    rerun to completion: the same dataset as the uninterrupted run, and nothing left over."""
    out = tmp_path / "out" / "data.h5"
    out.parent.mkdir()
    parts = parts_of(out)
    shutil.copytree(killed[0], parts)
    landed = [killed[1]]
    stamps = assert_finished_chunks_match(parts, ref)

    rng = random.Random(11)
    done = len(stamps)
    target = rng.randint(min(done + 2, N_CHUNKS - 3), N_CHUNKS - 3)
    landed.append(kill_after_chunks(out, target, rng.uniform(0.0, 0.2), tmp_path / "log2"))
    assert not out.exists(), landed  # really killed mid-run
    later = assert_finished_chunks_match(parts, ref)
    assert len(later) > done
    assert {k: later[k] for k in stamps} == stamps  # the resumed run skipped the saved chunks

    landed.append(kill_after_chunks(out, N_CHUNKS, 0.0, tmp_path / "log3"))
    if not out.exists():
        last = assert_finished_chunks_match(parts, ref)
        assert {k: last[k] for k in later} == later
    print(f"kills landed: {'; '.join(landed)}")
    assert sum("after the join" not in s for s in landed) >= 2, landed

    assert main(generate_argv(out)) == 0
    assert_same_dataset(out, ref)
    assert_clean(out)


@pytest.mark.parametrize("changes", [["--seed", "1"], ["--chunk-size", "32"],
                                     ["--episodes", "41"], ["--set", "planning_sweeps=9"]])
def test_killed_run_then_other_settings_is_a_one_line_error(ref, killed, tmp_path, capsys,
                                                           changes):
    out = tmp_path / "data.h5"
    shutil.copytree(killed[0], parts_of(out))
    before = {p.name: stamp(p) for p in parts_of(out).iterdir()}
    capsys.readouterr()
    assert main(generate_argv(out, *changes)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("icrl: error: "), err
    assert "other settings" in err and str(parts_of(out)) in err
    assert not out.exists()
    assert {p.name: stamp(p) for p in parts_of(out).iterdir()} == before  # left as it was


def test_killed_run_then_other_settings_from_the_command_line(killed, tmp_path):
    """The same through a real `icrl` process: exit status 2, one line, no traceback."""
    out = tmp_path / "data.h5"
    shutil.copytree(killed[0], parts_of(out))
    proc = subprocess.run([sys.executable, "-m", "icrl.cli", *generate_argv(out, "--seed", "1")],
                          capture_output=True, text=True, env=ENV, timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("icrl: error: "), proc.stderr
    assert not out.exists() and len(chunk_files(parts_of(out))) == len(chunk_files(killed[0]))


def test_damaged_chunks_after_a_kill_are_redone(ref, killed, tmp_path):
    out = tmp_path / "data.h5"
    parts = parts_of(out)
    shutil.copytree(killed[0], parts)
    first, second = parts / "chunk-00001.npz", parts / "chunk-00002.npz"
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])  # truncated
    data = bytearray(second.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in an array: the zip's CRC catches it
    second.write_bytes(bytes(data))
    (parts / "chunk-00000.npz").write_bytes(b"")  # empty
    assert main(generate_argv(out)) == 0
    assert_same_dataset(out, ref)
    assert_clean(out)


def test_rerun_of_a_finished_dataset_leaves_it_alone(ref, tmp_path, capsys):
    out = tmp_path / "data.h5"
    shutil.copy2(ref.path, out)
    before = stamp(out)
    assert main(generate_argv(out)) == 0  # the same settings: returns at once
    assert stamp(out) == before and out.read_bytes() == ref.bytes
    assert_clean(out)
    for changes in (["--seed", "1"], ["--chunk-size", "32"], ["--n-test", "15"]):
        capsys.readouterr()
        assert main(generate_argv(out, *changes)) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith("icrl: error: "), err
        assert "other settings" in err and "Traceback" not in err
        assert stamp(out) == before and out.read_bytes() == ref.bytes
        assert_clean(out)  # and no chunk folder was started


# Exact kill points around the join, hit by the process killing itself (see SELF_KILLING). Each
# starts from the complete chunk folder of the reference run, so only the join is left to do.
@pytest.mark.parametrize("point", ["before-join-rename", "after-join-rename"])
def test_sigkill_at_the_join_then_rerun(ref, tmp_path, point):
    out = tmp_path / "out" / "data.h5"
    out.parent.mkdir()
    shutil.copytree(ref.complete_parts, parts_of(out))
    log = tmp_path / "log"
    proc = launch([point, *generate_argv(out)], log, prefix=("-c", SELF_KILLING))
    try:
        assert proc.wait(timeout=TIMEOUT) == -signal.SIGKILL, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert parts_of(out).is_dir()
    if point == "before-join-rename":
        assert not out.exists()
        assert [n for n in dotfiles(out.parent) if n.startswith(".data.h5.tmp")]  # whole, unnamed
    else:
        assert_same_dataset(out, ref)
    assert main(generate_argv(out)) == 0
    assert_same_dataset(out, ref)
    assert_clean(out)


def test_killed_before_the_plan_was_saved_then_rerun(tmp_path):
    """A kill between creating OUT.parts and renaming plan.json into place leaves a chunk folder
    with no plan (at most its temporary file): the same settings must still run to the end. (The
    state is made directly, on a smaller run: the window is a few microseconds.)"""
    tiny = ["--episodes", "4", "--seeds-per-task", "1", "--chunk-size", "16"]
    whole = tmp_path / "whole" / "data.h5"
    assert main(["generate", "darkroom", "--out", str(whole), *tiny]) == 0
    out = tmp_path / "out" / "data.h5"
    parts = parts_of(out)
    parts.mkdir(parents=True)
    (parts / ".plan.json.tmp99999").write_text('{"kind": "hist')
    assert main(["generate", "darkroom", "--out", str(out), *tiny]) == 0
    assert_same_dataset(out, Reference(whole, None))
    assert_clean(out)


def test_one_chunk_is_the_plain_seeded_run(tmp_path):
    """chunk_seed: chunk 0 runs with the run's own seed, so a dataset of one chunk (chunk size >=
    rows) is exactly the plain seeded run of the source on all its rows, and in a chunked dataset
    chunk 0 is the plain seeded run on its own rows; chunk i > 0 is the run on its rows seeded with
    chunk_seed(seed, i). (The first rows of a one-chunk dataset are in general NOT those of chunk
    0: the learners draw their random numbers for the whole batch at once, so a history depends on
    the batch it ran in. The chunk size is therefore one of the settings, stored in the
    metadata.)"""
    family = make_family("darkroom")
    settings = dict(source_config={"init_value": 2}, n_episodes=6, seeds_per_task=1, seed=3)
    results = {}
    for size in (1000, 16):
        cfg = GenerateConfig(chunk_size=size, **settings)
        path = generate(family, tmp_path / f"size{size}.h5", cfg, progress=False)
        results[size] = read_dataset(path)[0]
    tasks = results[1000]["tasks"]
    assert len(tasks) == 65 and np.array_equal(tasks, results[16]["tasks"])

    def plain(rows, seed):
        source = make_source("qlearning", family, len(tasks[rows]), settings["source_config"],
                             seed)
        h = collect(family, tasks[rows], source, settings["n_episodes"], seed=seed)
        return {"obs": h.obs, "actions": h.actions, "rewards": h.rewards.astype(np.float16),
                "dones": h.dones, "episode_returns": h.episode_returns}

    for key, want in plain(slice(None), 3).items():
        assert np.array_equal(results[1000][key], want), key
    assert chunk_seed(3, 0) == 3 and chunk_seed(3, 1) != 3
    for i in (0, 1, 4):
        rows = slice(16 * i, 16 * (i + 1))
        for key, want in plain(rows, chunk_seed(3, i)).items():
            assert np.array_equal(results[16][key][rows], want), (i, key)
