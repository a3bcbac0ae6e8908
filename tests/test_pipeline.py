"""The whole AD pipeline on a tiny configuration: histories -> training -> report and figure."""
import json

import numpy as np
import torch

from icrl.checkpoint import load_policy
from icrl.data.store import HistoryStore
from icrl.envs import make_family
from icrl.evaluate import evaluate
from icrl.experiments.incontext import run_incontext
from icrl.experiments.presets import get_preset
from icrl.generate import GenerateConfig, generate
from icrl.models.policy import SequencePolicy
from icrl.models.transformer import TransformerConfig
from icrl.train import ModelSpec, TrainConfig, train

TINY_MODEL = ModelSpec(context=40, transformer=TransformerConfig(n_layer=1, n_head=2, d_model=16,
                                                                 d_ff=32))


def test_run_writes_report_and_figure(tmp_path):
    preset = get_preset("darkroom")
    preset.histories.n_episodes, preset.histories.seeds_per_task = 6, 1
    preset.expert.n_episodes, preset.expert.seeds_per_task, preset.expert.expert_episodes = 6, 1, 2
    preset.model, preset.train = TINY_MODEL, TrainConfig(steps=2, batch_size=4)
    preset.ed_steps, preset.eval_episodes, preset.eval_rollouts = 2, 3, 2
    report = run_incontext("darkroom", tmp_path, preset, progress=False, log=lambda *_: None)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert (tmp_path / "incontext.png").stat().st_size > 10_000
    assert set(report["methods"]) == {"AD", "ED", "source"}
    test = report["split"]["test_tasks"]
    assert len(test) == 16 and set(test).isdisjoint(report["split"]["train_tasks"])
    family = make_family("darkroom")
    assert report["oracle_return_mean"] == family.oracle_returns(family.tasks()[test]).mean()
    for m in report["methods"].values():
        assert len(m["episode_returns_mean"]) == len(m["episode_returns_std"]) == 3
        assert m["last_return_mean"] == m["episode_returns_mean"][-1]
        assert m["n_tasks"] == 16 and m["n_rollouts"] == 32
    # What AD distils: the source's mean return in each recorded episode of the histories.
    with HistoryStore(tmp_path / "data" / "histories.h5") as store:
        returns = store.column("episode_returns")
    every = preset.histories.every
    assert report["histories"]["every"] == every and report["histories"]["n_histories"] == \
        len(returns) > 0
    assert np.allclose(report["histories"]["recorded_episode_return_mean"],
                       returns[:, ::every].mean(0), atol=1e-4)
    assert np.isclose(report["histories"]["final_return_mean"], returns[:, -1].mean(), atol=1e-4)
    # A rerun on the same directory reuses the data and checkpoints and reports the same numbers.
    files = [tmp_path / "data" / "histories.h5", tmp_path / "ad" / "seed0" / "model.pt"]
    before = [f.stat().st_mtime_ns for f in files]
    again = run_incontext("darkroom", tmp_path, preset, progress=False, log=lambda *_: None)
    assert [f.stat().st_mtime_ns for f in files] == before
    assert {**again, "wall_seconds": 0} == {**report, "wall_seconds": 0}


def test_training_learns_the_source_policy(tmp_path):
    """A short training run on histories of a systematic learner cuts the action NLL well below
    uniform (ln 5 = 1.61), and the trained model beats an untrained one in context."""
    family = make_family("darkroom")
    cfg = GenerateConfig(source_config={"lr": 1.0, "init_value": 5.0, "eps_start": 0.0,
                                        "planning_sweeps": 20}, n_episodes=30, seeds_per_task=2)
    data = generate(family, tmp_path / "h.h5", cfg, progress=False)
    spec = ModelSpec(context=60, transformer=TransformerConfig(n_layer=2, n_head=2, d_model=32,
                                                               d_ff=64))
    ckpt = train(data, tmp_path / "ad", spec, TrainConfig(steps=300, batch_size=32, lr=3e-3),
                 progress=False)
    policy, meta = load_policy(ckpt)
    assert meta["final_loss"] < 1.0
    tasks = family.tasks()[meta["split"]["train"]]
    torch.manual_seed(0)
    untrained = SequencePolicy(policy.cfg).eval()
    trained_return = evaluate(policy, family, tasks, 5, seed=0).mean()
    untrained_return = evaluate(untrained, family, tasks, 5, seed=0).mean()
    assert trained_return > 3 * untrained_return + 1.0, (trained_return, untrained_return)


def test_bandit_run_reports_references_and_ood(tmp_path):
    preset = get_preset("bandit")
    preset.histories.n_episodes = preset.expert.n_episodes = 12
    preset.histories.n_train, preset.expert.expert_episodes = 300, 12
    preset.model = ModelSpec(context=12, transformer=TINY_MODEL.transformer)
    preset.train, preset.ed_steps = TrainConfig(steps=2, batch_size=4), 2
    preset.eval_episodes, preset.eval_rollouts = 12, 1
    report = run_incontext("bandit", tmp_path, preset, progress=False, log=lambda *_: None)
    split = report["split"]
    assert len(split["train_tasks"]) == 300 and len(split["test_tasks"]) == 500
    assert set(split["ood_tasks"]).isdisjoint(split["train_tasks"] + split["test_tasks"])
    family = make_family("bandit")
    for section, ids in ((report, split["test_tasks"]), (report["ood"], split["ood_tasks"])):
        assert set(section["methods"]) == {"AD", "ED", "source"}
        assert set(section["references"]) == {"UCB", "Thompson", "random", "oracle"}
        oracle = family.oracle_returns(family.tasks()[ids])
        assert section["oracle_return_mean"] == oracle.mean()
        assert section["references"]["oracle"]["episode_returns_mean"] == [round(oracle.mean(), 4)] * 12
        regret = section["cumulative_regret"]
        assert regret["oracle"] == 0 and regret["UCB"] == regret["source"]  # same learner, seed
        # Random play loses about (oracle - 0.5) per pull; UCB learns within 12 pulls a little.
        assert abs(regret["random"] - 12 * (oracle.mean() - 0.5)) < 0.6
        assert regret["UCB"] < regret["random"]
        assert len(section["methods"]["AD"]["episode_returns_mean"]) == 12
    assert (tmp_path / "incontext.png").stat().st_size > 10_000
