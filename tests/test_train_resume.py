"""Resumable training: a run interrupted (by a signal) and continued ends with exactly the weights
of an uninterrupted run; a state from other data or other settings is refused in one line."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import icrl.train
from icrl.checkpoint import load_policy, read_train_state
from icrl.cli import main
from icrl.data.windows import WindowSampler
from icrl.envs import make_family
from icrl.generate import GenerateConfig, generate
from icrl.models.transformer import TransformerConfig
from icrl.train import ModelSpec, TrainConfig, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two tiny history files with different contents (source seeds 0 and 1)."""
    d = tmp_path_factory.mktemp("resume")
    return [generate(make_family("darkroom"), d / f"h{seed}.h5",
                     GenerateConfig(n_episodes=6, seeds_per_task=1, n_test=16, seed=seed),
                     progress=False) for seed in (0, 1)]


def tiny_spec(dropout=0.0):
    return ModelSpec(context=20, transformer=TransformerConfig(
        n_layer=1, n_head=2, d_model=16, d_ff=32, dropout=dropout, attn_dropout=dropout))


def tiny_cfg(**changes):
    return TrainConfig(**{"steps": 12, "batch_size": 4, "lr": 3e-3, "warmup_steps": 3,
                          "log_every": 1, "checkpoint_every": 4, **changes})


# The same tiny model through the command line.
CLI_OPTIONS = ["--batch-size", "4", "--lr", "3e-3", "--context", "20", "--layers", "1",
               "--heads", "2", "--d-model", "16", "--d-ff", "32", "--checkpoint-every", "5"]


def assert_same_weights(run_a, run_b):
    a = load_policy(run_a / "model.pt")[1]["state_dict"]
    b = load_policy(run_b / "model.pt")[1]["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def interrupt_at_batch(monkeypatch, n):
    """Make train()'s window stream send this process SIGINT while it serves batch n, as a user
    pressing Ctrl-C during step n - 1 would."""
    served = []

    class Interrupting(WindowSampler):
        def __next__(self):
            served.append(1)
            if len(served) == n:
                signal.raise_signal(signal.SIGINT)
            return super().__next__()

    monkeypatch.setattr(icrl.train, "WindowSampler", Interrupting)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resumed_run_equals_uninterrupted_run(data, tmp_path, monkeypatch, dropout):
    spec = tiny_spec(dropout)
    train(data[0], tmp_path / "whole", spec, tiny_cfg(), progress=False)

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    interrupt_at_batch(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt, match="saved at step 5 of 12"):
        train(data[0], tmp_path / "split", spec, tiny_cfg(), progress=False)
    monkeypatch.undo()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert load_policy(tmp_path / "split" / "model.pt")[1]["step"] == 5  # still a policy file

    # checkpoint_every does not change the weights, so a resumed run may change it
    train(data[0], tmp_path / "split", spec, tiny_cfg(checkpoint_every=1000), progress=False)
    assert_same_weights(tmp_path / "whole", tmp_path / "split")
    whole, split = (read_train_state(tmp_path / run / "train_state.pt")
                    for run in ("whole", "split"))
    assert whole["step"] == split["step"] == 12 and whole["loss_avg"] == split["loss_avg"]
    adam_steps = [[s["step"].item() for s in state["optimizer"]["state"].values()]
                  for state in (whole, split)]
    assert adam_steps[0] == adam_steps[1] == [12.0] * len(adam_steps[0])


def test_finished_run_is_returned_and_fresh_starts_over(data, tmp_path):
    ckpt = train(data[0], tmp_path / "run", tiny_spec(), tiny_cfg(), progress=False)
    written = ckpt.stat().st_mtime_ns
    assert train(data[0], tmp_path / "run", tiny_spec(), tiny_cfg(), progress=False) == ckpt
    assert ckpt.stat().st_mtime_ns == written
    # resume=False trains again from scratch, even with other settings
    train(data[0], tmp_path / "run", tiny_spec(), tiny_cfg(steps=3), progress=False, resume=False)
    assert load_policy(ckpt)[1]["step"] == 3


def _stamp(path):
    """Changes whenever the file is replaced (each save renames a new file into place)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def interrupt_cli(argv, state, sig, log):
    """Run `icrl ARGV` in a subprocess, send it `sig` as soon as it has saved a new training
    state (so the signal lands mid-run), and return (exit status, stderr)."""
    before = _stamp(state)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as in this process: same floats
    with open(log, "w") as err:  # a file, not a pipe: a full pipe would block the child
        proc = subprocess.Popen([sys.executable, "-m", "icrl.cli", *argv], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 120
        while _stamp(state) == before:
            assert proc.poll() is None, f"exited before saving a state:\n{log.read_text()}"
            assert time.monotonic() < deadline, "no training state after 120 s"
            time.sleep(0.01)
        proc.send_signal(sig)
        return proc.wait(timeout=120), log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_signal_saves_state_and_same_command_continues(data, tmp_path):
    argv = ["train", str(data[0]), "--out", str(tmp_path / "run"), "--steps", "150",
            *CLI_OPTIONS]
    state = tmp_path / "run" / "train_state.pt"
    stopped = [0]
    for sig in (signal.SIGINT, signal.SIGTERM):  # interrupted twice, resumed in between
        status, err = interrupt_cli(argv, state, sig, tmp_path / f"{sig.name}.log")
        assert status == 130, err
        assert "Traceback" not in err
        messages = [line for line in err.splitlines() if line.startswith("icrl:")]
        assert len(messages) == 1 and messages[0].startswith("icrl: interrupted; training state "
                                                             "saved at step "), err
        assert messages[0].endswith("; run the same command again to continue")
        stopped.append(read_train_state(state)["step"])
        assert stopped[-2] < stopped[-1] < 150 and f"step {stopped[-1]} of 150" in messages[0]
    assert main(argv) == 0

    reference = ["train", str(data[0]), "--out", str(tmp_path / "whole"), "--steps", "150",
                 *CLI_OPTIONS]
    assert main(reference) == 0
    assert_same_weights(tmp_path / "whole", tmp_path / "run")


def test_other_data_or_settings_is_a_one_line_error(data, tmp_path, capsys):
    options = ["--out", str(tmp_path / "run"), "--steps", "12", *CLI_OPTIONS]
    assert main(["train", str(data[0]), *options]) == 0
    capsys.readouterr()
    for argv, what in ((["train", str(data[1]), *options], "other data (h0.h5"),
                       (["train", str(data[0]), *options, "--lr", "0.01"], "lr 0.003 -> 0.01"),
                       (["train", str(data[0]), *options, "--d-model", "8"],
                        "transformer.d_model 16 -> 8")):
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("icrl: error: "), lines
        assert "train_state.pt" in lines[0] and what in lines[0] and "--fresh" in lines[0]
    assert main(["train", str(data[1]), *options, "--fresh"]) == 0
