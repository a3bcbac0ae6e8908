"""`icrl experiment context-size` on a tiny preset: sizes, seeds, report schema, reuse on rerun."""
import dataclasses
import json

import numpy as np
import pytest

from icrl.errors import UserError
from icrl.experiments import context_size as cs
from icrl.experiments.presets import get_preset
from icrl.models.transformer import TransformerConfig
from icrl.train import ModelSpec, TrainConfig


def tiny_preset() -> cs.ContextSizePreset:
    histories = get_preset("darkroom").histories
    histories.n_episodes, histories.every, histories.seeds_per_task = 6, 1, 1
    return cs.ContextSizePreset(
        histories=histories,
        model=ModelSpec(transformer=TransformerConfig(n_layer=1, n_head=2, d_model=16, d_ff=32)),
        train=TrainConfig(steps=2), context_episodes=(0.5, 1, 2), tokens_per_batch=80,
        train_seeds=3, eval_episodes=3, eval_rollouts=1)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(cs.PRESETS["darkroom"], "tiny", tiny_preset())


def test_default_preset_uses_the_darkroom_data_and_every_size():
    p = cs.get_preset("darkroom", "default")
    assert p.histories == get_preset("darkroom").histories
    assert cs.context_steps(p, 20) == [10, 20, 40, 80, 160]
    assert p.train_seeds >= 3


def test_context_entry_is_mean_and_std_over_seed_means():
    per_seed = np.array([[1.0, 4.0], [2.0, 6.0], [3.0, 11.0]])
    entry = cs.context_entry(2, 40, per_seed)
    assert entry["last_return_mean"] == 7.0
    assert entry["last_return_std"] == pytest.approx(np.std([4, 6, 11]), abs=1e-4)
    assert entry["n_seeds"] == 3 and entry["episode_returns_mean"] == [2.0, 7.0]


def test_run_writes_report_and_reuses_outputs(tmp_path, tiny):
    report = cs.run(tmp_path, None, "tiny", progress=False, log=lambda *_: None)
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    assert (tmp_path / "context_size.png").stat().st_size > 10_000
    contexts = report["contexts"]
    assert [c["context_episodes"] for c in contexts] == [0.5, 1, 2]
    assert [c["context_steps"] for c in contexts] == [10, 20, 40]
    for c in contexts:
        assert c["n_seeds"] == 3 and len(c["last_return_per_seed"]) == 3
        assert len(c["episode_returns_mean"]) == 3
        assert c["last_return_mean"] == pytest.approx(np.mean(c["last_return_per_seed"]),
                                                      abs=1e-4)
        assert c["last_return_std"] == pytest.approx(np.std(c["last_return_per_seed"]), abs=1e-4)
    # One dataset for every size; each size trained on batches of the same timesteps.
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["histories.h5"]
    from icrl.checkpoint import load_policy
    for steps in (10, 20, 40):
        _, meta = load_policy(tmp_path / "ad" / f"ctx{steps}" / "seed2" / "model.pt")
        assert meta["train_config"]["batch_size"] * steps == 80

    outputs = sorted((tmp_path / "ad").glob("ctx*/seed*/*.*")) + [tmp_path / "data" /
                                                                    "histories.h5"]
    assert len(outputs) == 3 * 3 * 3 + 1   # model.pt, train_state.pt, eval.npz per training
    before = [f.stat().st_mtime_ns for f in outputs]
    again = cs.run(tmp_path, "darkroom", "tiny", progress=False, log=lambda *_: None)
    assert [f.stat().st_mtime_ns for f in outputs] == before
    assert {**again, "wall_seconds": 0} == {**report, "wall_seconds": 0}


def test_bad_input_is_one_line_error(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no preset for family 'bandit'"):
        cs.run(tmp_path, "bandit")
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        cs.run(tmp_path, None, "nope")
    same = dataclasses.replace(tiny_preset(), context_episodes=(1, 1.01))
    monkeypatch.setitem(cs.PRESETS["darkroom"], "same", same)
    with pytest.raises(UserError, match="distinct contexts"):
        cs.run(tmp_path, None, "same")
    assert not (tmp_path / "data").exists()    # refused before any work
