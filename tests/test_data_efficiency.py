"""`icrl experiment data-efficiency` on a tiny preset: report schema, thresholds, reuse on rerun."""
import dataclasses
import json

import pytest

from icrl.cli import main
from icrl.envs import make_family
from icrl.errors import UserError
from icrl.experiments import data_efficiency as de
from icrl.generate import GenerateConfig
from icrl.models.transformer import TransformerConfig
from icrl.train import ModelSpec, TrainConfig

TINY = de.DataEfficiencyPreset(
    histories=GenerateConfig(source="actor-critic", n_episodes=30, every=10, seeds_per_task=1,
                             n_test=16),
    model=ModelSpec(context=40, transformer=TransformerConfig(n_layer=1, n_head=2, d_model=16,
                                                              d_ff=32)),
    train=TrainConfig(steps=2, batch_size=4), ad_episodes=4, rollouts=2, smooth=3)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(de.PRESETS["darkroom"], "tiny", TINY)


def test_episodes_to_counts_episodes_consumed():
    curve = [0, 1, 2, 3, 4, 5]
    assert de.episodes_to(curve, 3) == 4          # the 4th episode is the first at >= 3
    assert de.episodes_to(curve, 0) == 1
    assert de.episodes_to(curve, 5.5) is None
    # A single lucky episode does not count once smoothed: (0 + 9 + 0) / 3 = 3 < 5.
    spiky = [0, 0, 9, 0, 0, 6, 6, 6]
    assert de.episodes_to(spiky, 5) == 3
    assert de.episodes_to(spiky, 5, smooth=3) == 7
    # The window shrinks at the ends: the last episode is the mean of the last two.
    assert de.episodes_to([0, 0, 0, 4, 8], 6, smooth=3) == 5


def test_run_writes_report_and_reuses_outputs(tmp_path, tiny):
    report = de.run(tmp_path, None, "tiny", progress=False, log=lambda *_: None)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert (tmp_path / "data_efficiency.png").stat().st_size > 10_000
    assert set(report) >= {"oracle_return_mean", "curves", "config", "wall_seconds"}
    assert set(report["curves"]) == {"AD", "source"}
    family = make_family("darkroom")
    test = family.tasks()[report["test_tasks"]]
    assert len(test) == 16
    assert report["oracle_return_mean"] == pytest.approx(family.oracle_returns(test).mean())
    lengths = {"AD": TINY.ad_episodes, "source": TINY.histories.n_episodes}
    for name, c in report["curves"].items():
        assert c["episodes"] == list(range(1, lengths[name] + 1))
        assert len(c["returns_mean"]) == lengths[name]
        assert c["n_runs"] == 16 * TINY.rollouts
        for pct in (50, 90):
            assert c[f"episodes_to_{pct}pct"] == de.episodes_to(
                c["returns_mean"], pct / 100 * report["oracle_return_mean"], TINY.smooth)
    # The source's curve is its learning from scratch: it starts near a random walk's return.
    assert report["curves"]["source"]["returns_mean"][0] < 3

    outputs = [tmp_path / "data" / "histories.h5", tmp_path / "ad" / "seed0" / "model.pt",
               tmp_path / "ad" / "seed0" / "eval.npz", tmp_path / "source.npz"]
    before = [f.stat().st_mtime_ns for f in outputs]
    again = de.run(tmp_path, "darkroom", "tiny", progress=False, log=lambda *_: None)
    assert [f.stat().st_mtime_ns for f in outputs] == before
    assert {**again, "wall_seconds": 0} == {**report, "wall_seconds": 0}


def test_changed_evaluation_settings_are_not_served_from_the_cache(tmp_path, tiny, monkeypatch):
    de.run(tmp_path, None, "tiny", progress=False, log=lambda *_: None)
    monkeypatch.setitem(de.PRESETS["darkroom"], "tiny", dataclasses.replace(TINY, ad_episodes=5))
    report = de.run(tmp_path, None, "tiny", progress=False, log=lambda *_: None)
    assert len(report["curves"]["AD"]["returns_mean"]) == 5


def test_bad_family_or_preset_is_one_line_error(tmp_path, capsys):
    with pytest.raises(UserError, match="no preset for family 'keydoor'"):
        de.run(tmp_path, "keydoor")
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        de.run(tmp_path, None, "nope")
    assert main(["experiment", "data-efficiency", "--family", "bandit",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "choose from darkroom" in err
