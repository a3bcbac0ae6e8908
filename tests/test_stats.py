import numpy as np
import pytest

from icrl.stats import iqm, iqm_with_ci


def test_iqm_is_the_mean_of_the_middle_half():
    assert iqm(np.arange(8.0)) == pytest.approx(np.mean([2, 3, 4, 5]))
    # a quarter of 10 rounds down to 2 cut from each end, as scipy.stats.trim_mean(x, 0.25)
    x = np.array([100.0, -50, 1, 2, 3, 4, 5, 6, 7, 8])
    assert iqm(x) == pytest.approx(np.mean([2, 3, 4, 5, 6, 7]))
    # pooled over games of different sizes
    assert iqm([np.array([0.0, 1, 2, 3]), np.array([4.0, 5, 6, 7])]) == iqm(np.arange(8.0))


def test_the_bootstrap_interval_holds_the_iqm_and_shrinks_with_more_scores():
    rng = np.random.default_rng(1)
    few = [rng.normal(g, 1.0, size=8) for g in range(5)]
    many = [rng.normal(g, 1.0, size=800) for g in range(5)]
    a, b = iqm_with_ci(few), iqm_with_ci(many)
    for s in (a, b):
        assert s["ci"][0] <= s["mean"] <= s["ci"][1]
    assert b["ci"][1] - b["ci"][0] < (a["ci"][1] - a["ci"][0]) / 4
    # the population IQM of the pooled normals is 2 (symmetric about the middle game)
    assert b["ci"][0] < 2.0 < b["ci"][1]


def test_identical_scores_have_a_zero_width_interval_and_seeds_repeat():
    s = iqm_with_ci([np.full(4, 0.5), np.full(7, 0.5)])
    assert s == {"mean": 0.5, "ci": [0.5, 0.5]}
    x = [np.arange(5.0), np.arange(3.0) * 2]
    assert iqm_with_ci(x, seed=3) == iqm_with_ci(x, seed=3)


def test_a_game_without_scores_is_an_error():
    with pytest.raises(ValueError, match="at least one score"):
        iqm_with_ci([np.arange(3.0), np.array([])])


def test_games_of_unequal_counts_weigh_the_same():
    """A game with 1,000 scores counts as much as one with 4: the IQM equals the IQM of equal
    counts drawn from the same values."""
    few, many = np.array([0.0, 1, 2, 3]), np.repeat(np.array([10.0, 11, 12, 13]), 250)
    weighted = iqm_with_ci([few, many])
    assert weighted["mean"] == pytest.approx(iqm([few, np.array([10.0, 11, 12, 13])]))
    assert weighted["ci"][0] <= weighted["mean"] <= weighted["ci"][1]
    # pooled without weights the larger game would dominate
    assert iqm(np.concatenate([few, many])) > 10
