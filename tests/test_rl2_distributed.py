"""RL² under torchrun: two gloo processes, each running half of the trials, train the weights one
process trains with the same global --n-envs; their training state continues in one process; and
a --n-envs that the processes cannot share is a one-line error."""
import os
import subprocess
import sys

import pytest

from icrl.baselines.rl2 import RL2Config, train_rl2
from icrl.checkpoint import read_train_state
from icrl.envs import make_family
from icrl.generate import GenerateConfig, generate
from icrl.train import STATE_FILE

# 8 trials of 2 Dark Room episodes (40 steps): 6 updates a trial, each 2 epochs x 3 minibatches
# (minibatches of 2-3 trials, so one process often holds none of a minibatch's rows)
SETTINGS = {"n_envs": 8, "trial_episodes": 2, "hidden": 16, "layers": 1, "unroll": 7,
            "epochs": 2, "minibatches": 3, "checkpoint_every": 1, "log_every": 1}
TRIAL = 8 * 40


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny history file whose only use here is its stored split."""
    return generate(make_family("darkroom"), tmp_path_factory.mktemp("rl2ddp") / "h.h5",
                    GenerateConfig(source="random", n_episodes=2, seeds_per_task=1, n_test=16),
                    progress=False)


def options(**settings) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]


def torchrun(data, out, steps, **changes) -> subprocess.CompletedProcess:
    """`icrl rl2` in 2 gloo processes on this CPU, as a user would start it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "icrl.cli", "rl2", str(data), "--out", str(out),
               *options(steps=steps, **{**SETTINGS, **changes})]
    return subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=240)


def single_process(data, out, steps):
    return train_rl2(data, out, RL2Config(steps=steps, **SETTINGS), progress=False)


def max_difference(a, b) -> float:
    """The largest difference of the actor-critics' weights (value head included)."""
    a, b = (read_train_state(d / STATE_FILE)["model"] for d in (a, b))
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_processes_follow_one_and_their_state_continues_in_one(data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    single_process(data, one, 2 * TRIAL)
    run = torchrun(data, two, 2 * TRIAL)
    assert run.returncode == 0, run.stdout
    assert max_difference(one, two) < 1e-5  # measured: 6e-8
    state = read_train_state(two / STATE_FILE)
    assert (state["env_steps"], state["updates"]) == (2 * TRIAL, 12)
    # only the first process writes TensorBoard scalars (one event file) and the progress bar
    assert len(list((two / "tb").glob("events.*"))) == 1
    assert run.stdout.count("RL² two:   0%") == 1
    # the state does not depend on the number of processes: one process continues it
    single_process(data, one, 3 * TRIAL)
    single_process(data, two, 3 * TRIAL)
    assert max_difference(one, two) < 1e-5


def test_trials_that_the_processes_cannot_share_are_a_one_line_error(data, tmp_path):
    run = torchrun(data, tmp_path / "bad", TRIAL, n_envs=7)
    assert run.returncode != 0
    lines = [line for line in run.stdout.splitlines() if "--n-envs" in line]
    assert lines and set(lines) == {"icrl: error: --n-envs (7) must be a multiple of the number "
                                    "of processes (2): each runs an equal share of the trials"}
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_the_same_error_in_process(data, tmp_path, monkeypatch):
    """Without torchrun: a group of 3 processes as join() would report it."""
    from icrl import distributed
    from icrl.errors import UserError

    monkeypatch.setattr(distributed, "join", lambda device: distributed.Group(0, 3, device))
    with pytest.raises(UserError, match=r"--n-envs \(8\) must be a multiple of the number of "
                                        r"processes \(3\)"):
        single_process(data, tmp_path / "three", TRIAL)
