"""Watermaze: motion, reward on entering the platform, the restart, the state discretisation,
the drawn views (batched = one by one), the task space and split, the Gymnasium id, and a
tabular learner that learns on the state while the histories record pixels."""
from __future__ import annotations

import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import icrl  # noqa: F401  (registers the Gymnasium ids)
from icrl.envs import Watermaze, family_from_config, make_family
from icrl.envs.watermaze import (ACTION_NAMES, HEIGHT, WatermazeEnv, navigator_actions,
                                  random_actions, render)
from icrl.sources import QLearning, applies, collect, make_source, observed_spec

A = {name: i for i, name in enumerate(ACTION_NAMES)}
NORTH, EAST = math.pi / 2, 0.0


@pytest.fixture(scope="module")
def family():
    return Watermaze()


def one_env(family, platform, seed=0):
    return family.make(np.array([platform], dtype=float), seed=seed)


def act(env, *names):
    """Step a batch-of-one env; return the rewards."""
    return [float(env.advance(np.array([A[name]]))[0][0]) for name in names]


# ---- motion --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, pos, heading_deg", [
    ("forward", (0, 1), 90), ("backward", (0, -1), 90), ("strafe_left", (-1, 0), 90),
    ("strafe_right", (1, 0), 90), ("turn_left", (0, 0), 135), ("turn_right", (0, 0), 45),
    ("forward_turn_left", (-math.sqrt(0.5), math.sqrt(0.5)), 135),
    ("forward_turn_right", (math.sqrt(0.5), math.sqrt(0.5)), 45),
])
def test_each_action_from_the_start(family, name, pos, heading_deg):
    env = one_env(family, (0.8, 0))
    assert env.pos.tolist() == [[0, 0]] and env.heading[0] == NORTH
    act(env, name)
    np.testing.assert_allclose(env.pos[0], np.array(pos) * family.step, atol=1e-12)  # pos in steps
    assert math.degrees(env.heading[0]) == pytest.approx(heading_deg)


def test_the_pool_wall_stops_the_agent(family):
    env = one_env(family, (0.8, 0))
    act(env, *["forward"] * 8)
    np.testing.assert_allclose(env.pos[0], [0, 1], atol=1e-12)        # on the edge, not beyond
    act(env, "turn_right", "forward")                                  # slides along the wall
    assert np.hypot(*env.pos[0]) == pytest.approx(1) and env.pos[0, 0] > 0


def test_bad_actions_are_refused(family):
    env = family.make(family.tasks()[:2])
    for bad, match in [([0, 8], r"\[0, 8\)"), ([-1, 0], r"\[0, 8\)"), ([0.5, 1.0], "integer"),
                       ([0, 1, 2], "2 integer actions")]:
        with pytest.raises(ValueError, match=match):
            env.step(np.array(bad))


# ---- reward and restart --------------------------------------------------------------------------

def test_reward_on_entering_then_a_random_restart_off_the_platform(family):
    env = one_env(family, (0, 0.5))
    assert act(env, "forward") == [0.0]                      # (0, 0.25): 0.25 from its centre
    assert act(env, "forward") == [1.0]                      # (0, 0.5): entered
    assert np.hypot(*(env.pos[0] - [0, 0.5])) > family.platform_radius   # moved off it
    assert np.hypot(*env.pos[0]) <= 1
    turns = (env.heading[0] - NORTH) / family.turn            # a heading on the turn lattice
    assert turns == pytest.approx(round(turns), abs=1e-9)
    assert env.t[0] == 2 and not env.advance(np.array([0]))[1][0]   # the episode goes on


def test_staying_on_the_platform_pays_nothing(family):
    env = one_env(family, (0, 0))                            # the start is on the platform
    assert act(env, "turn_left", "turn_right") == [0, 0]
    assert act(env, "forward", "backward") == [0, 1]         # left it, came back: entered
    env.reset()
    assert act(env, "strafe_left", "strafe_right") == [0, 1]


def test_restarts_are_seeded(family):
    platforms = np.tile([[0, 0.2]], (64, 1))
    runs = []
    for seed in (3, 3, 4):
        env = family.make(platforms, seed=seed)
        env.step(np.full(64, A["forward"]))          # every agent enters, every one restarts
        runs.append((env.pos.copy(), env.heading.copy()))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert not np.array_equal(runs[0][0], runs[2][0])
    assert len(np.unique(np.round(runs[0][1], 6))) == family.heading_bins   # all 8 headings drawn


def test_episodes_last_50_steps_and_reset_masks(family):
    env = family.make(family.tasks()[:3])
    dones = [env.step(np.full(3, A["turn_left"]))[2].tolist() for _ in range(50)]
    assert dones == [[False] * 3] * 49 + [[True] * 3]
    env.step(np.array([A["forward"]] * 3))
    env.reset(np.array([True, False, True]))
    assert env.t.tolist() == [0, 51, 0]
    assert env.pos[[0, 2]].tolist() == [[0, 0], [0, 0]] and env.heading[0] == NORTH


# ---- the state -----------------------------------------------------------------------------------

def test_state_bins(family):
    assert family.state_spec.high == (7, 7, 8) and family.state_spec.kind == "discrete"
    env = family.make(family.tasks()[:4])
    assert env.state().tolist() == [[3, 3, 0]] * 4             # the centre cell, facing north
    env.pos[:] = [[-1, -1], [0.99, -0.99], [-0.26, 0.1], [0.24, 0.5]]
    env.heading[:] = [EAST, math.radians(22), math.radians(23), math.radians(-22)]
    # heading bins count turns left of north: east is 2 turns right (bin 6), 23 degrees is 1 turn
    # right and a bit (bin 7), 22 and -22 degrees round to 2 turns right
    assert env.state().tolist() == [[0, 0, 6], [6, 0, 6], [2, 3, 7], [4, 5, 6]]
    family.state_spec.check(env.state(), 4)
    assert env.state().dtype == np.int64


def test_turning_moves_exactly_one_heading_bin(family):
    env = one_env(family, (0.8, 0))
    bins = []
    for _ in range(9):
        bins.append(int(env.state()[0, 2]))
        act(env, "turn_left")
    assert bins == [0, 1, 2, 3, 4, 5, 6, 7, 0]


# ---- the view ------------------------------------------------------------------------------------

def test_frames_shape_dtype_and_spec(family):
    env = family.make(family.tasks()[:3])
    frames = env.reset()
    assert frames.shape == (3, 72, 96, 3) and frames.dtype == np.uint8
    frames, reward, done = env.step(np.array([0, 4, 6]))
    assert frames.shape == (3, 72, 96, 3) and reward.dtype == np.float32 and done.dtype == bool
    family.obs_spec.check(frames, 3)
    with pytest.raises(ValueError, match="integers"):
        family.obs_spec.check(frames.astype(np.float32), 3)
    with pytest.raises(ValueError, match="shape"):
        family.obs_spec.check(frames[:, :, :48], 3)


def test_the_wall_colour_in_front_gives_the_heading():
    frames = render(np.zeros((2, 2)), np.array([NORTH, EAST]))
    wall_north, wall_east = frames[0, 30, 48].astype(int), frames[1, 30, 48].astype(int)
    assert wall_north[0] > 100 and wall_north[1] > 100 and wall_north[2] < 80     # yellow
    assert wall_east[0] > 100 and wall_east[1] < 80 and wall_east[2] < 80         # red
    for frame in frames:                      # water at the bottom (blue), ceiling on top (dark)
        assert frame[71, 48, 2] > frame[71, 48, 0] + 50 and frame[0, 48].max() < 80


def test_the_view_depends_on_position_and_heading():
    frames = render(np.array([[0, 0], [0, 0], [0.5, 0], [0, 0]]),
                    np.array([NORTH, NORTH + 0.3, NORTH, NORTH]))
    assert np.array_equal(frames[0], frames[3])
    assert (frames[0] != frames[1]).any(axis=-1).mean() > 0.3
    assert (frames[0] != frames[2]).any(axis=-1).mean() > 0.3
    # nearer the wall, the wall looks taller: more wall rows in the middle column
    near = render(np.array([[0, 0.9]]), np.array([NORTH]))[0]
    assert (near[:, 48] == near[36, 48]).all(axis=-1).sum() > \
        (frames[0][:, 48] == frames[0][36, 48]).all(axis=-1).sum()


def test_batched_render_equals_one_agent_at_a_time():
    rng = np.random.default_rng(0)
    r, angle = np.sqrt(rng.random(70)), rng.uniform(0, 2 * math.pi, 70)
    pos = np.stack([r * np.cos(angle), r * np.sin(angle)], 1)
    pos[:3] = [[0, 1], [-1, 0], [0, 0]]                                 # on the edge, centre
    heading = rng.uniform(0, 2 * math.pi, 70)
    batched = render(pos, heading)
    alone = np.concatenate([render(pos[i:i + 1], heading[i:i + 1]) for i in range(70)])
    np.testing.assert_array_equal(batched, alone)


def test_frames_are_the_gathered_column_images():
    """The transposing and RGBx-to-RGB copies equal a plain lookup of the camera's column table."""
    from icrl.envs.watermaze import CAMERA
    pos, heading = np.array([[0.3, -0.4], [0, 0.99], [-0.7, 0.1]]), np.array([0.4, NORTH, 3.0])
    frames = render(pos, heading)
    columns = CAMERA._columns.view(np.uint8).reshape(len(CAMERA._columns), HEIGHT, 4)[..., :3]
    for n in range(3):
        for c in (0, 47, 95):
            assert (columns == frames[n, :, c]).all(axis=(1, 2)).any()


def test_a_large_batch_drawn_in_parts_equals_a_plain_lookup_and_one_agent_calls():
    """A batch of over two `part`s (the last one short) takes the part-by-part copies; its frames
    equal one-agent calls (the direct copies) and a plain lookup of the column table at bins found
    by np.searchsorted, with the rays computed here without the in-place arithmetic."""
    from icrl.envs.watermaze import CAMERA, POOL_RADIUS, WIDTH
    n = 2 * CAMERA.part + 5
    rng = np.random.default_rng(3)
    r, angle = np.sqrt(rng.random(n)), rng.uniform(0, 2 * math.pi, n)
    pos = np.stack([r * np.cos(angle), r * np.sin(angle)], 1).astype(np.float32)
    pos[:2] = [[0, 1], [0, 0]]
    heading = rng.uniform(-7, 7, n).astype(np.float32)
    frames = render(pos, heading)
    alone = np.concatenate([render(pos[i:i + 1], heading[i:i + 1]) for i in range(n)])
    np.testing.assert_array_equal(frames, alone)

    px, py = pos[:, :1], pos[:, 1:]
    cos, sin = np.cos(heading)[:, None], np.sin(heading)[:, None]
    off = CAMERA.column_offsets
    dx, dy = cos + off * sin, sin - off * cos
    a, b, c = dx * dx + dy * dy, px * dx + py * dy, px * px + py * py
    w, p = ((np.sqrt(np.maximum(b * b - a * (c - np.float32(radius ** 2)), 0)) - b) / a
            for radius in (CAMERA.wall_radius, POOL_RADIUS))
    stripe = (np.arctan2(py + w * dy, px + w * dx) * np.float32(CAMERA.stripes / (2 * math.pi))
              + np.float32(CAMERA.stripes)).astype(np.intp)
    index = ((np.searchsorted(CAMERA._wall_edges, w) * (len(CAMERA._edges[2]) + 1)
              + np.searchsorted(CAMERA._edges[2], p)) * 16 + CAMERA._stripe_colour[stripe])
    columns = CAMERA._columns.view(np.uint8).reshape(len(CAMERA._columns), HEIGHT, 4)[..., :3]
    assert index.shape == (n, WIDTH)
    np.testing.assert_array_equal(frames, columns[index].transpose(0, 2, 1, 3))


def test_table_binning_equals_searchsorted_for_every_float32_near_an_edge():
    from icrl.envs.watermaze import CAMERA, Bins
    rng = np.random.default_rng(0)
    for edges in (CAMERA._wall_edges, CAMERA._edges[2]):
        bins = Bins(edges)
        x = np.concatenate([edges, np.nextafter(edges, np.float32(np.inf)),
                            np.nextafter(edges, np.float32(-np.inf)),
                            rng.uniform(-1, 3, 100_000).astype(np.float32)])
        np.testing.assert_array_equal(bins(x), np.searchsorted(edges, x))
    bins = Bins(np.array([0.1, 0.1001, 0.5], dtype=np.float32))   # edges closer than a cell of 1
    assert bins.scale > 1000                  # refined until they fall in different cells
    np.testing.assert_array_equal(bins(np.float32([0.0, 0.1, 0.10005, 0.2, 0.6])), [0, 0, 1, 2, 3])


def test_same_seed_same_frames(family):
    tasks = family.tasks()[:8]
    runs = []
    for seed in (5, 5):
        env, rng = family.make(tasks, seed=seed), np.random.default_rng(0)
        out = [env.reset()]
        for _ in range(30):
            frames, reward, _ = env.step(rng.integers(8, size=8))
            out += [frames, reward]
        runs.append(out)
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


# ---- tasks, split, oracle ------------------------------------------------------------------------

def test_task_table_is_seeded_and_inside_the_allowed_disk(family):
    table = family.tasks()
    assert table.shape == (4096, 2) and table.dtype == np.float64
    np.testing.assert_array_equal(table, Watermaze().tasks())
    assert np.hypot(*table.T).max() <= 0.85
    assert not np.array_equal(table, Watermaze(table_seed=1).tasks())


def test_split_holds_out_platforms_never_trained_on(family):
    split = family.split(64, seed=0)
    assert len(split["test"]) == 64 and not set(split["train"]) & set(split["test"])
    assert len(split["train"]) + 64 == len(family.tasks())
    np.testing.assert_array_equal(split["test"], family.split(64, seed=0)["test"])


def test_check_task_takes_any_point_of_the_allowed_disk(family):
    for task in [(0.3, -0.2), (0.85, 0.0), (0.0, -0.85), (0.123456, 0.654321)]:
        got = family.check_task(task)
        assert got.dtype == np.float64 and got.tolist() == list(task)
    for bad in [(0.9, 0), (0.7, 0.7), (-1, 0)]:
        with pytest.raises(ValueError, match="within 0.85 of the pool's centre"):
            family.check_task(bad)
    for bad in [(1, 2, 3), "ab", (np.nan, 0)]:
        with pytest.raises(ValueError, match="platform centre"):
            family.check_task(bad)
    with pytest.raises(ValueError, match="within 0.85"):
        family.make(np.array([[0, 0], [0.9, 0]]))


def test_config_round_trip():
    fam = make_family("watermaze", step=0.15, platform_radius=0.1, state_bins=6, n_tasks=500)
    again = family_from_config(fam.config())
    assert again.config() == fam.config() and again.state_spec.high == (6, 6, 8)
    np.testing.assert_array_equal(again.tasks(), fam.tasks())


def test_the_state_variant_observes_the_true_state_of_the_same_task():
    """`watermaze-state`: the same dynamics, tasks and split, with env.state() as observations."""
    pixels, state = make_family("watermaze"), make_family("watermaze-state")
    assert state.name == "watermaze-state" and state.obs_spec == pixels.state_spec
    assert family_from_config(state.config()).config() == state.config()
    np.testing.assert_array_equal(state.tasks(), pixels.tasks())
    tasks = pixels.tasks()[:5]
    a, b = pixels.make(tasks, seed=3), state.make(tasks, seed=3)
    obs = b.reset()
    a.reset()
    for t in range(30):
        np.testing.assert_array_equal(obs, a.state())
        state.obs_spec.check(obs, 5)
        actions = np.random.default_rng(t).integers(8, size=5)
        (_, r1, d1), (obs, r2, d2) = a.step(actions), b.step(actions)
        np.testing.assert_array_equal(r1, r2)
        np.testing.assert_array_equal(d1, d2)
    assert not observed_spec(QLearning, state)[1]     # a tabular source reads it directly


@pytest.mark.parametrize("kwargs", [{"step": 0}, {"platform_radius": 1.5}, {"turn_degrees": 50},
                                    {"state_bins": 0}, {"episode_len": 0}, {"observe": "depth"}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Watermaze(**kwargs)


def test_navigator_beats_random_and_its_estimate_is_deterministic(family):
    tasks = family.tasks()[:24]
    oracle = family.oracle_returns(tasks, rollouts=2)
    np.testing.assert_array_equal(oracle, family.oracle_returns(tasks, rollouts=2))
    random = family.policy_returns(tasks, random_actions, rollouts=2)
    assert oracle.mean() > 8 and oracle.min() >= 4 and random.mean() < 1


def test_the_navigator_enters_a_platform_straight_ahead(family):
    env = one_env(family, (0, 0.75))
    rewards = [float(env.advance(navigator_actions(env))[0][0]) for _ in range(3)]
    assert rewards == [0, 0, 1]


# ---- Gymnasium -----------------------------------------------------------------------------------

def test_gym_env_renders_rgb_frames():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = gym.make("icrl/Watermaze-v0", platform=(0.3, -0.2), render_mode="rgb_array")
        check_env(env.unwrapped)
    obs, info = env.reset(seed=0)
    assert info["task"].tolist() == [0.3, -0.2]
    frame = env.render()
    assert frame.shape == (72, 96, 3) and frame.dtype == np.uint8 and np.array_equal(frame, obs)
    obs, *_ = env.step(A["turn_left"])
    assert np.array_equal(env.render(), obs) and not np.array_equal(frame, obs)


def test_gym_render_modes_are_checked():
    with pytest.raises(ValueError, match="None or 'rgb_array'"):
        gym.make("icrl/Watermaze-v0", render_mode="human")
    with pytest.raises(ValueError, match="no rendering"):
        gym.make("icrl/DarkRoom-v0", render_mode="rgb_array")
    assert gym.make("icrl/Watermaze-v0").unwrapped.render() is None


# ---- a learner on the state, histories of pixels -------------------------------------------------

def test_qlearning_learns_on_the_state_and_histories_record_pixels():
    family = Watermaze(episode_len=6)
    assert applies(QLearning, family) and observed_spec(QLearning, family) == \
        (family.state_spec, True)
    tasks = family.tasks()[:3]
    source = make_source("qlearning", family, 3, {"planning_sweeps": 2}, seed=0)
    assert source.observes_state and source.obs_dims == (7, 7, 8)
    assert source.q.shape == (3, 7 * 7 * 8, 8)
    h = collect(family, tasks, source, 2, seed=7)
    assert h.obs.shape == (3, 12, 72, 96, 3) and h.obs.dtype == np.uint8
    # the recorded frames are the env's frames for the recorded actions
    env = family.make(tasks, seed=7)
    frames = env.reset()
    for t in range(6):
        np.testing.assert_array_equal(h.obs[:, t], frames)
        frames, rewards, _ = env.step(h.actions[:, t].astype(np.int64))
        np.testing.assert_array_equal(h.rewards[:, t], rewards)
    assert (source.q != 1.0).any()                  # it learned, on (x bin, y bin, heading bin)


def test_episodes_not_recorded_are_not_drawn_and_change_nothing(monkeypatch):
    """A learner on the state needs frames only of the episodes kept: collect skips drawing the
    others (env.advance), and the histories are those of drawing everything."""
    family, tasks = Watermaze(episode_len=5), Watermaze().tasks()[:4]

    def run():
        source = make_source("qlearning", family, 4, {"planning_sweeps": 2}, seed=1)
        return collect(family, tasks, source, 7, every=3, seed=5)

    drawn = []
    original = WatermazeEnv.render
    monkeypatch.setattr(WatermazeEnv, "render", lambda env: drawn.append(1) or original(env))
    skipped = run()
    # one frame when the env is made, one per episode start, then the steps of the 3 kept episodes
    assert len(drawn) == 1 + 7 + 3 * 5
    advance = WatermazeEnv.advance  # now drawing every step too
    monkeypatch.setattr(WatermazeEnv, "advance", lambda env, a: (advance(env, a), env.render())[0])
    everything = run()
    for key in ("obs", "actions", "rewards", "dones", "episode_returns"):
        np.testing.assert_array_equal(getattr(skipped, key), getattr(everything, key))


def test_sources_that_read_observations_are_unchanged():
    darkroom = make_family("darkroom")
    assert observed_spec(QLearning, darkroom) == (darkroom.obs_spec, False)
    assert not make_source("qlearning", darkroom, 2).observes_state
    random = make_source("random", Watermaze(), 2)
    assert not random.observes_state      # any observations will do: it sees the pixels
