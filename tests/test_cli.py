"""The command line end to end on a tiny configuration, and its answers to bad input."""
import hashlib
import json
import subprocess
import sys
import warnings
import zipfile

import h5py
import numpy as np
import pytest

from icrl.checkpoint import save_checkpoint
from icrl.cli import main
from icrl.envs import make_family
from icrl.models.policy import ModelSpec, PolicyConfig, SequencePolicy
from icrl.models.transformer import TransformerConfig


def run_cli(*args):
    """Run `icrl` in a subprocess; return (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "icrl.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def _tiny_checkpoint(path, policy_family, stored_family):
    """An untrained checkpoint of a model for `policy_family`, stored as trained on
    `stored_family`: no training needed to have a checkpoint of another family (or a
    self-contradicting one)."""
    fam, stored = make_family(policy_family), make_family(stored_family)
    cfg = PolicyConfig(fam.obs_spec, fam.n_actions, fam.episode_len, ModelSpec(
        context=4, transformer=TransformerConfig(n_layer=1, n_head=1, d_model=8, d_ff=8)))
    split = {"seed": 0, **{k: v.tolist() for k, v in stored.split(4).items()}}
    save_checkpoint(path, {"policy_config": cfg.to_dict(), "family": stored.config(),
                           "split": split, "state_dict": SequencePolicy(cfg).state_dict()})
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """generate -> train -> checkpoint, tiny, shared by the tests of this module; plus a bandit
    checkpoint and one whose model does not fit its stored family."""
    d = tmp_path_factory.mktemp("pipeline")
    assert main(["generate", "darkroom", "--out", str(d / "h.h5"), "--episodes", "12",
                 "--seeds-per-task", "1", "--set", "init_value=5", "--set", "eps_start=0"]) == 0
    assert main(["train", str(d / "h.h5"), "--out", str(d / "ad"), "--steps", "3",
                 "--batch-size", "4", "--context", "40", "--layers", "1", "--d-model", "16",
                 "--d-ff", "32"]) == 0
    _tiny_checkpoint(d / "bandit.pt", "bandit", "bandit")
    _tiny_checkpoint(d / "mismatch.pt", "bandit", "darkroom")
    return d


def test_generate_train_evaluate(pipeline, tmp_path):
    with h5py.File(pipeline / "h.h5") as f:
        meta = json.loads(f.attrs["meta"])
        assert f["actions"].shape == (65, 12 * 20) and f["obs"].dtype == np.uint8
    assert len(meta["split"]["test"]) == 16 and meta["source"]["config"]["init_value"] == 5
    assert set(meta["split"]["test"]).isdisjoint(json.loads(
        json.dumps(np.unique(h5py.File(pipeline / "h.h5")["task_ids"][:]).tolist())))
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(pipeline / "ad" / "model.pt"), "--episodes", "3",
                 "--rollouts", "2", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["n_tasks"] == 16 and len(summary["episode_returns_mean"]) == 3
    # an earlier summary is ours to replace
    assert main(["evaluate", str(pipeline / "ad" / "model.pt"), "--episodes", "2",
                 "--rollouts", "1", "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["episode_returns_mean"]) == 2


def _corrupt(path, tmp_path):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid: mid + 64] = bytes(b ^ 0xFF for b in data[mid: mid + 64])  # always a change
    bad = tmp_path / "flipped.h5"
    bad.write_bytes(bytes(data))
    return bad


def _flip_weights(path, tmp_path):
    """The checkpoint with 16 bytes flipped inside its largest record (a weight tensor), where
    torch.load itself notices nothing."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.compress_size)
    # local header: 30 bytes, then the name and the extra field, whose lengths it gives
    at = info.header_offset
    name_len, extra_len = (int.from_bytes(data[at + i: at + i + 2], "little") for i in (26, 28))
    start = at + 30 + name_len + extra_len + info.compress_size // 2
    data[start: start + 16] = bytes(b ^ 0xFF for b in data[start: start + 16])
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    return bad


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _half(path, tmp_path, name):
    return _write(tmp_path / name, path.read_bytes()[: path.stat().st_size // 2])


def _dir_with(path, name):
    return _write(path / name, b"someone else's file").parent


CKPT = ("ad", "model.pt")
SMALL_RUN = ["--episodes", "1", "--rollouts", "1"]  # bounds the cost if a check ever lets it run
TINY_TRAIN = ["--steps", "1", "--batch-size", "2", "--context", "20", "--layers", "1",
              "--d-model", "16", "--d-ff", "16"]

# name: (arguments from (pipeline dir, this test's tmp dir), a substring of the error line)
BAD_INPUTS = {
    # -- generate
    "unknown family (generate)": (lambda d, t: ["generate", "nope", "--out", t / "h.h5"],
                                  "unknown task family 'nope'"),
    "unknown source": (lambda d, t: ["generate", "darkroom", "--out", t / "h.h5", "--source", "x"],
                       "unknown source algorithm 'x'"),
    "unknown source setting": (lambda d, t: ["generate", "darkroom", "--out", t / "h.h5",
                                             "--set", "bogus=1"],
                               "unknown qlearning hyperparameter(s) bogus"),
    "setting without =": (lambda d, t: ["generate", "darkroom", "--out", t / "h.h5",
                                        "--set", "lr"], "--set expects KEY=VALUE"),
    "non-numeric setting": (lambda d, t: ["generate", "darkroom", "--out", t / "h.h5",
                                          "--set", "lr=fast"],
                            "--set lr: expected a number, got 'fast'"),
    "unusable source device": (lambda d, t: ["generate", "darkroom-pixels", "--out", t / "h.h5",
                                             "--source", "dqn", "--set", "device=nonsense"],
                               "device 'nonsense' is not usable here"),
    "fractional integer setting": (lambda d, t: ["generate", "darkroom", "--out", t / "h.h5",
                                                 "--set", "planning_sweeps=2.5"],
                                   "--set planning_sweeps: expected an integer, got 2.5"),
    "out-of-range setting": (lambda d, t: ["generate", "darkroom", "--out", t / "h.h5",
                                           "--set", "gamma=1.5"],
                             "--set gamma: must be between 0 and 1"),
    "negative setting": (lambda d, t: ["generate", "darkroom", "--out", t / "h.h5",
                                       "--source", "actor-critic", "--set", "lr=-0.1"],
                         "--set lr: must be > 0, got -0.1"),
    "infinite setting": (lambda d, t: ["generate", "darkroom", "--out", t / "h.h5",
                                       "--set", "lr=1e999"], "--set lr: must be a finite number"),
    "negative episodes": (lambda d, t: ["generate", "darkroom", "--out", t / "h.h5",
                                        "--episodes", "-3"], "--episodes: must be >= 1, got -3"),
    "non-numeric episodes": (lambda d, t: ["generate", "darkroom", "--out", t / "h.h5",
                                           "--episodes", "ten"],
                             "--episodes: expected an integer, got 'ten'"),
    "too many test tasks": (lambda d, t: ["generate", "darkroom", "--out", t / "h.h5",
                                          "--n-test", "81"], "n_test must be between 1 and 80"),
    "too many training tasks": (lambda d, t: ["generate", "darkroom", "--out", t / "h.h5",
                                              "--n-train", "1000"],
                                "n_train must be between 1 and 65"),
    "zero chunk size": (lambda d, t: ["generate", "darkroom", "--out", t / "h.h5",
                                      "--chunk-size", "0"], "--chunk-size: must be >= 1, got 0"),
    "every > episodes": (lambda d, t: ["generate", "darkroom", "--out", t / "h.h5",
                                       "--episodes", "5", "--every", "9"],
                         "--every: must be between 1 and the episode count"),
    "ood tasks on darkroom": (lambda d, t: ["generate", "darkroom", "--out", t / "h.h5",
                                            "--tasks", "ood"],
                              "--tasks: must be one of train, test for darkroom, got 'ood'"),
    "dataset larger than the disk": (lambda d, t: ["generate", "darkroom", "--out", t / "h.h5",
                                                   "--episodes", str(10 ** 12)], "on disk"),
    "output is someone else's file": (lambda d, t: [
        "generate", "darkroom", "--out", _write(t / "notes.txt", b"keep me"), "--episodes", "2",
        "--seeds-per-task", "1"], "notes.txt: not an icrl history file"),
    "output under a file": (lambda d, t: ["generate", "darkroom", "--out",
                                          _write(t / "f", b"x") / "h.h5"],
                            "f/.h.h5.lock: Not a directory"),
    "output is a directory": (lambda d, t: ["generate", "darkroom", "--out", t],
                              "is a directory, expected a file path"),
    "missing --out": (lambda d, t: ["generate", "darkroom"],
                      "the following arguments are required: --out"),
    # -- train
    "missing data file": (lambda d, t: ["train", t / "absent.h5", "--out", t / "m"],
                          "absent.h5: no such file"),
    "directory as data": (lambda d, t: ["train", _dir_with(t / "data", "x"), "--out", t / "m"],
                          "is a directory, expected a history file"),
    "empty data file": (lambda d, t: ["train", _write(t / "e.h5", b""), "--out", t / "m"],
                        "not an icrl history file"),
    "text as data": (lambda d, t: ["train", _write(t / "e.h5", b"hello"), "--out", t / "m"],
                     "not an icrl history file"),
    "JSON file as data": (lambda d, t: ["train", _write(t / "e.json", b'{"obs": []}'),
                                        "--out", t / "m"], "not an icrl history file"),
    "checkpoint as data": (lambda d, t: ["train", d.joinpath(*CKPT), "--out", t / "m"],
                           "not an icrl history file"),
    "corrupt data file": (lambda d, t: ["train", _corrupt(d / "h.h5", t), "--out", t / "m",
                                        *TINY_TRAIN], "corrupt or truncated"),
    "truncated data file": (lambda d, t: ["train", _half(d / "h.h5", t, "half.h5"),
                                          "--out", t / "m"], "corrupt or truncated"),
    "context longer than histories": (lambda d, t: ["train", d / "h.h5", "--out", t / "m",
                                                    "--context", "100000"],
                                      "context 100000 is longer than the histories"),
    "context of one step": (lambda d, t: ["train", d / "h.h5", "--out", t / "m",
                                          "--context", "1"], "--context: must be >= 2, got 1"),
    "zero steps": (lambda d, t: ["train", d / "h.h5", "--out", t / "m", "--steps", "0"],
                   "--steps: must be >= 1, got 0"),
    "negative lr": (lambda d, t: ["train", d / "h.h5", "--out", t / "m", "--lr", "-1"],
                    "--lr: must be > 0, got -1"),
    "infinite lr": (lambda d, t: ["train", d / "h.h5", "--out", t / "m", "--lr", "inf"],
                    "--lr: must be a finite number, got inf"),
    "non-numeric layers": (lambda d, t: ["train", d / "h.h5", "--out", t / "m", "--layers",
                                         "two"], "--layers: expected an integer, got 'two'"),
    "heads do not divide width": (lambda d, t: ["train", d / "h.h5", "--out", t / "m",
                                                "--heads", "3"],
                                  "--d-model (64) must be divisible by --heads (3)"),
    "batch larger than memory": (lambda d, t: ["train", d / "h.h5", "--out", t / "m",
                                               "--batch-size", str(10 ** 12)], "of memory"),
    "unusable device": (lambda d, t: ["train", d / "h.h5", "--out", t / "m", "--device",
                                      "banana"], "device 'banana' is not usable here"),
    "train output is a file": (lambda d, t: ["train", d / "h.h5", "--out",
                                             _write(t / "m", b"keep"), *TINY_TRAIN],
                               "exists and is not a directory"),
    # -- evaluate
    "missing checkpoint": (lambda d, t: ["evaluate", t / "absent.pt"], "no such checkpoint file"),
    "directory as checkpoint": (lambda d, t: ["evaluate", d / "ad"],
                                "is a directory, expected a checkpoint file"),
    "history file as checkpoint": (lambda d, t: ["evaluate", d / "h.h5"],
                                   "not a readable checkpoint"),
    "training state as checkpoint": (lambda d, t: ["evaluate", d / "ad" / "train_state.pt"],
                                     "not an icrl policy checkpoint"),
    "empty checkpoint": (lambda d, t: ["evaluate", _write(t / "e.pt", b"")],
                         "not a readable checkpoint"),
    "truncated checkpoint": (lambda d, t: ["evaluate", _half(d.joinpath(*CKPT), t, "half.pt")],
                             "not a readable checkpoint"),
    "checkpoint with flipped bytes": (lambda d, t: ["evaluate",
                                                    _flip_weights(d.joinpath(*CKPT), t),
                                                    *SMALL_RUN], "not a readable checkpoint"),
    "checkpoint for another family": (lambda d, t: ["evaluate", d.joinpath(*CKPT),
                                                    "--family", "darkroom-hard"],
                                      "was trained on darkroom"),
    "bandit checkpoint as darkroom": (lambda d, t: ["evaluate", d / "bandit.pt",
                                                    "--family", "darkroom"],
                                      "was trained on bandit"),
    "model that does not fit its family": (lambda d, t: ["evaluate", d / "mismatch.pt"],
                                           "does not fit its family darkroom"),
    "unknown family to check": (lambda d, t: ["evaluate", d.joinpath(*CKPT), "--family", "x"],
                                "unknown task family 'x'"),
    "ood tasks on a darkroom checkpoint": (lambda d, t: ["evaluate", d.joinpath(*CKPT),
                                                         "--tasks", "ood"],
                                           "--tasks: must be one of train, test"),
    "zero episodes": (lambda d, t: ["evaluate", d.joinpath(*CKPT), "--episodes", "0"],
                      "--episodes: must be >= 1, got 0"),
    "negative rollouts": (lambda d, t: ["evaluate", d.joinpath(*CKPT), "--rollouts", "-2"],
                          "--rollouts: must be >= 1, got -2"),
    "rollouts beyond memory": (lambda d, t: ["evaluate", d.joinpath(*CKPT), "--episodes", "1",
                                             "--rollouts", str(10 ** 12)], "of memory"),
    "zero temperature": (lambda d, t: ["evaluate", d.joinpath(*CKPT), "--temperature", "0"],
                         "--temperature: must be > 0, got 0"),
    "non-numeric temperature": (lambda d, t: ["evaluate", d.joinpath(*CKPT), "--temperature",
                                              "hot"], "--temperature: expected a number"),
    "negative seed": (lambda d, t: ["evaluate", d.joinpath(*CKPT), "--seed", "-1"],
                      "--seed: must be >= 0, got -1"),
    "summary under a file": (lambda d, t: ["evaluate", d.joinpath(*CKPT), *SMALL_RUN, "--out",
                                           _write(t / "f", b"x") / "eval.json"],
                             "f/.eval.json.lock: Not a directory"),
    "summary over someone else's file": (lambda d, t: [
        "evaluate", d.joinpath(*CKPT), *SMALL_RUN, "--out", _write(t / "notes.json", b"[1]")],
        "exists and is not an evaluation summary"),
    "summary path is a directory": (lambda d, t: ["evaluate", d.joinpath(*CKPT), *SMALL_RUN,
                                                  "--out", _dir_with(t / "e", "x")],
                                    "is a directory, expected a file path"),
    # -- run
    "unknown family": (lambda d, t: ["run", "atlantis", "--out", t / "o"],
                       "unknown task family 'atlantis'"),
    "unknown preset": (lambda d, t: ["run", "darkroom", "--out", t / "o", "--preset", "huge"],
                       "unknown preset 'huge'"),
    "output dir is a file": (lambda d, t: ["run", "darkroom", "--out", _write(t / "o", b"k")],
                             "exists and is not a directory"),
    "output dir under a file": (lambda d, t: ["run", "darkroom", "--out",
                                              _write(t / "f", b"x") / "o"],
                                "f/.o.lock: Not a directory"),
    "output dir holds other files": (lambda d, t: ["run", "darkroom", "--out",
                                                   _dir_with(t / "o", "thesis.tex")],
                                     "holds other files (thesis.tex)"),
    "zero temperature (run)": (lambda d, t: ["run", "darkroom", "--out", t / "o",
                                             "--temperature", "0"], "must be > 0, got 0"),
    "negative steps (run)": (lambda d, t: ["run", "darkroom", "--out", t / "o", "--steps", "-2"],
                             "--steps: must be >= 1, got -2"),
    "non-numeric seeds (run)": (lambda d, t: ["run", "darkroom", "--out", t / "o",
                                              "--train-seeds", "x"], "expected an integer"),
    # -- no command
    "unknown command": (lambda d, t: ["fly"], "invalid choice: 'fly'"),
    "no command": (lambda d, t: [], "the following arguments are required: command"),
}


def _snapshot(*roots):
    """Every path under the roots, with a digest of each file's bytes."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for root in roots for p in sorted(root.rglob("*"))}


def _out_path(args):
    return args[args.index("--out") + 1] if "--out" in args else None


# Warnings Python shows on stderr by default (the others stay silent in a plain `icrl` run).
SILENT_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_line_error(case, pipeline, tmp_path, capfd):
    """In-process (a subprocess per case would cost seconds of imports): an exception escaping
    main() is the traceback a user would see; capfd also catches what C libraries print."""
    make_args, expected = BAD_INPUTS[case]
    args = make_args(pipeline, tmp_path)
    out = _out_path(args)
    out_existed = out is not None and out.exists()
    before = _snapshot(tmp_path, pipeline)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main([str(a) for a in args])
    err = capfd.readouterr().err
    shown = [w for w in caught if not issubclass(w.category, SILENT_WARNINGS)]
    assert code == 2, (case, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("icrl: error:") and not shown, \
        (case, err, [str(w.message) for w in shown])
    assert expected in lines[0], (case, lines[0])
    # No partial output: nothing new anywhere (no temp files, no .parts, no output directory),
    # and what was there, the output path included, is byte for byte the same.
    after = _snapshot(tmp_path, pipeline)
    assert after == before, (case, sorted(set(after) ^ set(before)),
                             [p for p in before if after.get(p, before[p]) != before[p]])
    if out is not None and not out_existed:
        assert not out.exists(), case


# The same through a real process, one case per command: exit status and the whole stderr.
SUBPROCESS_CASES = ["unknown source setting", "corrupt data file", "checkpoint with flipped bytes",
                    "output dir holds other files"]


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_in_a_real_process(case, pipeline, tmp_path):
    make_args, expected = BAD_INPUTS[case]
    code, out, err = run_cli(*make_args(pipeline, tmp_path))
    assert code == 2, (case, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("icrl: error:"), (case, err)
    assert expected in lines[0] and "Traceback" not in err
