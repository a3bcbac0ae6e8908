"""Data-parallel training: processes that each read their share of the global batch follow the
single-process run, under torchrun too, and a killed multi-process run resumes to the same end."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from icrl.checkpoint import load_policy, read_train_state
from icrl.data.store import HistoryStore
from icrl.data.windows import WindowSampler
from icrl.envs import make_family
from icrl.errors import UserError
from icrl.generate import GenerateConfig, generate
from icrl.train import STATE_FILE, ModelSpec, TrainConfig, train
from icrl.models.transformer import TransformerConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    return generate(make_family("darkroom"), d / "h.h5",
                    GenerateConfig(n_episodes=6, seeds_per_task=1, n_test=16), progress=False)


SPEC = ModelSpec(context=20, transformer=TransformerConfig(n_layer=1, n_head=2, d_model=16,
                                                           d_ff=32))
OPTIONS = ["--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "3", "--context", "20",
           "--layers", "1", "--heads", "2", "--d-model", "16", "--d-ff", "32"]


def single_process(data, out, steps):
    return train(data, out, SPEC, TrainConfig(steps=steps, batch_size=8, lr=3e-3,
                                              warmup_steps=3), progress=False)


def torchrun(data, out, steps, *extra, **popen):
    """`icrl train` in 2 gloo processes on this CPU, as a user would start it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "icrl.cli", "train", str(data), "--out", str(out),
               "--steps", str(steps), *OPTIONS, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def max_difference(run_a, run_b) -> float:
    a = load_policy(run_a / "model.pt")[1]["state_dict"]
    b = load_policy(run_b / "model.pt")[1]["state_dict"]
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_the_shares_of_two_processes_make_the_single_process_batch(data):
    with HistoryStore(data) as store:
        whole = WindowSampler(store, 20, 8, seed=3)
        halves = [WindowSampler(store, 20, 8, seed=3, rank=r, world=2) for r in (0, 1)]
        for _ in range(5):
            want, got = next(whole), [next(h) for h in halves]
            assert got[0]["actions"].shape[0] == 4
            for key, value in want.items():
                assert torch.equal(torch.cat([got[0][key], got[1][key]]), value), key
        # and from a mixture of stores, whose draw places each store's windows anywhere
        whole = WindowSampler([(store, 1.0), (store, 2.0)], 20, 8, seed=3)
        halves = [WindowSampler([(store, 1.0), (store, 2.0)], 20, 8, seed=3, rank=r, world=2)
                  for r in (0, 1)]
        for _ in range(5):
            want, got = next(whole), [next(h) for h in halves]
            for key, value in want.items():
                assert torch.equal(torch.cat([got[0][key], got[1][key]]), value), key
        with pytest.raises(UserError, match="multiple of the number of processes"):
            WindowSampler(store, 20, 9, rank=0, world=2)


def test_two_processes_follow_one(data, tmp_path):
    single_process(data, tmp_path / "one", 8)
    run = torchrun(data, tmp_path / "two", 8)
    output = run.communicate(timeout=240)[0]
    assert run.returncode == 0, output
    assert output.count("wrote") == 1  # only the first process reports
    assert max_difference(tmp_path / "one", tmp_path / "two") < 1e-5
    # the logged loss is the global batch's, as one process computes it
    one = load_policy(tmp_path / "one" / "model.pt")[1]["final_loss"]
    two = load_policy(tmp_path / "two" / "model.pt")[1]["final_loss"]
    assert two == pytest.approx(one, abs=1e-5)


def kill_tree(pid: int):
    """SIGKILL a process and all its descendants. torchrun starts each worker in a session of
    its own, so killing the launcher's process group would leave the workers running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, i = [pid], 0
    while i < len(tree):
        tree += children.get(tree[i], [])
        i += 1
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for_lock_release(out, timeout=60.0):
    """Until no process holds the output lock of `out` (a killed process releases it only once
    its exit completes)."""
    import fcntl

    lock = out.parent / f".{out.name}.lock"
    deadline = time.time() + timeout
    while lock.exists() and time.time() < deadline:
        try:
            with open(lock) as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
        except (BlockingIOError, FileNotFoundError):
            time.sleep(0.05)


def test_a_killed_two_process_run_resumes_to_the_same_end(data, tmp_path):
    steps = 400
    single_process(data, tmp_path / "one", steps)
    whole = torchrun(data, tmp_path / "whole", steps)
    output = whole.communicate(timeout=240)[0]
    assert whole.returncode == 0, output
    out = tmp_path / "two"
    run = torchrun(data, out, steps, "--checkpoint-every", "10", start_new_session=True)
    deadline = time.time() + 240
    while not (out / STATE_FILE).exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    kill_tree(run.pid)  # the launcher and both workers, with no warning
    run.wait()
    wait_for_lock_release(out)  # the workers' exits may finish after the launcher's
    saved = read_train_state(out / STATE_FILE)["step"]
    assert 0 < saved < steps, "the run ended before it could be killed"
    again = torchrun(data, out, steps)
    output = again.communicate(timeout=240)[0]
    assert again.returncode == 0, output
    assert max_difference(tmp_path / "whole", out) == 0    # as if never killed
    # and still the single-process run, up to 400 steps of float rounding
    assert max_difference(tmp_path / "one", out) < 1e-4
