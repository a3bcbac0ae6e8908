"""The prompting experiment end to end on a tiny configuration: report schema, prompt levels,
the figure, and a rerun that reuses the data and checkpoints."""
import json

import numpy as np
import pytest

from icrl.cli import main
from icrl.envs import make_family
from icrl.errors import UserError
from icrl.experiments import prompting
from icrl.experiments.presets import get_preset
from icrl.models.transformer import TransformerConfig
from icrl.train import ModelSpec, TrainConfig

EPSILONS = (1.0, 0.5, 0.0)


def tiny() -> prompting.Prompting:
    base = get_preset("darkroom")
    base.histories.n_episodes, base.histories.seeds_per_task = 6, 1
    base.expert.n_episodes, base.expert.seeds_per_task, base.expert.expert_episodes = 6, 1, 2
    base.model = ModelSpec(context=40, transformer=TransformerConfig(n_layer=1, n_head=2,
                                                                     d_model=16, d_ff=32))
    base.train, base.ed_steps = TrainConfig(steps=2, batch_size=4), 2
    return prompting.Prompting(base, epsilons=EPSILONS, prompt_episodes=2, episodes=3,
                               rollouts=2)


def test_report_schema_levels_and_rerun(tmp_path, monkeypatch):
    monkeypatch.setattr(prompting, "PRESETS", {"tiny": tiny})
    quiet = dict(progress=False, log=lambda *_: None)
    report = prompting.run(tmp_path, "darkroom", "tiny", **quiet)
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    assert (tmp_path / "prompting.png").stat().st_size > 10_000
    assert {p.name for p in tmp_path.iterdir()} == set(prompting.OUTPUTS)

    family = make_family("darkroom")
    oracle = family.oracle_returns(family.tasks()[report["test_tasks"]]).mean()
    assert report["oracle_return_mean"] == oracle
    levels = report["levels"]
    assert [level["epsilon"] for level in levels] == list(EPSILONS)
    prompt = [level["prompt_return_mean"] for level in levels]
    assert prompt[-1] == oracle                       # epsilon 0: the optimal policy exactly
    assert prompt[0] < 0.1 * oracle and np.all(np.diff(prompt) > 0)
    for level in levels:
        assert set(level) == {"epsilon", "prompt_return_mean", "AD", "ED"}
        for m in (level["AD"], level["ED"]):
            assert len(m["episode_returns_mean"]) == 3
            assert m["last_return_mean"] == m["episode_returns_mean"][-1]
            assert m["n_tasks"] == 16 and m["n_rollouts"] == 32 and m["n_seeds"] == 1
    assert report["prompt_episodes"] == 2 and report["config"]["epsilons"] == EPSILONS

    files = [tmp_path / "data" / "histories.h5", tmp_path / "data" / "expert.h5",
             tmp_path / "ad" / "seed0" / "model.pt", tmp_path / "ed" / "seed0" / "model.pt"]
    before = [f.stat().st_mtime_ns for f in files]
    again = prompting.run(tmp_path, None, "tiny", **quiet)
    assert [f.stat().st_mtime_ns for f in files] == before
    assert {**again, "wall_seconds": 0} == {**report, "wall_seconds": 0}


def test_optimal_demonstrator_collects_the_oracle_return():
    family = make_family("darkroom")
    tasks = family.tasks()
    env = family.make(tasks)
    returns = np.zeros(len(tasks))
    for _ in range(family.episode_len):
        _, reward, _ = env.step(prompting.optimal_actions(env))
        returns += reward
    assert (returns == family.oracle_returns(tasks)).all()


def test_other_families_and_presets_are_refused(tmp_path, capsys):
    with pytest.raises(UserError, match="darkroom only"):
        prompting.run(tmp_path, "keydoor")
    with pytest.raises(UserError, match="unknown preset"):
        prompting.run(tmp_path, "darkroom", "huge")
    assert not any(tmp_path.iterdir())
    out = tmp_path / "out"
    assert main(["experiment", "prompting", "--family", "bandit", "--out", str(out)]) == 2
    assert "darkroom only" in capsys.readouterr().err and not out.exists()


def test_any_family_with_a_scripted_policy_can_prompt():
    """Watermaze's navigator as the demonstrator: at epsilon 0 the prompt is exactly the
    navigator's own rollout; random actions make it worse; the agent then plays on."""
    from icrl.envs.watermaze import navigator_actions
    from icrl.models.policy import PolicyConfig, SequencePolicy

    family = make_family("watermaze-state")
    tasks = family.tasks()[:6]
    policy = SequencePolicy(PolicyConfig(family.obs_spec, family.n_actions, family.episode_len,
                                         ModelSpec(context=60, transformer=TransformerConfig(
                                             n_layer=1, n_head=2, d_model=16, d_ff=32)))).eval()
    prompt, returns = prompting.prompted_rollouts(policy, family, tasks, (0.0,), 2, 1,
                                                  optimal=navigator_actions)
    env, navigator = family.make(tasks, seed=0), np.zeros((len(tasks), 2))
    env.reset()
    for t in range(2 * family.episode_len):
        _, reward, done = env.step(navigator_actions(env))
        navigator[:, t // family.episode_len] += reward
        if done.any():
            env.reset(done)
    assert prompt.shape == (1, 1, 6, 2) and returns.shape == (1, 1, 6, 1)
    assert (prompt[0, 0] == navigator).all() and navigator.mean() > 8

    prompt, _ = prompting.prompted_rollouts(policy, family, tasks, (1.0, 0.0), 2, 1, 2,
                                            optimal=navigator_actions)
    assert prompt[0].mean() < 2 < 8 < prompt[1].mean()
