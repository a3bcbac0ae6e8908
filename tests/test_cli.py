"""The command line end to end on a tiny configuration, and its answers to bad input."""
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from icrl.cli import main


def run_cli(*args):
    """Run `icrl` in a subprocess; return (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "icrl.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """generate -> train -> checkpoint, tiny, shared by the tests of this module."""
    d = tmp_path_factory.mktemp("pipeline")
    assert main(["generate", "darkroom", "--out", str(d / "h.h5"), "--episodes", "12",
                 "--seeds-per-task", "1", "--set", "init_value=5", "--set", "eps_start=0"]) == 0
    assert main(["train", str(d / "h.h5"), "--out", str(d / "ad"), "--steps", "3",
                 "--batch-size", "4", "--context", "40", "--layers", "1", "--d-model", "16",
                 "--d-ff", "32"]) == 0
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


def _corrupt(path, tmp_path):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid: mid + 64] = bytes(b ^ 0xFF for b in data[mid: mid + 64])  # always a change
    bad = tmp_path / "flipped.h5"
    bad.write_bytes(bytes(data))
    return bad


BAD_INPUTS = {
    "unknown family": lambda d, t: ["run", "atlantis", "--out", t / "o"],
    "unknown family (generate)": lambda d, t: ["generate", "nope", "--out", t / "h.h5"],
    "unknown source": lambda d, t: ["generate", "darkroom", "--out", t / "h.h5", "--source", "x"],
    "unknown source setting": lambda d, t: ["generate", "darkroom", "--out", t / "h.h5",
                                            "--set", "bogus=1"],
    "negative episodes": lambda d, t: ["generate", "darkroom", "--out", t / "h.h5",
                                       "--episodes", "-3"],
    "non-numeric episodes": lambda d, t: ["generate", "darkroom", "--out", t / "h.h5",
                                          "--episodes", "ten"],
    "too many test tasks": lambda d, t: ["generate", "darkroom", "--out", t / "h.h5",
                                         "--n-test", "81"],
    "every > episodes": lambda d, t: ["generate", "darkroom", "--out", t / "h.h5",
                                      "--episodes", "5", "--every", "9"],
    "missing data file": lambda d, t: ["train", t / "absent.h5", "--out", t / "m"],
    "directory as data": lambda d, t: ["train", t, "--out", t / "m"],
    "empty data file": lambda d, t: ["train", _write(t / "e.h5", b""), "--out", t / "m"],
    "text as data": lambda d, t: ["train", _write(t / "e.h5", b"hello"), "--out", t / "m"],
    "corrupt data file": lambda d, t: ["train", _corrupt(d / "h.h5", t), "--out", t / "m",
                                       "--steps", "2", "--batch-size", "2", "--context", "40"],
    "truncated data file": lambda d, t: ["train", _write(t / "half.h5", (d / "h.h5").read_bytes()[
        :(d / "h.h5").stat().st_size // 2]), "--out", t / "m"],
    "context longer than histories": lambda d, t: ["train", d / "h.h5", "--out", t / "m",
                                                   "--context", "100000"],
    "zero steps": lambda d, t: ["train", d / "h.h5", "--out", t / "m", "--steps", "0"],
    "negative lr": lambda d, t: ["train", d / "h.h5", "--out", t / "m", "--lr", "-1"],
    "heads do not divide width": lambda d, t: ["train", d / "h.h5", "--out", t / "m",
                                               "--heads", "3"],
    "missing checkpoint": lambda d, t: ["evaluate", t / "absent.pt"],
    "history file as checkpoint": lambda d, t: ["evaluate", d / "h.h5"],
    "checkpoint for another family": lambda d, t: ["evaluate", d / "ad" / "model.pt",
                                                   "--family", "darkroom-hard"],
    "zero episodes": lambda d, t: ["evaluate", d / "ad" / "model.pt", "--episodes", "0"],
    "unknown preset": lambda d, t: ["run", "darkroom", "--out", t / "o", "--preset", "huge"],
    "output dir is a file": lambda d, t: ["run", "darkroom", "--out", d / "h.h5"],
    "unknown command": lambda d, t: ["fly"],
}


def _write(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_line_error(case, pipeline, tmp_path):
    code, out, err = run_cli(*BAD_INPUTS[case](pipeline, tmp_path))
    assert code == 2, (case, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("icrl: error:"), (case, err)
    assert "Traceback" not in err
