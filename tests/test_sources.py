"""Source algorithms: they learn, they don't learn without reward, and tasks in a batch stay
independent; `collect` records what it says it records."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from icrl.envs import make_family
from icrl.errors import UserError
from icrl.sources import (SOURCES, ActorCritic, ActorCriticConfig, QLearning, QLearningConfig,
                          applies, collect, make_source)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def darkroom():
    return make_family("darkroom")


def normalised_curve(family, tasks, histories) -> np.ndarray:
    """Mean over tasks of each episode's return divided by the optimal return."""
    return (histories.episode_returns / family.oracle_returns(tasks)[:, None]).mean(axis=0)


def unreachable(family_name="darkroom"):
    """A Dark Room too short to reach any corner: every reward is 0, whatever the learner does."""
    family = make_family(family_name, episode_len=3)
    tasks = np.array([[0, 0], [0, 8], [8, 0], [8, 8]] * 4)
    assert (family.oracle_returns(tasks) == 0).all()
    return family, tasks


# --- learning ------------------------------------------------------------------------------------

def test_qlearning_goes_from_random_to_optimal(darkroom):
    tasks = darkroom.tasks()
    config = QLearningConfig(lr=1.0, gamma=0.9, init_value=5.0, eps_start=0.0)
    source = QLearning(darkroom.obs_spec.high, darkroom.n_actions, len(tasks), config, seed=0)
    curve = normalised_curve(darkroom, tasks, collect(darkroom, tasks, source, 100))
    assert curve[:5].mean() <= 0.2
    assert curve[-10:].mean() >= 0.9


def test_actor_critic_goes_from_random_to_near_optimal(darkroom):
    tasks = darkroom.tasks()
    source = ActorCritic(darkroom.obs_spec.high, darkroom.n_actions, len(tasks), seed=0)
    curve = normalised_curve(darkroom, tasks, collect(darkroom, tasks, source, 150))
    assert curve[:5].mean() <= 0.1            # a uniform policy scores about 0.02
    assert curve[-10:].mean() >= 0.8          # about 0.95 with the default config
    assert curve[-10:].mean() > curve[50:60].mean()


def test_greedy_from_stops_learning(darkroom):
    tasks = darkroom.tasks()[::4]
    source = QLearning(darkroom.obs_spec.high, darkroom.n_actions, len(tasks), seed=0)
    collect(darkroom, tasks, source, 8)
    q = source.q.copy()
    collect(darkroom, tasks, source, 3, greedy_from=0)
    np.testing.assert_array_equal(source.q, q)


# --- absence of learning -------------------------------------------------------------------------

def test_qlearning_without_reward_keeps_flat_values_and_uniform_actions():
    family, tasks = unreachable()
    config = QLearningConfig(init_value=0.0, eps_start=0.0)   # greedy: ties decide every action
    source = QLearning(family.obs_spec.high, family.n_actions, len(tasks), config, seed=0)
    h = collect(family, tasks, source, 200)
    assert (h.rewards == 0).all()
    assert (source.q == 0).all()
    freq = np.bincount(h.actions.ravel(), minlength=family.n_actions) / h.actions.size
    np.testing.assert_allclose(freq, 1 / family.n_actions, atol=0.02)   # 9600 draws: sd ~0.004


def test_qlearning_leaves_unvisited_states_untouched(darkroom):
    tasks = darkroom.tasks()
    source = QLearning(darkroom.obs_spec.high, darkroom.n_actions, len(tasks), seed=0)
    h = collect(darkroom, tasks, source, 5)
    visited = np.zeros(source.q.shape[:2], dtype=bool)
    for i in range(len(tasks)):
        visited[i, source._state(h.obs[i], 0)] = True   # every update starts from a recorded obs
    assert (~visited).any()
    assert (source.q[~visited] == source.config.init_value).all()
    assert (source.q[visited] != source.config.init_value).any(axis=-1).all()


def test_qlearning_optimism_decay_shrinks_only_untried_actions(darkroom):
    tasks = darkroom.tasks()[:8]
    make = lambda decay: QLearning(darkroom.obs_spec.high, darkroom.n_actions, len(tasks),
                                   QLearningConfig(lr=1.0, gamma=0.9, init_value=2.0,
                                                   eps_start=0.0, planning_sweeps=3,
                                                   optimism_decay=decay), seed=0)
    source = make(0.5)
    collect(darkroom, tasks, source, 3)
    assert source.tried.any() and (~source.tried).any()
    np.testing.assert_array_equal(source.q[~source.tried], 2.0 * 0.5 ** 3)
    assert source.hyperparameters()["optimism_decay"] == 0.5
    # The tried values back up the shrunken optimism: lower than without the decay.
    plain = make(1.0)
    collect(darkroom, tasks, plain, 3)
    assert (plain.q[~plain.tried] == 2.0).all()
    assert source.q[source.tried].mean() < plain.q[plain.tried].mean()
    with pytest.raises(ValueError, match="needs planning_sweeps"):
        QLearning(darkroom.obs_spec.high, darkroom.n_actions, 2,
                  QLearningConfig(optimism_decay=0.9))
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        QLearning(darkroom.obs_spec.high, darkroom.n_actions, 2,
                  QLearningConfig(planning_sweeps=1, optimism_decay=0))


def test_actor_critic_without_reward_stays_near_uniform():
    family, tasks = unreachable()
    source = ActorCritic(family.obs_spec.high, family.n_actions, len(tasks), seed=0)
    h = collect(family, tasks, source, 200)
    assert (h.rewards == 0).all()
    with torch.no_grad():
        x = source._one_hot(family.tasks()[None].repeat(len(tasks), axis=0))
        probs = torch.softmax(source._forward(x)[0], dim=-1)
    # No reward means no advantage to follow; the entropy bonus keeps the policy uniform.
    assert (probs - 1 / family.n_actions).abs().max() < 0.05


# --- independence of the tasks in a batch --------------------------------------------------------

@pytest.mark.parametrize("name", ["actor-critic", "qlearning"])
def test_a_task_learns_the_same_whatever_its_batch_mate(darkroom, name):
    """Task 0 shares the batch with a task the learner solves at once, or with one it never does.
    The RNG draws for row 0 are the same either way, so anything leaking between tasks (a shared
    statistic, a mean over the batch) would change task 0's history."""
    tasks = darkroom.tasks()
    goal, easy_mate, hard_mate = tasks[31], tasks[41], tasks[0]
    runs = []
    for mate in (easy_mate, hard_mate):
        source = make_source(name, darkroom, 2, seed=7)
        runs.append((source, collect(darkroom, np.stack([goal, mate]), source, 40)))
    (s1, h1), (s2, h2) = runs
    assert not np.array_equal(h1.episode_returns[1], h2.episode_returns[1])
    np.testing.assert_array_equal(h1.actions[0], h2.actions[0])
    np.testing.assert_array_equal(h1.episode_returns[0], h2.episode_returns[0])
    if name == "qlearning":
        np.testing.assert_array_equal(s1.q[0], s2.q[0])
    else:
        for p1, p2 in zip(s1.params, s2.params):
            torch.testing.assert_close(p1[0], p2[0], rtol=0, atol=0)


def test_actor_critic_task_gets_the_same_update_in_a_batch_as_alone(darkroom):
    """The loss sums per-task losses: a task's gradient must not shrink as the batch grows."""
    alone = ActorCritic(darkroom.obs_spec.high, darkroom.n_actions, 1, seed=0)
    batch = ActorCritic(darkroom.obs_spec.high, darkroom.n_actions, 5, seed=1)
    with torch.no_grad():
        for p_alone, p_batch in zip(alone.params, batch.params):
            p_alone.copy_(p_batch[:1])
    rng = np.random.default_rng(0)
    for t in range(4):
        obs, next_obs = rng.integers(9, size=(2, 5, 2))
        actions, rewards = rng.integers(5, size=5), rng.random(5).astype(np.float32)
        done = np.full(5, t == 3)
        batch.update(obs, actions, rewards, next_obs, done)
        alone.update(obs[:1], actions[:1], rewards[:1], next_obs[:1], done[:1])
    for p_alone, p_batch in zip(alone.params, batch.params):
        torch.testing.assert_close(p_alone.grad, p_batch.grad[:1])
        torch.testing.assert_close(p_alone, p_batch[:1])
    assert not torch.equal(alone.w1, batch.w1[1:2])   # the others got their own, different, update


# --- collect -------------------------------------------------------------------------------------

@pytest.mark.parametrize("every,record_from", [(1, 0), (3, 0), (4, 2)])
def test_collect_subsampling_keeps_every_kth_episode(darkroom, every, record_from):
    tasks = darkroom.tasks()[::7]
    source = QLearning(darkroom.obs_spec.high, darkroom.n_actions, len(tasks), seed=0)
    h = collect(darkroom, tasks, source, 13, every=every, record_from=record_from)
    kept = list(range(record_from, 13, every))
    T = darkroom.episode_len
    assert h.obs.shape == (len(tasks), len(kept) * T, 2)
    assert h.actions.shape == h.rewards.shape == (len(tasks), len(kept) * T)
    assert h.episode_returns.shape == (len(tasks), 13)
    recorded = h.rewards.reshape(len(tasks), len(kept), T).sum(axis=2)
    np.testing.assert_array_equal(recorded, h.episode_returns[:, kept])
    # Every recorded episode starts at the centre.
    np.testing.assert_array_equal(h.obs.reshape(len(tasks), len(kept), T, 2)[:, :, 0], 4)


# --- registry ------------------------------------------------------------------------------------

def test_make_source_builds_each_registered_source(darkroom):
    others = [make_family("bandit"), make_family("darkroom-pixels")]
    for name, (cls, config_cls) in SOURCES.items():
        # UCB, Thompson: bandit only; DQN: image observations only
        family = next(f for f in [darkroom, *others] if applies(cls, f))
        source = make_source(name, family, 3, None, seed=0)
        assert isinstance(source, cls) and source.name == name
        # every setting but where the source runs (a store's metadata does not depend on it)
        # and a later setting at its default (stores made before it still match)
        assert source.hyperparameters() == {k: v for k, v in vars(config_cls()).items()
                                            if k not in ("device", "optimism_decay")}
    source = make_source("actor-critic", darkroom, 3, {"lr": 0.01, "hidden": 16})
    assert source.hyperparameters()["lr"] == 0.01 and source.w1.shape == (3, 18, 16)
    assert isinstance(source.config, ActorCriticConfig)


@pytest.mark.parametrize("name,config,match", [
    ("sarsa", None, "unknown source algorithm 'sarsa'"),
    ("qlearning", {"lr": 0.5, "learning_rate": 0.1}, "learning_rate"),
    ("qlearning", {"optimism_decay": 0.9}, "qlearning: optimism_decay < 1 needs planning_sweeps"),
])
def test_make_source_rejects_unknown_names_and_keys(darkroom, name, config, match):
    with pytest.raises(UserError, match=match) as err:
        make_source(name, darkroom, 2, config, seed=0)
    assert "\n" not in str(err.value)
