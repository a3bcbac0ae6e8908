"""Dark Key-to-Door and the Adversarial Bandit, worked by hand: dynamics, oracle returns, task
tables and splits, the bandit learners, Q-learning's reward stages, the held-out guarantee of the
generated datasets, and the Gymnasium wrappers of both families."""
from __future__ import annotations

import itertools
import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import icrl  # noqa: F401  (registers the Gymnasium ids)
from icrl.data.store import HistoryStore
from icrl.envs import AdversarialBandit, DarkKeyToDoor, family_from_config, make_family
from icrl.envs.bandit import draw_means
from icrl.experiments.presets import get_preset
from icrl.generate import GenerateConfig, generate
from icrl.sources import (UCB, QLearning, QLearningConfig, RandomPolicy, Thompson, UCBConfig,
                          collect)
from icrl.sources.bandit import RandomConfig, ThompsonConfig

UP, DOWN, LEFT, RIGHT, NOOP = range(5)
STEP = {UP: (0, 1), DOWN: (0, -1), LEFT: (-1, 0), RIGHT: (1, 0), NOOP: (0, 0)}


@pytest.fixture(scope="module")
def keydoor():
    return DarkKeyToDoor()


@pytest.fixture(scope="module")
def bandit():
    return AdversarialBandit()


def keydoor_env(task, start, family=None):
    """A batch-of-one Key-to-Door env on `task`, placed on `start` after its reset."""
    env = (family or DarkKeyToDoor()).make(np.array([task]), seed=0)
    env.reset()
    env.pos[:] = start
    return env


def run(env, actions):
    """Step a batch-of-one env through `actions`; return the list of (obs, reward, done)."""
    out = []
    for a in actions:
        obs, reward, done = env.step(np.array([a]))
        out.append((tuple(obs[0].tolist()), float(reward[0]), bool(done[0])))
    return out


# ==== Dark Key-to-Door: dynamics ==================================================================

def test_scripted_episode_key_then_door_returns_two():
    # key (2, 3), door (6, 1); start (4, 1).
    env = keydoor_env((2, 3, 6, 1), (4, 1))
    script = ([RIGHT, RIGHT]               # steps 1-2: onto the door without the key: nothing
              + [LEFT] * 4 + [UP] * 2      # steps 3-8: (6,1) -> (2,1) -> (2,3): the key on step 8
              + [NOOP]                     # step 9: staying on the key pays nothing
              + [DOWN] * 2 + [RIGHT] * 4   # steps 10-15: back to the door, now with the key
              + [NOOP, LEFT, RIGHT]        # steps 16-18: on / off / back on the door: nothing
              + [LEFT] * 4 + [UP] * 2)     # steps 19-24: back on the key: nothing
    script += [NOOP] * (50 - len(script))
    steps = run(env, script)
    positions = [p for p, _, _ in steps]
    rewards = [r for _, r, _ in steps]
    assert positions[1] == (6, 1) and positions[7] == (2, 3) and positions[14] == (6, 1)
    assert positions[17] == (6, 1) and positions[23] == (2, 3)
    paid = [t + 1 for t, r in enumerate(rewards) if r]
    assert paid == [8, 15]          # the key on step 8, the door on step 15, nothing else
    assert sum(rewards) == 2
    assert [d for _, _, d in steps] == [False] * 49 + [True]


def test_door_before_key_pays_nothing_and_stays_payable():
    env = keydoor_env((0, 0, 1, 0), (2, 0))
    rewards = [r for _, r, _ in run(env, [LEFT, NOOP, LEFT, RIGHT, NOOP, LEFT])]
    # on the door (no key), stay, key (1), door (1), stay on the door, back to the key
    assert rewards == [0, 0, 1, 1, 0, 0]


def test_key_on_door_cell_pays_key_then_door_one_step_later():
    env = keydoor_env((3, 3, 3, 3), (3, 2))
    rewards = [r for _, r, _ in run(env, [UP, NOOP, NOOP, DOWN, UP, NOOP])]
    assert rewards == [1, 1, 0, 0, 0, 0]   # at most one reward per step
    # Arriving on the key/door cell and leaving at once: the door is still owed a step that ends
    # on it.
    env = keydoor_env((3, 3, 3, 3), (3, 2))
    assert [r for _, r, _ in run(env, [UP, DOWN, NOOP, UP, UP])] == [1, 0, 0, 1, 0]


def test_start_on_the_key_pays_on_the_first_step_that_ends_there():
    env = keydoor_env((5, 5, 0, 0), (5, 5))
    assert [r for _, r, _ in run(env, [NOOP, NOOP])] == [1, 0]
    env = keydoor_env((5, 5, 0, 0), (5, 5))
    assert [r for _, r, _ in run(env, [UP, DOWN, DOWN, UP])] == [0, 1, 0, 0]


def test_stepping_on_the_key_again_pays_nothing():
    env = keydoor_env((4, 4, 8, 8), (4, 3))
    rewards = [r for _, r, _ in run(env, [UP, DOWN, UP, LEFT, RIGHT, NOOP, UP, DOWN])]
    assert rewards == [1, 0, 0, 0, 0, 0, 0, 0]


def test_moves_and_walls():
    env = keydoor_env((8, 8, 8, 8), (0, 0))
    steps = run(env, [DOWN, LEFT, UP, RIGHT, NOOP] + [RIGHT] * 10 + [UP] * 10)
    positions = [p for p, _, _ in steps]
    assert positions[:5] == [(0, 0), (0, 0), (0, 1), (1, 1), (1, 1)]
    assert positions[14] == (8, 1) and positions[-1] == (8, 8)


def test_a_batch_steps_like_separate_envs(keydoor):
    rng = np.random.default_rng(3)
    tasks = keydoor.tasks()[rng.choice(6561, 8, replace=False)]
    tasks[0] = (4, 4, 4, 4)
    starts = rng.integers(9, size=(8, 2))
    batched = keydoor.make(tasks, seed=1)
    batched.pos[:] = starts
    singles = [keydoor_env(t, s) for t, s in zip(tasks, starts)]
    for _ in range(50):
        actions = rng.integers(5, size=8)
        got = batched.step(actions)
        want = [np.concatenate(p) for p in zip(*[e.step(a[None]) for e, a in zip(singles, actions)])]
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    assert got[2].all()


# ==== Dark Key-to-Door: starts, reset(mask), episode length ======================================

def test_starts_are_seeded(keydoor):
    tasks = keydoor.tasks()[:200]
    a, b, c = (keydoor.make(tasks, seed=s).reset() for s in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any(axis=1).mean() > 0.8
    # make() starts the first episode; each reset draws a new start from the same stream.
    e1, e2 = keydoor.make(tasks, seed=7), keydoor.make(tasks, seed=7)
    first = e1.pos.copy()
    np.testing.assert_array_equal(first, e2.pos)
    second1, second2 = e1.reset(), e2.reset()
    np.testing.assert_array_equal(second1, second2)
    np.testing.assert_array_equal(second1, a)     # a: the reset after make() with seed 7
    assert (second1 != first).any(axis=1).mean() > 0.8
    third = e1.reset()
    assert (third != second1).any(axis=1).mean() > 0.8


def test_starts_cover_the_grid_uniformly(keydoor):
    env = keydoor.make(np.tile([[0, 0, 8, 8]], (8100, 1)), seed=0)
    counts = np.zeros((9, 9), dtype=int)
    for _ in range(2):
        np.add.at(counts, tuple(env.reset().T), 1)
    # 16,200 starts, 200 expected per cell (sd ~14): every cell visited, none far off.
    assert counts.sum() == 16200
    assert counts.min() >= 120 and counts.max() <= 290
    chi2 = ((counts - 200) ** 2 / 200).sum()
    assert chi2 < 160          # 80 degrees of freedom: mean 80, sd ~13


def test_reset_mask_resets_only_masked_rows():
    family = DarkKeyToDoor()
    tasks = np.array([[1, 1, 5, 5], [1, 1, 5, 5], [1, 1, 5, 5]])
    env = family.make(tasks, seed=0)
    env.reset()
    env.pos[:] = (1, 0)
    _, reward, _ = env.step(np.full(3, UP))            # every row takes its key
    assert reward.tolist() == [1, 1, 1]
    for _ in range(4):
        env.step(np.full(3, NOOP))                      # t = 5 everywhere
    before = env.pos.copy()
    obs = env.reset(np.array([True, False, False]))
    assert obs[1:].tolist() == before[1:].tolist()      # unmasked rows keep their cell...
    assert env.t.tolist() == [0, 5, 5]                  # ... and their clock
    assert env.has_key.tolist() == [False, True, True]  # and their key
    # Row 0 must take the key again; rows 1, 2 are paid at the door.
    env.pos[:] = (5, 4)
    _, reward, _ = env.step(np.full(3, UP))
    assert reward.tolist() == [0, 1, 1]
    env.pos[0] = (1, 0)
    _, reward, _ = env.step(np.array([UP, NOOP, NOOP]))
    assert reward.tolist() == [1, 0, 0]
    # The door progress is reset too: open row 1's door, reset it, it cannot be paid at once.
    env.reset(np.array([False, True, False]))
    env.pos[1] = (5, 4)
    assert env.step(np.array([NOOP, UP, NOOP]))[1].tolist() == [0, 0, 0]
    # Done exactly at each row's own 50th step: row 0 is at t = 3, row 1 at t = 1, row 2 at t = 8.
    assert env.t.tolist() == [3, 1, 8]
    dones = np.array([env.step(np.full(3, NOOP))[2] for _ in range(49)])
    first_done = dones.argmax(axis=0) + 1 + np.array([3, 1, 8])
    assert first_done.tolist() == [50, 50, 50]
    assert not dones[:41, 2].any() and dones[41, 2]


def test_done_exactly_at_step_50():
    env = keydoor_env((0, 0, 1, 1), (4, 4))
    assert [d for _, _, d in run(env, [NOOP] * 50)] == [False] * 49 + [True]
    env.reset()
    assert [d for _, _, d in run(env, [NOOP] * 50)] == [False] * 49 + [True]


# ==== Dark Key-to-Door: tasks and oracle ==========================================================

def test_6561_distinct_tasks(keydoor):
    tasks = keydoor.tasks()
    assert tasks.shape == (6561, 4) and tasks.dtype == np.int64
    assert len(np.unique(tasks, axis=0)) == 6561
    assert tasks.min() == 0 and tasks.max() == 8
    assert keydoor.tasks()[0].tolist() == [0, 0, 0, 0]


def test_check_task(keydoor):
    assert keydoor.check_task((2, 3, 4, 5)).tolist() == [2, 3, 4, 5]
    for bad in [(9, 0, 0, 0), (0, 0, 0, -1), (1, 2, 3), (1.5, 0, 0, 0), "abcd"]:
        with pytest.raises(ValueError):
            keydoor.check_task(bad)


def test_oracle_is_two_everywhere_at_50_steps(keydoor):
    assert (keydoor.oracle_returns(keydoor.tasks()) == 2).all()


def test_oracle_hand_computed_small_cases():
    # 3x3, 2 steps, key (0, 0), door (2, 2): the door (4 away from the key) is never reached; the
    # key is reached by a step from the 6 cells within distance 2 ((2,1), (1,2), (2,2) are not).
    assert DarkKeyToDoor(size=3, episode_len=2).oracle_returns(np.array([[0, 0, 2, 2]]))[0] \
        == pytest.approx(6 / 9)
    # 3x3, 2 steps, key = door = centre: from the centre and the 4 edge cells: key at step 1,
    # door at step 2 (return 2); from the 4 corners the key takes 2 steps (return 1): 14 / 9.
    assert DarkKeyToDoor(size=3, episode_len=2).oracle_returns(np.array([[1, 1, 1, 1]]))[0] \
        == pytest.approx(14 / 9)
    # 1 step: only the key can pay, from the key and its neighbours (centre: 5 of 9 cells).
    assert DarkKeyToDoor(size=3, episode_len=1).oracle_returns(np.array([[1, 1, 0, 0]]))[0] \
        == pytest.approx(5 / 9)


def brute_force_oracle(size, T, tasks):
    """Mean over start cells of the best return over every one of the 5^T action sequences,
    simulated here independently of the env: mean over starts of the max over plans."""
    moves = np.array([STEP[a] for a in range(5)])
    plans = np.array(list(itertools.product(range(5), repeat=T)))          # (P, T)
    starts = np.array([(x, y) for x in range(size) for y in range(size)])    # (S, 2)
    out = []
    for kx, ky, dx, dy in tasks:
        pos = np.repeat(starts, len(plans), axis=0)                          # (S*P, 2)
        seq = np.tile(plans, (len(starts), 1))
        has_key = np.zeros(len(pos), bool)
        opened = np.zeros(len(pos), bool)
        ret = np.zeros(len(pos))
        for t in range(T):
            pos = np.clip(pos + moves[seq[:, t]], 0, size - 1)
            on_key = (pos[:, 0] == kx) & (pos[:, 1] == ky)
            on_door = (pos[:, 0] == dx) & (pos[:, 1] == dy)
            door_pay = has_key & ~opened & on_door
            key_pay = ~has_key & on_key
            ret += door_pay | key_pay
            opened |= door_pay
            has_key |= key_pay
        out.append(ret.reshape(len(starts), len(plans)).max(axis=1).mean())
    return np.array(out)


@pytest.mark.parametrize("T", [1, 2, 3, 4])
def test_oracle_matches_brute_force_on_a_small_grid(T):
    family = DarkKeyToDoor(size=3, episode_len=T)
    tasks = family.tasks()
    assert len(tasks) == 81
    sample = tasks[:: (1 if T < 4 else 4)]     # every task; a quarter of them for 625 plans
    np.testing.assert_allclose(family.oracle_returns(sample), brute_force_oracle(3, T, sample))


def test_oracle_matches_an_actual_shortest_path_policy():
    """From every start, walk to the key then to the door with the env itself: return 2."""
    family = DarkKeyToDoor()
    tasks = family.tasks()[::7]
    env = family.make(tasks, seed=5)
    total, pos = np.zeros(len(tasks)), env.reset()
    for _ in range(50):
        target = np.where(env.has_key[:, None], tasks[:, 2:], tasks[:, :2])
        (x, y), (gx, gy) = pos.T, target.T
        actions = np.select([x < gx, x > gx, y < gy, y > gy], [RIGHT, LEFT, UP, DOWN], NOOP)
        pos, reward, done = env.step(actions)
        total += reward
    assert done.all() and (total == 2).all()


# ==== Adversarial Bandit: task distribution ======================================================

def parity_of_best(means):
    return means.argmax(axis=1) % 2


@pytest.mark.parametrize("favour_odd", [True, False])
def test_draw_means_favours_the_parity_with_favour_prob(favour_odd):
    rng = np.random.default_rng(11)
    means = draw_means(20000, 10, favour_odd, 0.95, rng)
    assert means.shape == (20000, 10)
    assert ((means >= 0) & (means <= 1)).all()
    favoured = parity_of_best(means) == (1 if favour_odd else 0)
    # sd of the fraction: sqrt(.95 * .05 / 20000) ~ 0.0015; the tolerance is ~6.5 sd.
    assert abs(favoured.mean() - 0.95) < 0.01
    # Within each parity the best arm is spread over its 5 arms (expected 3,800 / 200 each).
    best = means.argmax(axis=1)
    counts = np.bincount(best, minlength=10)
    fav_arms = np.arange(1 if favour_odd else 0, 10, 2)
    other_arms = np.arange(0 if favour_odd else 1, 10, 2)
    assert (np.abs(counts[fav_arms] - 3800) < 300).all()
    assert (np.abs(counts[other_arms] - 200) < 80).all()


@pytest.mark.parametrize("favour_odd", [True, False])
def test_draw_means_with_favour_prob_one_or_zero(favour_odd):
    rng = np.random.default_rng(0)
    want = 1 if favour_odd else 0
    assert (parity_of_best(draw_means(5000, 10, favour_odd, 1.0, rng)) == want).all()
    assert (parity_of_best(draw_means(5000, 10, favour_odd, 0.0, rng)) == 1 - want).all()


def test_draw_means_keeps_the_drawn_values():
    """Each row is a permutation of 10 U[0, 1] draws: the max is distributed as the max of 10
    uniforms (mean 10/11), and given the max the other nine are U[0, max] (so other / max is
    U[0, 1], and the pooled non-best mean is 5/11), whatever the arm."""
    means = draw_means(20000, 10, True, 0.95, np.random.default_rng(5))
    top = means.max(axis=1)
    assert abs(top.mean() - 10 / 11) < 0.005
    others = np.sort(means, axis=1)[:, :-1]
    assert abs(others.mean() - 5 / 11) < 0.005
    ratio = (others / top[:, None]).ravel()
    hist = np.histogram(ratio, bins=10, range=(0, 1))[0] / len(ratio)
    assert (np.abs(hist - 0.1) < 0.005).all()
    # Per arm, the non-best values look alike (mean 5/11 each, ~18,000 values per arm).
    masked = np.where(means == top[:, None], np.nan, means)
    assert (np.abs(np.nanmean(masked, axis=0) - 5 / 11) < 0.01).all()
    # Same seed, same draws.
    np.testing.assert_array_equal(means, draw_means(20000, 10, True, 0.95,
                                                    np.random.default_rng(5)))


def test_family_table_layout_and_parities():
    family = AdversarialBandit(n_tasks=300, n_ood_tasks=40, favour_prob=1.0, task_seed=3)
    table = family.tasks()
    assert table.shape == (340, 10) and table.dtype == np.float64
    assert (parity_of_best(table[:300]) == 1).all()     # odd-favoured rows first
    assert (parity_of_best(table[300:]) == 0).all()     # then the even-favoured ("ood") rows


def test_default_table(bandit):
    table = bandit.tasks()
    assert table.shape == (20500, 10)
    assert ((table >= 0) & (table <= 1)).all()
    # sd of the fractions: ~0.0015 (20,000 rows) and ~0.01 (500 rows).
    assert abs((parity_of_best(table[:20000]) == 1).mean() - 0.95) < 0.01
    assert abs((parity_of_best(table[20000:]) == 0).mean() - 0.95) < 0.05
    assert len(np.unique(table, axis=0)) == 20500


def test_table_is_fixed_by_task_seed(bandit):
    np.testing.assert_array_equal(AdversarialBandit(task_seed=0).tasks(), bandit.tasks())
    assert not np.array_equal(AdversarialBandit(task_seed=1).tasks(), bandit.tasks())
    again = family_from_config(bandit.config())
    np.testing.assert_array_equal(again.tasks(), bandit.tasks())
    small = make_family("bandit", n_tasks=50, n_ood_tasks=5, task_seed=9)
    np.testing.assert_array_equal(family_from_config(small.config()).tasks(), small.tasks())
    # tasks() is a copy: scribbling on it changes nothing.
    t = bandit.tasks()
    t[:] = -1
    assert (bandit.tasks() >= 0).all()


def test_bandit_split(bandit):
    split = bandit.split(500, seed=0)
    train, test, ood = split["train"], split["test"], split["ood"]
    assert len(test) == 500 and len(train) == 19500
    assert not set(train) & set(test)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(20000))
    assert np.array_equal(ood, np.arange(20000, 20500))
    assert np.array_equal(train, np.sort(train)) and np.array_equal(test, np.sort(test))
    capped = bandit.split(500, seed=0, n_train=200)
    assert len(capped["train"]) == 200 and set(capped["train"]) <= set(train)
    assert np.array_equal(capped["test"], test) and np.array_equal(capped["ood"], ood)
    assert not np.array_equal(bandit.split(500, seed=1)["test"], test)
    for bad in (0, 20000):
        with pytest.raises(ValueError):
            bandit.split(bad)


def test_bandit_bad_settings():
    for kwargs in [{"n_arms": 1}, {"n_tasks": 1}, {"n_ood_tasks": 0}, {"favour_prob": 1.5},
                   {"favour_prob": -0.1}]:
        with pytest.raises(ValueError):
            AdversarialBandit(**kwargs)


def test_bandit_oracle_is_the_best_mean(bandit):
    tasks = np.array([[0.1] * 9 + [0.9], [0.5, 0.7] + [0.0] * 8])
    np.testing.assert_allclose(bandit.oracle_returns(tasks), [0.9, 0.7])


# ==== Adversarial Bandit: environment ============================================================

def test_pulls_of_certain_arms(bandit):
    means = np.array([[1.0] * 5 + [0.0] * 5] * 50)
    env = bandit.make(means, seed=0)
    assert env.reset().tolist() == [[0]] * 50
    for arm in range(10):
        obs, reward, done = env.step(np.full(50, arm))
        assert reward.dtype == np.float32 and obs.dtype == np.int64
        assert (reward == (1.0 if arm < 5 else 0.0)).all()
        assert done.all() and obs.shape == (50, 1) and (obs == 0).all()


def test_reward_frequencies_match_means(bandit):
    means = np.tile(np.linspace(0.05, 0.95, 10), (2000, 1))
    env = bandit.make(means, seed=1)
    wins = np.zeros(10)
    for arm in range(10):
        wins[arm] = env.step(np.full(2000, arm))[1].mean()
    # 2,000 pulls per arm: sd <= 0.011; tolerance ~4.5 sd.
    np.testing.assert_allclose(wins, means[0], atol=0.05)
    # Per task, arms differ: row-wise means that differ get their own frequencies.
    rows = np.tile(np.array([[0.2] * 10, [0.8] * 10]), (1000, 1))
    env = bandit.make(rows, seed=2)
    r = np.array([env.step(np.zeros(2000, dtype=int))[1] for _ in range(5)])
    assert abs(r[:, ::2].mean() - 0.2) < 0.02 and abs(r[:, 1::2].mean() - 0.8) < 0.02


def test_bandit_env_is_seeded(bandit):
    means = np.full((100, 10), 0.5)
    a = [bandit.make(means, seed=4).step(np.zeros(100, dtype=int))[1] for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])
    b = bandit.make(means, seed=5).step(np.zeros(100, dtype=int))[1]
    assert not np.array_equal(a[0], b)


# ==== Bandit learners ============================================================================

def bandit_run(source, means, n_pulls=100, seed=0):
    family = AdversarialBandit(n_tasks=2, n_ood_tasks=1)
    return collect(family, means, source, n_pulls, seed=seed)


def easy_tasks(n=200):
    return np.tile([0.1] * 9 + [0.9], (n, 1))


def test_ucb_tries_every_arm_once_first():
    means = AdversarialBandit(n_tasks=200, n_ood_tasks=1).tasks()[:200]
    h = bandit_run(UCB((1,), 10, 200, UCBConfig(c=0.3), seed=0), means, n_pulls=20)
    first = np.sort(h.actions[:, :10], axis=1)
    assert (first == np.arange(10)).all()


def test_ucb_tries_untried_arms_in_random_order():
    h = bandit_run(UCB((1,), 10, 200, UCBConfig(), seed=0), easy_tasks(), n_pulls=10)
    assert len({tuple(row) for row in h.actions[:, :10].tolist()}) > 100


def test_ucb_concentrates_on_the_best_arm():
    h = bandit_run(UCB((1,), 10, 200, UCBConfig(c=0.3), seed=1), easy_tasks())
    late = h.actions[:, 50:100]
    assert (late == 9).mean() > 0.9
    assert np.median((late == 9).mean(axis=1)) >= 0.9
    # UCB1 (c = 1) still explores much in 100 pulls (each 0.1 arm needs ~10 pulls to drop out).
    h1 = bandit_run(UCB((1,), 10, 200, UCBConfig(c=1.0), seed=1), easy_tasks())
    assert 0.4 < (h1.actions[:, 50:100] == 9).mean() < (late == 9).mean()


def test_thompson_concentrates_on_the_best_arm():
    h = bandit_run(Thompson((1,), 10, 200, ThompsonConfig(), seed=2), easy_tasks())
    assert (h.actions[:, :10] == 9).mean() < 0.4
    assert (h.actions[:, 50:100] == 9).mean() > 0.85


def test_random_policy_is_uniform():
    h = bandit_run(RandomPolicy((1,), 10, 200, RandomConfig(), seed=3), easy_tasks())
    counts = np.bincount(h.actions.ravel(), minlength=10)    # 20,000 pulls, 2,000 per arm
    assert (np.abs(counts - 2000) < 250).all()
    # And it does not learn: late pulls are no more on the best arm.
    assert abs((h.actions[:, 50:] == 9).mean() - 0.1) < 0.03


def test_larger_c_explores_more():
    means = np.tile([0.4] * 9 + [0.6], (300, 1))
    best = {}
    for c in (0.1, 0.3, 2.0):
        h = bandit_run(UCB((1,), 10, 300, UCBConfig(c=c), seed=4), means)
        best[c] = (h.actions[:, 10:100] == 9).mean()
    assert best[2.0] < best[0.3] - 0.1
    assert best[2.0] < best[0.1] - 0.1


def test_ucb_index_worked_by_hand():
    """Two arms. Arm 0: 1 pull, 0 wins; arm 1: 4 pulls, 3 wins; t = 5, 2 ln 5 = 3.2189.
    c = 1:   arm 0: 0 + sqrt(3.2189 / 1) = 1.794;  arm 1: 0.75 + sqrt(3.2189 / 4) = 1.647 -> arm 0.
    c = 0.3: arm 0: 0.3 * 1.794 = 0.538;           arm 1: 0.75 + 0.3 * 0.897 = 1.019 -> arm 1.
    Greedy (best empirical mean): arm 1 whatever c."""
    bonus0, bonus1 = math.sqrt(2 * math.log(5) / 1), math.sqrt(2 * math.log(5) / 4)
    assert bonus0 == pytest.approx(1.794, abs=1e-3) and bonus1 == pytest.approx(0.897, abs=1e-3)
    for c, want in [(1.0, 0), (0.3, 1)]:
        source = UCB((1,), 2, 3, UCBConfig(c=c), seed=0)
        source.pulls[:] = [1, 4]
        source.wins[:] = [0, 3]
        obs = np.zeros((3, 1), dtype=np.int64)
        assert source.act(obs).tolist() == [want] * 3
        assert source.act(obs, greedy=True).tolist() == [1] * 3
    # The break-even c: 0 + c * b0 = 0.75 + c * b1  ->  c = 0.75 / (b0 - b1) = 0.836.
    c_star = 0.75 / (bonus0 - bonus1)
    for c, want in [(c_star - 0.01, 1), (c_star + 0.01, 0)]:
        source = UCB((1,), 2, 1, UCBConfig(c=c), seed=0)
        source.pulls[:] = [1, 4]
        source.wins[:] = [0, 3]
        assert source.act(np.zeros((1, 1), dtype=np.int64)).tolist() == [want]


def test_update_counts_pulls_and_wins():
    source = UCB((1,), 3, 2, UCBConfig(), seed=0)
    obs = np.zeros((2, 1), dtype=np.int64)
    done = np.ones(2, bool)
    for actions, rewards in [([0, 2], [1, 0]), ([0, 2], [0, 1]), ([1, 2], [1, 1])]:
        source.update(obs, np.array(actions), np.array(rewards, float), obs, done)
    assert source.pulls.tolist() == [[2, 1, 0], [0, 0, 3]]
    assert source.wins.tolist() == [[1, 1, 0], [0, 0, 2]]


@pytest.mark.parametrize("cls, config", [(UCB, UCBConfig()), (Thompson, ThompsonConfig()),
                                         (RandomPolicy, RandomConfig())])
def test_greedy_picks_the_best_empirical_mean(cls, config):
    source = cls((1,), 4, 2, config, seed=0)
    # Row 0: means 0.5, 0.75, untried, 0.2 -> arm 1. Row 1: 0, 0, 1/3, 0.25 -> arm 2.
    source.pulls[:] = [[2, 4, 0, 5], [1, 3, 3, 4]]
    source.wins[:] = [[1, 3, 0, 1], [0, 0, 1, 1]]
    obs = np.zeros((2, 1), dtype=np.int64)
    if cls is RandomPolicy:   # the reference policy ignores `greedy`
        return
    assert source.act(obs, greedy=True).tolist() == [1, 2]


# ==== Q-learning reward stages ===================================================================

def test_reward_stages_track_by_hand():
    source = QLearning((9, 9), 5, 3, QLearningConfig(reward_stages=3), seed=0)
    assert source.stage.tolist() == [0, 0, 0]
    no = np.zeros(3, bool)
    source.track(np.array([1.0, 0.0, 1.0]), no)
    assert source.stage.tolist() == [1, 0, 1]
    source.track(np.array([1.0, 1.0, 0.0]), no)
    assert source.stage.tolist() == [2, 1, 1]
    source.track(np.array([1.0, 0.0, 1.0]), no)
    assert source.stage.tolist() == [2, 1, 2]          # capped at reward_stages - 1
    source.track(np.array([0.0, 1.0, 1.0]), np.array([True, False, True]))
    assert source.stage.tolist() == [0, 2, 0]          # episode end resets (a reward too)


def test_reward_stages_follow_a_collect_run():
    family = DarkKeyToDoor()
    tasks = family.tasks()[::41]

    class Recording(QLearning):
        def track(self, rewards, done):
            super().track(rewards, done)
            self.log.append((rewards.copy(), done.copy(), self.stage.copy()))

    source = Recording(family.obs_spec.high, 5, len(tasks),
                       QLearningConfig(init_value=0.5, reward_stages=3, planning_sweeps=5), seed=0)
    source.log = []
    h = collect(family, tasks, source, 6)
    assert len(source.log) == 6 * 50
    assert h.episode_returns.max() == 2      # some tasks got both rewards
    running = np.zeros(len(tasks))
    for t, (rewards, done, stage) in enumerate(source.log):
        running += rewards
        if (t + 1) % 50 == 0:
            assert done.all() and (stage == 0).all()
            running[:] = 0
        else:
            assert not done.any()
            np.testing.assert_array_equal(stage, np.minimum(running, 2))
    assert source.q.shape == (len(tasks), 81 * 3, 5)


def test_reward_stages_state_index():
    obs = np.array([[0, 0], [1, 0], [8, 8], [3, 5]])
    cells = np.ravel_multi_index(tuple(obs.T), (9, 9))
    assert cells.tolist() == [0, 9, 80, 32]
    plain = QLearning((9, 9), 5, 4, QLearningConfig(), seed=0)
    assert plain.q.shape == (4, 81, 5)
    assert plain._state(obs, plain.stage).tolist() == cells.tolist()
    staged = QLearning((9, 9), 5, 4, QLearningConfig(reward_stages=3), seed=0)
    assert staged.q.shape == (4, 243, 5)
    assert staged._state(obs, np.array([0, 1, 2, 1])).tolist() == [0, 28, 242, 97]
    with pytest.raises(ValueError):
        QLearning((9, 9), 5, 1, QLearningConfig(reward_stages=0))


def test_reward_stages_update_targets_the_next_stage():
    """A paid transition (0, 0) -right-> (1, 0) leads to the state of (1, 0) at stage 1."""
    source = QLearning((9, 9), 5, 1, QLearningConfig(reward_stages=3, planning_sweeps=1), seed=0)
    obs, nxt = np.array([[0, 0]]), np.array([[1, 0]])
    source.update(obs, np.array([RIGHT]), np.array([1.0]), nxt, np.array([False]))
    assert source.next_state[0, 0, RIGHT] == 9 * 3 + 1
    source.track(np.array([1.0]), np.array([False]))
    source.update(nxt, np.array([UP]), np.array([0.0]), np.array([[1, 1]]), np.array([False]))
    assert source.tried[0, 28, UP] and source.next_state[0, 28, UP] == 10 * 3 + 1


# ==== The held-out guarantee of generated datasets ===============================================

HELD_OUT_CASES = {
    "darkroom": dict(n_test=16, n_train=10),
    "darkroom-hard": dict(n_test=50, n_train=10),
    "keydoor": dict(n_test=1000, n_train=50),
    "bandit": dict(n_test=500, n_train=200, source="ucb", source_config={"c": 0.3}),
}


def rows_in(rows, table):
    """For each row of `rows`, whether it equals some row of `table`."""
    table = {tuple(r) for r in np.asarray(table, dtype=np.float64).tolist()}
    return np.array([tuple(r) in table for r in np.asarray(rows, np.float64).tolist()])


@pytest.mark.parametrize("name", list(HELD_OUT_CASES))
def test_generated_data_holds_no_held_out_task(name, tmp_path):
    family = make_family(name)
    cfg = GenerateConfig(n_episodes=2, seeds_per_task=1, chunk_size=32, split_seed=3,
                         **HELD_OUT_CASES[name])
    path = generate(family, tmp_path / f"{name}.h5", cfg, progress=False)
    table = family.tasks()
    with HistoryStore(path) as store:
        meta, ids, stored = store.meta, store.column("task_ids"), store.column("tasks")
    split = family.split(cfg.n_test, cfg.split_seed, cfg.n_train)
    held = {"test"} | ({"ood"} if name == "bandit" else set())
    assert set(meta["split"]) == {"seed"} | set(split)
    for key, ids_ in split.items():
        assert meta["split"][key] == ids_.tolist()
    assert len(meta["split"]["test"]) == cfg.n_test
    assert sorted(ids.tolist()) == meta["split"]["train"] and len(ids) == cfg.n_train
    held_ids = np.concatenate([np.array(meta["split"][k]) for k in held])
    assert not np.isin(ids, held_ids).any()
    # Every stored parameter row is the table row of its id...
    np.testing.assert_array_equal(stored, table[ids].astype(np.float64))
    # ... and equals no held-out task's parameters (rows, not just indices).
    assert not rows_in(stored, table[held_ids]).any()
    if name == "bandit":
        assert (ids < family.n_tasks).all()
        assert meta["split"]["ood"] == list(range(20000, 20500))


def test_keydoor_histories_replay_under_their_stored_task(tmp_path):
    """Rows of obs/actions/rewards line up with the stored task (across chunks): replaying each
    recorded episode under the stored (key, door) gives the recorded rewards."""
    family = DarkKeyToDoor()
    cfg = GenerateConfig(n_episodes=2, seeds_per_task=1, chunk_size=7, n_test=1000, n_train=20,
                         source_config={"reward_stages": 3})
    path = generate(family, tmp_path / "kd.h5", cfg, progress=False)
    with HistoryStore(path) as store:
        data, tasks = store.read(slice(None)), store.column("tasks").astype(int)
    assert data["obs"].shape == (20, 100, 2)
    for obs, actions, rewards, (kx, ky, dx, dy) in zip(data["obs"], data["actions"],
                                                       data["rewards"], tasks):
        for ep in range(2):
            has_key = opened = False
            for t in range(ep * 50, ep * 50 + 50):
                mx, my = STEP[int(actions[t])]
                x = min(max(int(obs[t, 0]) + mx, 0), 8)
                y = min(max(int(obs[t, 1]) + my, 0), 8)
                if t + 1 < ep * 50 + 50:
                    assert (x, y) == tuple(obs[t + 1])
                paid = 0.0
                if has_key and not opened and (x, y) == (dx, dy):
                    opened, paid = True, 1.0
                if not has_key and (x, y) == (kx, ky):
                    has_key, paid = True, 1.0
                assert rewards[t] == paid


def test_keydoor_preset_split_holds_out_enough(keydoor):
    preset = get_preset("keydoor")
    split = preset.histories.split(keydoor)
    assert len(split["test"]) >= 1000 and len(split["train"]) <= 2000
    assert not set(split["train"]) & set(split["test"])
    table = keydoor.tasks()
    assert not rows_in(table[split["train"]], table[split["test"]]).any()
    expert = preset.expert.split(keydoor)
    assert np.array_equal(expert["test"], split["test"])     # same held-out set for ED
    assert not set(expert["train"]) & set(split["test"])


def test_bandit_preset_keeps_ood_and_test_out(bandit):
    preset = get_preset("bandit")
    for cfg in (preset.histories, preset.expert):
        split = cfg.split(bandit)
        assert cfg.tasks == "train"
        assert not set(split["train"]) & (set(split["test"]) | set(split["ood"]))


# ==== Gymnasium ==================================================================================

def test_check_env_with_given_tasks():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(gym.make("icrl/DarkKeyToDoor-v0", task=(1, 2, 3, 4)).unwrapped)
        check_env(gym.make("icrl/AdversarialBandit-v0", means=[0.5] * 10, pulls=7).unwrapped)


def test_gym_keydoor_honours_its_task():
    env = gym.make("icrl/DarkKeyToDoor-v0", task=(0, 8, 8, 0))
    assert env.observation_space == gym.spaces.MultiDiscrete([9, 9], dtype=np.int64)
    assert env.action_space == gym.spaces.Discrete(5)
    for seed in (0, 1, None):
        obs, info = env.reset(seed=seed)
        assert info["task"].tolist() == [0, 8, 8, 0]
        total, target = 0.0, (0, 8)
        for t in range(1, 51):
            x, y = obs.tolist()
            if (x, y) == (0, 8) and target == (0, 8) and total == 1:
                target = (8, 0)
            gx, gy = target
            a = RIGHT if x < gx else LEFT if x > gx else UP if y < gy else DOWN if y > gy else NOOP
            obs, reward, terminated, truncated, _ = env.step(a)
            total += reward
            assert not terminated and truncated == (t == 50)
        assert total == 2


def test_gym_keydoor_task_at_reset_and_bad_tasks():
    env = gym.make("icrl/DarkKeyToDoor-v0")
    assert env.reset(options={"task": (4, 4, 0, 1)})[1]["task"].tolist() == [4, 4, 0, 1]
    assert env.reset(seed=3)[1]["task"].tolist() == [4, 4, 0, 1]
    for bad in [(9, 0, 0, 0), (0, 0, 0, -1), (1, 2, 3), (0.5, 0, 0, 0), "abcd"]:
        with pytest.raises(ValueError):
            gym.make("icrl/DarkKeyToDoor-v0", task=bad)
        with pytest.raises(ValueError):
            env.reset(options={"task": bad})
    with pytest.raises(ValueError, match="pulls"):
        gym.make("icrl/DarkKeyToDoor-v0", pulls=10)


@pytest.mark.parametrize("pulls", [None, 1, 5])
def test_gym_bandit_trial_truncates_after_pulls(pulls):
    kwargs = {} if pulls is None else {"pulls": pulls}
    env = gym.make("icrl/AdversarialBandit-v0", means=[0.5] * 10, **kwargs)
    n = 100 if pulls is None else pulls
    assert env.action_space == gym.spaces.Discrete(10)
    obs, _ = env.reset(seed=0)
    assert obs.tolist() == [0]
    for t in range(1, n + 1):
        obs, reward, terminated, truncated, _ = env.step(t % 10)
        assert obs.tolist() == [0] and reward in (0.0, 1.0)
        assert not terminated and truncated == (t == n)


def test_gym_bandit_honours_its_means():
    means = [0.0] * 3 + [1.0] + [0.0] * 6
    env = gym.make("icrl/AdversarialBandit-v0", means=means, pulls=40)
    for seed in (0, None):
        _, info = env.reset(seed=seed)
        np.testing.assert_array_equal(info["task"], means)
        rewards = [env.step(t % 10)[1] for t in range(40)]
        assert rewards == [1.0 if t % 10 == 3 else 0.0 for t in range(40)]
    # A task not in the family's table is fine for the bandit (any means in [0, 1]).
    env = gym.make("icrl/AdversarialBandit-v0", task=[0.3] * 10)
    assert env.reset()[1]["task"].tolist() == [0.3] * 10
    # Frequencies over a long trial.
    env = gym.make("icrl/AdversarialBandit-v0", means=[0.25] * 10, pulls=4000)
    env.reset(seed=1)
    assert abs(np.mean([env.step(0)[1] for _ in range(4000)]) - 0.25) < 0.03


def test_gym_bandit_bad_tasks_raise():
    for bad in [[0.5] * 9, [0.5] * 11, [1.5] + [0.5] * 9, [-0.1] + [0.5] * 9,
                [float("nan")] * 10, "abcdefghij", [[0.5] * 10]]:
        with pytest.raises(ValueError):
            gym.make("icrl/AdversarialBandit-v0", means=bad)
        env = gym.make("icrl/AdversarialBandit-v0")
        with pytest.raises(ValueError):
            env.reset(options={"task": bad})
    with pytest.raises(ValueError):
        gym.make("icrl/AdversarialBandit-v0", means=[0.5] * 10, pulls=0)
    with pytest.raises(ValueError, match="not both"):
        gym.make("icrl/AdversarialBandit-v0", means=[0.5] * 10, task=[0.5] * 10)


def test_gym_bandit_without_means_draws_from_the_table(bandit):
    env = gym.make("icrl/AdversarialBandit-v0")
    tasks = [env.reset(seed=s)[1]["task"] for s in range(5)]
    assert rows_in(np.array(tasks), bandit.tasks()).all()
    assert len({tuple(t) for t in tasks}) > 1
