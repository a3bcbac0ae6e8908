"""The Atari suite: frames, the shared action map, time limits, resets, seeds, bad input, and a
smoke-size generate -> train -> evaluate run on CPU."""
import numpy as np
import pytest

from icrl.envs import Atari, family_from_config, make_family
from icrl.envs.atari import area_matrix, shrink

BREAKOUT_NOOP, BREAKOUT_FIRE, BREAKOUT_RIGHT = 0, 1, 3
UPRIGHT = 6   # not Breakout's: raw ALE moves the paddle with it, the suite must not


def test_frames_and_legal_actions():
    family = Atari(games=["breakout", "pong"], noop_max=0)
    assert family.n_actions == 18 and family.obs_spec.shape == (84, 84, 1)
    assert family.legal_actions("breakout") == [0, 1, 3, 4]
    assert family.legal_actions("pong") == [0, 1, 3, 4, 11, 12]
    env = family.make(family.tasks(), seed=0)
    obs = env.reset()
    assert obs.shape == (2, 84, 84, 1) and obs.dtype == np.uint8 and obs.any()
    obs, reward, done = env.step(np.array([BREAKOUT_FIRE, 0]))
    assert obs.shape == (2, 84, 84, 1) and reward.dtype == np.float32 and done.dtype == bool


def test_legal_action_moves_and_illegal_action_is_noop():
    family = Atari(games=["breakout"], noop_max=0)
    a, b, c = (family.make([[0]], seed=3) for _ in range(3))
    frames = [env.reset() for env in (a, b, c)]
    assert (frames[0] == frames[1]).all() and (frames[0] == frames[2]).all()
    moved = False
    for _ in range(12):
        x, rx, _ = a.step(np.array([BREAKOUT_NOOP]))
        y, ry, _ = b.step(np.array([UPRIGHT]))        # illegal: a no-op
        z, _, _ = c.step(np.array([BREAKOUT_RIGHT]))  # legal: the paddle moves
        assert (x == y).all() and rx == ry
        moved |= (x != z).any()
    assert moved


def test_game_over_is_terminal_and_time_limit_is_not():
    env = Atari(games=["breakout"], max_steps=10_000, noop_max=0).make([[0]])
    env.reset()
    for t in range(1, 2000):  # fire and never move: the ball is missed, five times
        _, _, done = env.step(np.array([BREAKOUT_FIRE]))
        if done[0]:
            break
    assert done[0] and env.terminal[0] and t < 2000
    env = Atari(games=["breakout"], max_steps=5).make([[0]])
    env.reset()
    dones = [env.step(np.array([BREAKOUT_NOOP]))[2][0] for _ in range(5)]
    assert dones == [False] * 4 + [True] and not env.terminal[0]


def test_reset_mask_resets_only_masked_rows():
    family = Atari(games=["breakout"], noop_max=0)
    env = family.make([[0], [0]], seed=0)
    start = env.reset()
    for _ in range(8):
        obs, _, _ = env.step(np.array([BREAKOUT_FIRE, BREAKOUT_RIGHT]))
    assert (obs != start).any(axis=(1, 2, 3)).all()
    again = env.reset(np.array([True, False]))
    assert (again[0] == start[0]).all() and (again[1] == obs[1]).all()
    assert env.t.tolist() == [0, 8]


def test_seeds_reproduce_and_differ():
    family = Atari(games=["pong", "freeway"])   # no-op starts: the seed picks the start
    tasks = np.array([[0], [1]])
    runs = []
    for seed in (5, 5, 6):
        env = family.make(tasks, seed=seed)
        rng = np.random.default_rng(0)
        frames = [env.reset()]
        for _ in range(20):
            frames.append(env.step(rng.integers(18, size=2))[0])
        runs.append(np.stack(frames))
    assert (runs[0] == runs[1]).all()
    assert (runs[0] != runs[2]).any()


def test_bad_input():
    with pytest.raises(ValueError, match="unknown atari game"):
        Atari(games=["pongg"])
    with pytest.raises(ValueError, match="distinct"):
        Atari(games=["pong", "pong"])
    with pytest.raises(ValueError, match="max_steps"):
        Atari(max_steps=0)
    with pytest.raises(ValueError, match="noop_max"):
        Atari(noop_max=-1)
    family = Atari(games=["pong"])
    with pytest.raises(ValueError, match="unknown atari game"):
        family.legal_actions("tetris2")
    with pytest.raises(ValueError, match="game indices"):
        family.make([[1]])
    env = family.make([[0]])
    env.reset()
    with pytest.raises(ValueError, match="actions must be integers"):
        env.step(np.array([18]))
    with pytest.raises(ValueError, match="expected 1 actions"):
        env.step(np.array([0, 0]))


def test_registered_and_config_round_trip():
    family = make_family("atari", games=["pong"], max_steps=100, noop_max=3)
    assert family.config() == {"name": "atari", "games": ["pong"], "max_steps": 100,
                               "noop_max": 3}
    again = family_from_config(family.config())
    assert again.config() == family.config() and again.episode_len == 100
    assert make_family("atari").games == ("breakout", "asterix", "freeway", "seaquest",
                                          "space_invaders")


def test_shrink_averages_areas():
    for n_out, n_in in ((84, 210), (84, 160)):
        m = area_matrix(n_out, n_in)
        assert np.allclose(m.sum(axis=1), 1) and np.allclose(m.sum(axis=0), n_out / n_in)
    flat = np.full((2, 210, 160), 77, dtype=np.uint8)
    assert (shrink(flat) == 77).all()
    bar = np.zeros((1, 210, 160), dtype=np.uint8)
    bar[:, :, :80] = 200   # left half bright: so is the left half of the small frame
    small = shrink(bar)[0]
    assert (small[:, :41] == 200).all() and (small[:, 43:] == 0).all()


def test_generate_train_evaluate_smoke(tmp_path):
    from icrl.checkpoint import load_policy
    from icrl.data.store import HistoryStore
    from icrl.evaluate import evaluate
    from icrl.generate import GenerateConfig, generate
    from icrl.models.transformer import TransformerConfig
    from icrl.train import ModelSpec, TrainConfig, train

    family = Atari(games=["breakout", "pong"], max_steps=12)
    data = generate(family, tmp_path / "atari.h5", GenerateConfig(
        source="dqn", source_config={"capacity": 32, "learning_starts": 8, "batch_size": 4,
                                     "channels": 4, "hidden": 16},
        steps=24, seeds_per_task=1, chunk_size=2), progress=False)
    with HistoryStore(data) as store:
        assert store.meta["kind"] == "replay" and store.meta["family"] == family.config()
        block = store.read(slice(None))
        assert block["obs"].shape == (2, 24, 84, 84, 1) and block["dones"][:, 11].all()
    spec = ModelSpec(layout="dt", encoder="patch", patch=14, context=4,
                     transformer=TransformerConfig(n_layer=1, n_head=2, d_model=32, d_ff=64))
    path = train(data, tmp_path / "run", spec,
                 TrainConfig(steps=5, batch_size=4, checkpoint_every=5), progress=False)
    policy, ckpt = load_policy(path)
    assert ckpt["family"] == family.config()
    returns = evaluate(policy, family, family.tasks(), n_episodes=1, rollouts_per_task=2)
    assert returns.shape == (2, 2, 1) and np.isfinite(returns).all()


def test_mgdt_atari_runs_end_to_end_at_smoke_size(tmp_path):
    import json

    from icrl.cli import main
    from icrl.data.store import HistoryStore

    out = tmp_path / "run"
    assert main(["run", "mgdt-atari", "--preset", "smoke", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["games"] == ["breakout", "pong"]
    assert set(report["iqm"]) == {"DT-expert", "DT", "BC", "data"}
    for g in report["games"]:
        for method in ("DT-expert", "DT", "BC"):
            assert report["per_game"][g][method]["n_episodes"] == 1
    with HistoryStore(out / "replay.h5") as store:   # made by the preset's 2 processes
        assert store.meta["family"]["name"] == "atari" and store.n_histories == 2
        assert store.obs_spec.shape == (84, 84, 1)
    assert not (out / "replay.h5.parts").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the preset would run")
def test_the_gpu_preset_without_a_gpu_is_a_one_line_error(tmp_path, capsys):
    from icrl.cli import main

    assert main(["run", "mgdt-atari", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "device 'cuda' is not usable here" in err
    assert "smoke runs on a CPU" in err
