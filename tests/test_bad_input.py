"""Whole classes of bad input (docs/reliability.md, "Bad input"): each case ends in exit status 2,
exactly one `icrl: error:` line, no traceback, and nothing created or changed; the Python API
raises UserError for the same inputs."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from icrl.atomic import atomic_write, output_lock
from icrl.cli import EvaluateOptions, RunOptions, build_parser, main
from icrl.config import check, from_options, options
from icrl.envs import make_family
from icrl.errors import UserError
from icrl.generate import GenerateConfig, check_generate_size, generate
from icrl.sources import make_source
from icrl.train import ModelSpec, TrainConfig, validate_train_config

TINY_TRAIN = ["--steps", "1", "--batch-size", "2", "--context", "20", "--layers", "1",
              "--d-model", "16", "--d-ff", "16"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny history file and a checkpoint trained on it for one step."""
    d = tmp_path_factory.mktemp("made")
    assert main(["generate", "darkroom", "--out", str(d / "h.h5"), "--episodes", "4",
                 "--seeds-per-task", "1"]) == 0
    assert main(["train", str(d / "h.h5"), "--out", str(d / "ad"), *TINY_TRAIN]) == 0
    return d


def _snapshot(*roots):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for root in roots for p in sorted(root.rglob("*"))}


def refused(args, expected, capfd, *roots):
    """Run `icrl ARGS` in-process: exit 2, one error line containing `expected`, nothing under
    `roots` created or changed."""
    before = _snapshot(*roots)
    code = main([str(a) for a in args])
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("icrl: error: "), err
    assert expected in lines[0], lines[0]
    assert _snapshot(*roots) == before


def _case(*args, expected):
    words = ["PATH" if callable(a) else str(a) for a in args]
    return pytest.param(args, expected, id=" ".join(words)[:70])


# -- 1. The operating system says no ------------------------------------------------------------

def _loop(t):
    (t / "loop").symlink_to(t / "loop")
    return t / "loop"


def _file(t):
    (t / "f").write_bytes(b"not a folder")
    return t / "f"


LONG = "n" * 300

OS_CASES = [
    _case("generate", "darkroom", "--out", lambda d, t: _loop(t) / "h.h5",
          expected="Too many levels of symbolic links"),
    _case("generate", "darkroom", "--out", lambda d, t: _file(t) / "h.h5",
          expected="Not a directory"),
    _case("generate", "darkroom", "--out", lambda d, t: t / f"{LONG}.h5",
          expected="File name too long"),
    _case("train", lambda d, t: d / "h.h5", "--out", lambda d, t: _loop(t) / "m", *TINY_TRAIN,
          expected="Too many levels of symbolic links"),
    _case("train", lambda d, t: d / "h.h5", "--out", lambda d, t: t / LONG, *TINY_TRAIN,
          expected="File name too long"),
    _case("train", lambda d, t: d / "h.h5", "--out", "/proc/self/m", *TINY_TRAIN,
          expected="/proc/self/"),
    _case("run", "darkroom", "--out", lambda d, t: _file(t) / "deeper" / "run",
          expected="Not a directory"),
    _case("run", "darkroom", "--out", "/proc/self/run", expected="/proc/self/"),
    _case("evaluate", lambda d, t: d / "ad" / "model.pt", "--out",
          lambda d, t: _loop(t) / "e.json", expected="Too many levels of symbolic links"),
    _case("evaluate", lambda d, t: d / "ad" / "model.pt", "--out", lambda d, t: t / f"{LONG}.json",
          expected="File name too long"),
    _case("evaluate", "/proc/self/mem", expected="/proc/self/mem"),
    _case("train", lambda d, t: _loop(t), "--out", lambda d, t: t / "m", expected="loop"),
]


@pytest.mark.parametrize("args, expected", OS_CASES)
def test_the_system_refuses(args, expected, made, tmp_path, capfd):
    args = [a(made, tmp_path) if callable(a) else a for a in args]
    refused(args, expected, capfd, tmp_path, made)


def test_a_read_only_folder(made, tmp_path, capfd):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: chmod does not deny writes")
        for args in (["generate", "darkroom", "--out", folder / "h.h5"],
                     ["train", made / "h.h5", "--out", folder / "m", *TINY_TRAIN],
                     ["run", "darkroom", "--out", folder / "run"]):
            refused(args, "Permission denied", capfd, tmp_path, made)
    finally:
        folder.chmod(0o755)


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(OSError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise OSError(28, "No space left on device")
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]
    with pytest.raises(OSError, match="Not a directory"):  # refused before the writer runs
        with atomic_write(target / "x.json"):
            raise AssertionError("not reached")


# -- 3. Numbers legal in type but not in range ---------------------------------------------------

RANGE_CASES = [
    _case("generate", "darkroom", "--seed", str(2 ** 63), expected="--seed: must be below 2**63"),
    _case("generate", "darkroom", "--split-seed", "1e30", expected="--split-seed: must be below"),
    _case("generate", "darkroom", "--episodes", "1e12", expected="on disk"),
    _case("generate", "darkroom", "--seeds-per-task", "1e14", expected="on disk"),
    _case("generate", "darkroom", "--episodes", "1e999999999", expected="must be below 2**63"),
    _case("generate", "darkroom", "--episodes", "2.5", expected="expected an integer, got '2.5'"),
    _case("train", "@data", "--seed", str(2 ** 64), expected="--seed: must be below 2**63"),
    _case("train", "@data", "--batch-size", "1e12", expected="of memory"),
    _case("train", "@data", "--lr", "1e-400", expected="--lr: must be > 0, got 0.0"),
    _case("train", "@data", "--dropout", "1", expected="--dropout: must be >= 0 and < 1"),
    _case("train", "@data", "--min-lr-frac", "nan", expected="--min-lr-frac: must be a finite"),
    _case("evaluate", "@ckpt", "--seed", str(2 ** 63), expected="--seed: must be below 2**63"),
    _case("evaluate", "@ckpt", "--temperature", "1e400", expected="must be a finite number"),
    _case("evaluate", "@ckpt", "--rollouts", "1e12", "--episodes", "1", expected="of memory"),
    _case("run", "darkroom", "--steps", "1e30", expected="--steps: must be below 2**63"),
    _case("run", "darkroom", "--train-seeds", "0", expected="--train-seeds: must be >= 1"),
]


def _fill(args, made, tmp_path):
    """Fill in the data file, the checkpoint and an --out for the command."""
    args = [{"@data": made / "h.h5", "@ckpt": made / "ad" / "model.pt"}.get(a, a) for a in args]
    out = {"generate": "h.h5", "train": "m", "run": "run", "evaluate": "e.json"}[args[0]]
    return args + ["--out", tmp_path / out]


@pytest.mark.parametrize("args, expected", RANGE_CASES)
def test_numbers_out_of_range(args, expected, made, tmp_path, capfd):
    refused(_fill(list(args), made, tmp_path), expected, capfd, tmp_path, made)


def test_the_api_checks_the_same_ranges(tmp_path):
    darkroom = make_family("darkroom")
    for cfg, message in ((GenerateConfig(seed=2 ** 63), "--seed"),
                         (GenerateConfig(n_episodes=0), "--episodes"),
                         (GenerateConfig(every=True), "--every"),
                         (GenerateConfig(n_train=1.5), "--n-train")):
        with pytest.raises(UserError, match=message):
            cfg.validate(darkroom)
        with pytest.raises(UserError, match=message):
            generate(darkroom, tmp_path / "h.h5", cfg, progress=False)
    with pytest.raises(UserError, match="on disk"):
        check_generate_size(darkroom, GenerateConfig(n_episodes=10 ** 12), tmp_path / "h.h5")
    for cfg in (TrainConfig(seed=2 ** 63), TrainConfig(lr=0.0), TrainConfig(batch_size=np.inf)):
        with pytest.raises(UserError):
            validate_train_config(cfg, ModelSpec())
    with pytest.raises(UserError, match="--temperature"):
        check(EvaluateOptions(temperature=0.0))
    assert not list(tmp_path.iterdir())


def test_a_tiny_temperature_is_accepted_and_stays_finite(made, tmp_path, capfd):
    """Accepted by the command line (any finite temperature > 0), so the sampling must cope."""
    code = main(["evaluate", str(made / "ad" / "model.pt"), "--temperature", "1e-40",
                 "--episodes", "2", "--rollouts", "1", "--out", str(tmp_path / "e.json")])
    assert code == 0, capfd.readouterr().err


# -- 4. A source that does not fit the family ----------------------------------------------------

@pytest.mark.parametrize("family, source", [("darkroom", "thompson"), ("darkroom", "ucb"),
                                            ("keydoor", "thompson"), ("darkroom-hard", "ucb")])
def test_a_source_for_another_family(family, source, tmp_path, capfd):
    refused(["generate", family, "--source", source, "--out", tmp_path / "h.h5",
             "--episodes", "2"], f"source '{source}' does not apply to {family}", capfd,
            tmp_path)
    fam = make_family(family)
    with pytest.raises(UserError, match="does not apply"):
        make_source(source, fam, 2)
    with pytest.raises(UserError, match="does not apply"):
        generate(fam, tmp_path / "h.h5", GenerateConfig(source=source, n_episodes=2),
                 progress=False)
    assert not list(tmp_path.iterdir())


def test_every_family_has_a_source_that_fits():
    for name in ("darkroom", "darkroom-hard", "keydoor", "bandit"):
        make_source("random", make_family(name), 1)
    make_source("thompson", make_family("bandit"), 1)


# -- 5. Other people's files and other processes -------------------------------------------------

def _foreign(path, torch_file=False):
    """A file of someone else's at `path`; returns its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if torch_file:
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path.write_text("my notes")
    return path.parent


OTHERS_CASES = [
    _case("train", "@data", "--out", lambda t: _foreign(t / "m" / "model.pt", torch_file=True),
          *TINY_TRAIN, expected="model.pt exists and is not an icrl policy checkpoint"),
    _case("train", "@data", "--out", lambda t: _foreign(t / "m" / "model.pt"), *TINY_TRAIN,
          expected="not overwriting it"),
    _case("train", "@data", "--out", lambda t: _foreign(t / "m" / "model.pt" / "x").parent,
          *TINY_TRAIN, expected="model.pt is a directory"),
    _case("train", "@data", "--out", "", expected="expected a path, got ''"),
    _case("generate", "darkroom", "--out", "", expected="expected a path, got ''"),
    _case("evaluate", "@ckpt", "--out", "", expected="expected a path, got ''"),
    _case("run", "darkroom", "--out", "", expected="expected a path, got ''"),
    _case("train", "", "--out", lambda t: t / "m", expected="expected a path, got ''"),
]


@pytest.mark.parametrize("args, expected", OTHERS_CASES)
def test_other_peoples_files(args, expected, made, tmp_path, capfd):
    args = [{"@data": made / "h.h5", "@ckpt": made / "ad" / "model.pt"}.get(a, a)
            if not callable(a) else a(tmp_path) for a in args]
    refused(args, expected, capfd, tmp_path, made)


@pytest.mark.parametrize("command", ["generate", "train", "evaluate", "run"])
def test_an_output_in_use(command, made, tmp_path, capfd):
    args = _fill({"generate": ["generate", "darkroom", "--episodes", "2"],
                  "train": ["train", "@data", *TINY_TRAIN],
                  "evaluate": ["evaluate", "@ckpt", "--episodes", "1", "--rollouts", "1"],
                  "run": ["run", "darkroom"]}[command], made, tmp_path)
    with output_lock(args[-1]):  # as another process would hold it
        refused(args, "is in use by another icrl process", capfd, made)
    assert not list(tmp_path.iterdir())  # the lock is gone with its holder


def test_two_generate_runs_at_once(tmp_path):
    """Both start at the same moment: one writes the dataset, the other says the output is in
    use (or, if it came second, finds it finished); nobody gets a traceback."""
    out = tmp_path / "h.h5"
    cmd = [sys.executable, "-m", "icrl.cli", "generate", "darkroom", "--out", str(out),
           "--episodes", "200", "--seeds-per-task", "8"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    for code, err in results:
        assert "Traceback" not in err
        if code == 2:
            lines = [line for line in err.splitlines() if line.startswith("icrl:")]
            assert len(lines) == 1 and "is in use by another icrl process" in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.h5"]


def test_a_lock_is_exclusive_and_released(tmp_path):
    out = tmp_path / "a" / "b" / "h.h5"
    with output_lock(out):
        with pytest.raises(UserError, match="in use"):
            with output_lock(out):
                pass
    assert not list(tmp_path.iterdir())  # the lock file and the folders made for it are gone
    with output_lock(out):
        out.write_text("x")
    assert sorted(p.name for p in out.parent.iterdir()) == ["h.h5"]


# -- the options are the configs' fields ---------------------------------------------------------

def test_every_option_default_is_its_fields_default():
    parser = build_parser()
    parsed = {"generate": parser.parse_args(["generate", "darkroom", "--out", "x.h5"]),
              "train": parser.parse_args(["train", "d.h5", "--out", "m"]),
              "evaluate": parser.parse_args(["evaluate", "m.pt"]),
              "run": parser.parse_args(["run", "darkroom", "--out", "r"])}
    for command, classes in {"generate": [GenerateConfig], "train": [TrainConfig, ModelSpec],
                             "evaluate": [EvaluateOptions], "run": [RunOptions]}.items():
        for cls in classes:
            assert from_options(cls, parsed[command]) == cls(), (command, cls)
            for opt in options(cls):
                assert getattr(parsed[command], ".".join(opt.path)) == opt.default
    assert parsed["train"].steps == TrainConfig().steps == 3000


def test_every_field_is_an_option():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for command, classes in {"generate": [GenerateConfig], "train": [TrainConfig, ModelSpec]}.items():
        flags = {s for a in sub[command]._actions for s in a.option_strings}
        for cls in classes:
            for opt in options(cls):
                assert opt.flag in flags, (command, opt.flag)



# -- 2. Well-formed files with impossible contents -----------------------------------------------

def _impossible_store(src, dst, key, value, monkeypatch, split=None):
    """A copy of history file `src` with one impossible value in dataset `key` (or another
    stored split), written by the store's own writer (its content check switched off), so that
    checksums and metadata hold."""
    import h5py

    from icrl.data import store

    with h5py.File(src) as f:
        arrays = {k: f[k][:] for k in ("obs", "actions", "rewards", "dones", "task_ids", "tasks",
                                       "seeds", "episode_returns")}
        meta = {k: v for k, v in json.loads(f.attrs["meta"]).items()
                if k not in ("format_version", "n_histories", "n_steps")}
    if key is not None:
        arrays[key].flat[3] = value
    meta["split"] = split or meta["split"]
    with monkeypatch.context() as m:
        m.setattr(store, "bad_values", lambda *args: None)
        store.write_store(dst, store.HistoryArrays(**arrays), meta)
    return dst


def _checkpoint_with(src, dst, change):
    from icrl.checkpoint import save_checkpoint

    ckpt = torch.load(src, weights_only=True)
    for key in ("kind", "format_version"):
        ckpt.pop(key)
    change(ckpt)
    save_checkpoint(dst, ckpt)
    return dst


def _nan_weights(ckpt):
    ckpt["state_dict"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v
                          for k, v in ckpt["state_dict"].items()}


def _split_beyond_the_tasks(ckpt):
    ckpt["split"]["test"] = [0, 5000]


# The store checks contents as training reads them; train reads its first batch before it
# writes or shows anything.
@pytest.mark.parametrize("key, value, expected", [("obs", 200, "observation"),
                                                  ("actions", 17, "action"),
                                                  ("rewards", np.nan, "non-finite")])
def test_a_history_file_with_impossible_contents(key, value, expected, made, tmp_path, capfd,
                                                 monkeypatch):
    data = _impossible_store(made / "h.h5", tmp_path / "bad.h5", key, value, monkeypatch)
    refused(["train", data, "--out", tmp_path / "m", *TINY_TRAIN], expected, capfd, tmp_path,
            made)


@pytest.mark.parametrize("split, expected", [
    ({"seed": 0, "train": [0, 1, 81], "test": [2]}, "'train' set is not a list of distinct"),
    ({"seed": 0, "train": [0, 1, 1], "test": [2]}, "'train' set is not a list of distinct"),
    ({"seed": 0, "train": [0, 1, 2], "test": [2]}, "trains on held-out tasks"),
    ({"seed": 0, "test": [2]}, "no 'train' set")])
def test_a_history_file_with_an_impossible_split(split, expected, made, tmp_path, capfd,
                                                 monkeypatch):
    data = _impossible_store(made / "h.h5", tmp_path / "bad.h5", None, None, monkeypatch, split)
    refused(["train", data, "--out", tmp_path / "m", *TINY_TRAIN], expected, capfd, tmp_path,
            made)


@pytest.mark.parametrize("change, expected", [(_nan_weights, "non-finite weights"),
                                              (_split_beyond_the_tasks, "split")])
def test_a_checkpoint_with_impossible_contents(change, expected, made, tmp_path, capfd):
    ckpt = _checkpoint_with(made / "ad" / "model.pt", tmp_path / "bad.pt", change)
    refused(["evaluate", ckpt, "--episodes", "1", "--rollouts", "1"], expected, capfd, tmp_path,
            made)
