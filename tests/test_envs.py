import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import icrl  # noqa: F401  (registers the Gymnasium ids)
from icrl.envs import DarkRoom, make_family
from icrl.envs.gym import GYM_IDS, register_envs

UP, DOWN, LEFT, RIGHT, NOOP = range(5)
FAMILIES = ["darkroom", "darkroom-hard"]


def one_env(goal, family=None):
    return (family or DarkRoom()).make(np.array([goal]))


def run(env, actions):
    """Step a batch-of-one env through `actions`; return the list of (obs, reward, done)."""
    return [tuple(x[0] for x in env.step(np.array([a]))) for a in actions]


# ---- Dark Room dynamics, worked by hand ----

def test_starts_at_centre():
    assert one_env((0, 0)).reset().tolist() == [[4, 4]]
    assert DarkRoom(size=17, sparse=True).make(np.array([[0, 0]])).reset().tolist() == [[8, 8]]


@pytest.mark.parametrize("action, pos", [(UP, (4, 5)), (DOWN, (4, 3)), (LEFT, (3, 4)),
                                         (RIGHT, (5, 4)), (NOOP, (4, 4))])
def test_each_action_moves_one_cell(action, pos):
    (obs, _, _), = run(one_env((0, 0)), [action])
    assert tuple(obs) == pos


def test_walls_clip():
    env = one_env((0, 0))
    assert tuple(run(env, [RIGHT] * 6)[-1][0]) == (8, 4)
    assert tuple(run(env, [UP] * 6)[-1][0]) == (8, 8)
    assert tuple(run(env, [LEFT] * 9)[-1][0]) == (0, 8)
    env.reset()
    assert tuple(run(env, [DOWN] * 7)[-1][0]) == (4, 0)


def test_dark_room_pays_every_step_on_goal():
    rewards = [r for _, r, _ in run(one_env((4, 5)), [UP, NOOP, NOOP, DOWN, UP, RIGHT])]
    assert rewards == [1, 1, 1, 0, 1, 0]
    assert sum(r for _, r, _ in run(one_env((4, 4)), [NOOP] * 20)) == 20


def test_dark_room_hard_pays_once_per_episode():
    env = DarkRoom(size=17, sparse=True).make(np.array([[8, 9]]))
    assert [r for _, r, _ in run(env, [UP, NOOP, DOWN, UP, NOOP])] == [1, 0, 0, 0, 0]
    env.reset()
    assert [r for _, r, _ in run(env, [NOOP, UP, NOOP])] == [0, 1, 0]


def test_done_exactly_at_step_20():
    dones = [d for _, _, d in run(one_env((0, 0)), [NOOP] * 20)]
    assert dones == [False] * 19 + [True]


def test_reset_mask_resets_only_masked_rows():
    env = DarkRoom().make(np.array([[0, 0], [8, 8], [1, 1]]))
    for _ in range(5):
        env.step(np.array([RIGHT, UP, LEFT]))
    obs = env.reset(np.array([True, False, True]))
    assert obs.tolist() == [[4, 4], [4, 8], [4, 4]]
    for _ in range(14):
        _, _, done = env.step(np.full(3, NOOP))
        assert not done.any()
    assert env.step(np.full(3, NOOP))[2].tolist() == [False, True, False]  # row 1: its step 20
    dones = [env.step(np.full(3, NOOP))[2][[0, 2]].tolist() for _ in range(5)]
    assert dones == [[False, False]] * 4 + [[True, True]]  # rows 0 and 2: steps 16 to 20


@pytest.mark.parametrize("name", FAMILIES)
def test_batch_steps_like_separate_envs(name):
    family = make_family(name)
    rng = np.random.default_rng(0)
    goals = family.tasks()[rng.choice(len(family.tasks()), 6, replace=False)]
    batched, singles = family.make(goals), [family.make(g[None]) for g in goals]
    for _ in range(2 * family.episode_len):
        actions = rng.integers(family.n_actions, size=len(goals))
        got = batched.step(actions)
        steps = [env.step(a[None]) for env, a in zip(singles, actions)]
        want = [np.concatenate(parts) for parts in zip(*steps)]
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        if got[2].all():
            batched.reset()
            for env in singles:
                env.reset()


# ---- oracle returns ----

def test_dark_room_oracle_returns():
    family = DarkRoom()
    tasks = family.tasks()
    dist = np.abs(tasks - 4).sum(axis=1)
    oracle = family.oracle_returns(tasks)
    centre = dist == 0
    np.testing.assert_array_equal(oracle[~centre], 21 - dist[~centre])
    assert centre.sum() == 1 and oracle[centre][0] == 20
    assert oracle[~centre].mean() == pytest.approx(16.5)


def test_dark_room_hard_oracle_is_one_everywhere():
    family = DarkRoom(size=17, sparse=True)
    assert (family.oracle_returns(family.tasks()) == 1).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_shortest_path_then_noop_earns_the_oracle_return(name):
    family = make_family(name)
    goals = family.tasks()
    env = family.make(goals)
    pos, total = env.reset(), np.zeros(len(goals))
    for _ in range(family.episode_len):
        (x, y), (gx, gy) = pos.T, goals.T
        actions = np.select([x < gx, x > gx, y < gy, y > gy], [RIGHT, LEFT, UP, DOWN], NOOP)
        pos, reward, done = env.step(actions)
        total += reward
    assert done.all()
    np.testing.assert_array_equal(total, family.oracle_returns(goals))


# ---- train/test split ----

@pytest.mark.parametrize("name", FAMILIES)
def test_split_is_a_seeded_partition(name):
    family = make_family(name)
    n = len(family.tasks())
    split = family.split(16, seed=0)
    train, test = split["train"], split["test"]
    assert len(test) == 16 and len(np.unique(test)) == 16
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(n))
    assert np.array_equal(train, np.sort(train)) and np.array_equal(test, np.sort(test))
    again = family.split(16, seed=0)
    assert np.array_equal(again["train"], train) and np.array_equal(again["test"], test)
    assert not np.array_equal(family.split(16, seed=1)["test"], test)
    capped = family.split(16, seed=0, n_train=10)
    assert len(capped["train"]) == 10 and set(capped["train"]) <= set(train)
    for bad in (0, n):
        with pytest.raises(ValueError):
            family.split(bad)
    with pytest.raises(ValueError):
        family.split(16, n_train=n - 15)


# ---- Gymnasium environments ----

@pytest.mark.parametrize("env_id", list(GYM_IDS))
def test_check_env_passes(env_id):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(gym.make(env_id).unwrapped)
        task = make_family(GYM_IDS[env_id][0]).tasks()[3]
        check_env(gym.make(env_id, task=task).unwrapped)


def test_register_envs_is_idempotent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register_envs()
        register_envs()
    assert all(env_id in gym.registry for env_id in GYM_IDS)


def test_spaces_and_truncation():
    env = gym.make("icrl/DarkRoom-v0", goal=(0, 0))
    assert env.observation_space == gym.spaces.MultiDiscrete([9, 9], dtype=np.int64)
    assert env.action_space == gym.spaces.Discrete(5)
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.int64 and obs.tolist() == [4, 4]
    for t in range(1, 21):
        obs, reward, terminated, truncated, _ = env.step(NOOP)
        assert not terminated and truncated == (t == 20)


@pytest.mark.parametrize("kwargs", [{"goal": (2, 3)}, {"task": (2, 3)}])
def test_given_goal_is_honoured(kwargs):
    env = gym.make("icrl/DarkRoom-v0", **kwargs)
    for seed in (0, 1, None):
        _, info = env.reset(seed=seed)
        assert info["task"].tolist() == [2, 3]
        rewards = [env.step(a)[1] for a in [LEFT, LEFT, DOWN, NOOP]]
        assert rewards == [0, 0, 1, 1]


def test_goal_given_at_reset_is_kept():
    env = gym.make("icrl/DarkRoomHard-v0", goal=(0, 0))
    assert env.reset(options={"task": (16, 3)})[1]["task"].tolist() == [16, 3]
    assert env.reset(seed=5)[1]["task"].tolist() == [16, 3]


def test_goal_without_one_given_is_drawn_from_the_seed():
    env = gym.make("icrl/DarkRoom-v0")
    goals = [tuple(env.reset(seed=s)[1]["task"]) for s in range(10)]
    assert len(set(goals)) > 1
    assert tuple(env.reset()[1]["task"]) == goals[-1]  # kept across episodes
    assert [tuple(env.reset(seed=s)[1]["task"]) for s in range(10)] == goals


@pytest.mark.parametrize("env_id, goal", [
    ("icrl/DarkRoom-v0", (9, 0)), ("icrl/DarkRoom-v0", (-1, 2)), ("icrl/DarkRoom-v0", (1, 2, 3)),
    ("icrl/DarkRoom-v0", (2.5, 1)), ("icrl/DarkRoom-v0", "ab"), ("icrl/DarkRoomHard-v0", (17, 0)),
])
def test_bad_goal_raises(env_id, goal):
    with pytest.raises(ValueError, match="task"):
        gym.make(env_id, goal=goal)
    env = gym.make(env_id)
    with pytest.raises(ValueError, match="task"):
        env.reset(options={"task": goal})


def test_goal_and_task_together_raise():
    with pytest.raises(ValueError, match="not both"):
        gym.make("icrl/DarkRoom-v0", goal=(1, 1), task=(1, 1))
