"""The report's summaries: means over every leading axis, and the spread between training seeds."""
import numpy as np

from icrl.report import report_lines, summarize


def test_summary_gives_each_seeds_last_return_and_their_spread():
    returns = np.zeros((3, 2, 4, 5))            # seeds, rollouts, tasks, episodes
    returns[..., -1] = np.array([1.0, 2.0, 6.0])[:, None, None]
    returns[1, 0, 0, -1] = 10.0                 # one run of seed 1 moves its mean by 8 / 8 = 1
    s = summarize(returns, n_tasks=4, n_seeds=3)
    assert s["last_return_per_seed"] == [1.0, 3.0, 6.0]
    assert s["last_return_seed_std"] == round(float(np.std([1.0, 3.0, 6.0])), 4)
    assert s["last_return_mean"] == round(10 / 3, 4) and s["n_rollouts"] == 24


def test_one_seed_has_no_seed_spread_and_the_table_says_so():
    s = summarize(np.ones((2, 4, 5)), n_tasks=4, n_seeds=1)
    assert "last_return_seed_std" not in s
    three = summarize(np.ones((3, 1, 4, 5)), n_tasks=4, n_seeds=3)
    report = {"oracle_return_mean": 1.0, "methods": {"AD": three, "source": s},
              "cumulative_regret": {"AD": 0.0, "source": 0.0}, "wall_seconds": 1.0}
    lines = report_lines(report)
    assert any("AD" in line and "over 3 seeds" in line for line in lines)
    assert not any("source" in line and "seeds" in line for line in lines)


def test_regret_spread_between_seeds():
    from icrl.envs import make_family
    from icrl.experiments.incontext import _section
    from icrl.experiments.presets import get_preset

    family = make_family("darkroom")
    tasks = family.tasks()[[0, 40]]                       # a corner goal and the centre
    oracle = family.oracle_returns(tasks)
    preset = get_preset("darkroom")
    preset.train_seeds = 2
    seed0 = np.broadcast_to(oracle[:, None], (1, 2, 3)).copy()   # optimal: no regret
    seed1 = seed0 - 1.0                                   # 1 short in each of 3 episodes
    section = _section(family, tasks, {"AD": [seed0, seed1]}, {"source": seed0}, preset)
    assert section["cumulative_regret"]["AD"] == 1.5      # mean over seeds of 0 and 3
    assert section["cumulative_regret_seed_std"] == {"AD": 1.5}
