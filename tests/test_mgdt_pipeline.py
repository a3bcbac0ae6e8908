"""The MGDT pipeline on MinAtar: replay data of whole DQN runs, the experiments at smoke size."""
import json

import numpy as np
import pytest

from icrl.cli import main
from icrl.data.store import HistoryStore
from icrl.envs.minatar import MinAtar
from icrl.experiments import mgdt, mgdt_finetune
from icrl.generate import GenerateConfig, generate
from icrl.sources import make_source
from icrl.sources.base import collect_run


def test_minatar_steps_every_game_through_the_shared_action_map():
    suite = MinAtar(max_steps=50)
    assert suite.n_actions == 6 and suite.obs_spec.shape == (10, 10, 10)
    env = suite.make(suite.tasks(), seed=0)
    obs = env.reset()
    assert obs.shape == (5, 10, 10, 10) and obs.dtype == np.uint8
    assert set(np.unique(obs)) <= {0, 255}
    # Breakout: "left" (shared index 1) moves the paddle (channel 0, bottom row) one cell left
    breakout = suite.games.index("breakout")
    paddle = np.flatnonzero(obs[breakout, 9, :, 0])
    actions = np.zeros(5, dtype=np.int64)
    actions[breakout] = suite.action_names.index("left")
    obs, reward, done = env.step(actions)
    assert np.flatnonzero(obs[breakout, 9, :, 0]).tolist() == (paddle - 1).tolist()
    # an action a game does not have acts as a no-op: Breakout's "up" and "noop" agree
    a, b = suite.make(suite.tasks()[:1], seed=3), suite.make(suite.tasks()[:1], seed=3)
    a.reset(), b.reset()
    assert suite.action_names.index("up") not in suite.legal_actions("breakout")
    for _ in range(10):
        fa, ra, da = a.step(np.array([suite.action_names.index("up")]))
        fb, rb, db = b.step(np.array([0]))
        assert (fa == fb).all() and ra == rb and da == db


def test_the_time_limit_ends_an_episode_without_a_terminal_state():
    suite = MinAtar(games=("freeway",), max_steps=7)
    env = suite.make(suite.tasks(), seed=0)
    env.reset()
    for t in range(7):
        _, _, done = env.step(np.zeros(1, dtype=np.int64))
    assert done.all() and not env.terminal.any()


def test_bad_games_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown minatar game"):
        MinAtar(games=("pong",))
    with pytest.raises(ValueError, match="game indices"):
        MinAtar().make(np.array([[7]]))


def test_a_run_is_recorded_whole_with_episodes_of_any_length(tmp_path):
    suite = MinAtar(games=("breakout", "freeway"), max_steps=40)
    source = make_source("dqn", suite, 2, {"learning_starts": 10, "capacity": 50}, seed=0)
    hist = collect_run(suite, suite.tasks(), source, 120, seed=0)
    assert hist.obs.shape == (2, 120, 10, 10, 10) and hist.dones.shape == (2, 120)
    # each row's finished episodes, NaN after its last; their sums are the recorded rewards
    for i in range(2):
        ends = np.flatnonzero(hist.dones[i])
        returns = hist.episode_returns[i]
        assert (~np.isnan(returns)).sum() == len(ends)
        starts = np.r_[0, ends[:-1] + 1]
        assert np.allclose(returns[:len(ends)], [hist.rewards[i, a:b + 1].sum()
                                                 for a, b in zip(starts, ends)])
    # Freeway runs to the time limit: episodes of exactly 40 steps
    assert np.flatnonzero(hist.dones[1]).tolist() == [39, 79, 119]
    assert source.steps == 120


def test_replay_generation_resumes_and_stores_a_replay(tmp_path):
    suite = MinAtar(games=("breakout", "asterix"), max_steps=60)
    cfg = GenerateConfig(source="dqn", source_config={"learning_starts": 20, "capacity": 100},
                         steps=150, seeds_per_task=2, chunk_size=2)
    out = generate(suite, tmp_path / "r.h5", cfg, progress=False)
    with HistoryStore(out) as store:
        assert store.meta["kind"] == "replay" and (store.n_histories, store.n_steps) == (4, 150)
        assert store.column("task_ids").tolist() == [0, 0, 1, 1]
        returns = store.column("episode_returns")
        assert store.meta["n_episodes"] == max((~np.isnan(r)).sum() for r in returns)
        sha = store.fingerprint()["sha256"]
    # a second process made only one chunk before dying: the rerun makes the other, same bytes
    again = tmp_path / "again.h5"
    from icrl.parts import Shard
    generate(suite, again, cfg, progress=False, shard=Shard(0, 2))
    generate(suite, again, cfg, progress=False)
    with HistoryStore(again) as store:
        assert store.fingerprint()["sha256"] == sha


def test_best_score_and_normalisation():
    runs = [np.array([0.0, 0, 1, 5, 5, 5]), np.array([2.0, 2])]
    assert mgdt.best_score(runs, 3) == 5.0
    assert mgdt.best_score([np.array([1.0, 3.0])], 20) == 2.0    # a short run: all of it
    assert mgdt.normalised([1.0, 3.0], 1.0, 3.0).tolist() == [0.0, 1.0]


def test_the_held_out_sample_is_whole_episodes_of_one_game(tmp_path):
    suite = MinAtar(games=("breakout", "asterix"), max_steps=30)
    cfg = GenerateConfig(source="dqn", source_config={"learning_starts": 20, "capacity": 100},
                         steps=300, seeds_per_task=2, chunk_size=4)
    data = generate(suite, tmp_path / "r.h5", cfg, progress=False)
    part = mgdt_finetune.select(data, tmp_path / "h.h5", suite, ("asterix",), 0.25, seed=0)
    with HistoryStore(part) as store, HistoryStore(data) as full:
        assert store.meta["family"]["games"] == ["asterix"]
        d = store.read(0)
        assert d["dones"][-1]                              # ends with a whole episode
        assert d["dones"].size >= 0.25 * 2 * full.n_steps  # at least the fraction of its steps
        assert np.isclose(d["rewards"].astype(float).sum(),
                          np.nansum(store.column("episode_returns")))
    four = mgdt_finetune.select(data, tmp_path / "b.h5", suite, ("breakout",))
    with HistoryStore(four) as store, HistoryStore(data) as full:
        assert store.n_histories == 2 and store.column("task_ids").tolist() == [0, 0]
        assert (store.read(1)["obs"] == full.read(1)["obs"]).all()


def test_mgdt_minatar_runs_end_to_end_at_smoke_size(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "mgdt-minatar", "--preset", "smoke", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    games = list(MinAtar.known)
    assert report["games"] == games
    assert set(report["iqm"]) == {"DT-expert", "DT", "BC", "data"}
    for s in report["iqm"].values():
        assert s["ci"][0] <= s["mean"] <= s["ci"][1]
    for g in games:
        for method in ("DT-expert", "DT", "BC"):
            assert report["per_game"][g][method]["n_episodes"] == 2
        assert report["per_game"][g]["data"]["n_episodes"] >= 1
    assert (out / "mgdt.png").stat().st_size > 0
    # a rerun reuses everything and reports the same numbers
    assert main(["run", "mgdt-minatar", "--preset", "smoke", "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["iqm"] == report["iqm"]
    # the checkpoints evaluate from the command line, with the return modes of their layout
    evaluate = ["evaluate", "--episodes", "1", "--rollouts", "1", "--return-mode"]
    capsys.readouterr()
    assert main(evaluate + ["expert", str(out / "dt" / "model.pt")]) == 0
    assert main(evaluate + ["target", "--target-return", "3", str(out / "dt" / "model.pt")]) == 0
    assert main(evaluate + ["expert", str(out / "bc" / "model.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no return slot" in err


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    suite = MinAtar(games=("breakout", "space_invaders"), max_steps=40)
    cfg = GenerateConfig(source="dqn", source_config={"learning_starts": 20, "capacity": 100},
                         steps=200, seeds_per_task=1, chunk_size=2)
    return generate(suite, tmp_path_factory.mktemp("replay") / "r.h5", cfg, progress=False)


def test_an_interrupted_dt_training_on_replay_data_resumes_to_the_same_weights(
        replay, tmp_path, monkeypatch):
    import signal

    import torch

    import icrl.train
    from icrl.checkpoint import load_policy
    from icrl.data.windows import WindowSampler
    from icrl.models.policy import ModelSpec
    from icrl.models.transformer import TransformerConfig
    from icrl.train import TrainConfig, train

    spec = ModelSpec(layout="dt", encoder="patch", patch=5, context=4, transformer=
                     TransformerConfig(n_layer=1, n_head=2, d_model=16, d_ff=32))
    cfg = TrainConfig(steps=10, batch_size=4, warmup_steps=2, checkpoint_every=3)
    train(replay, tmp_path / "whole", spec, cfg, progress=False)
    served = []

    class Interrupting(WindowSampler):
        def __next__(self):
            served.append(1)
            if len(served) == 5:
                signal.raise_signal(signal.SIGINT)
            return super().__next__()

    monkeypatch.setattr(icrl.train, "WindowSampler", Interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(replay, tmp_path / "split", spec, cfg, progress=False)
    monkeypatch.undo()
    train(replay, tmp_path / "split", spec, cfg, progress=False)
    a, b = (load_policy(tmp_path / r / "model.pt")[1]["state_dict"] for r in ("whole", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_replay_files_of_other_games_or_damaged_are_one_line_errors(replay, tmp_path, capsys):
    args = ["experiment", "mgdt-scaling", "--preset", "smoke", "--out", str(tmp_path / "x")]
    assert main(args + ["--data", str(replay)]) == 2          # 2 of the 5 games
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds data of" in err
    cut = tmp_path / "cut.h5"
    cut.write_bytes(replay.read_bytes()[:5000])
    assert main(args + ["--data", str(cut)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corrupt or truncated" in err
    assert main(["experiment", "context-size", "--out", str(tmp_path / "y"),
                 "--data", str(replay)]) == 2
    assert "makes its own data" in capsys.readouterr().err


def test_generate_takes_a_suite_of_chosen_games(tmp_path, capsys):
    out = tmp_path / "b.h5"
    assert main(["generate", "minatar", "--games", "breakout", "--max-steps", "30", "--source",
                 "dqn", "--steps", "40", "--seeds-per-task", "1", "--set", "learning_starts=10",
                 "--out", str(out)]) == 0
    with HistoryStore(out) as store:
        assert store.family_config() == {"name": "minatar", "games": ["breakout"],
                                         "max_steps": 30}
    assert main(["generate", "darkroom", "--games", "breakout", "--out", str(tmp_path / "d")]) == 2
    assert "for game suites" in capsys.readouterr().err


def test_the_scaling_and_finetuning_experiments_run_at_smoke_size(tmp_path):
    run = tmp_path / "run"
    assert main(["run", "mgdt-minatar", "--preset", "smoke", "--out", str(run)]) == 0
    data = str(run / "replay.h5")
    assert main(["experiment", "mgdt-scaling", "--preset", "smoke", "--data", data,
                 "--out", str(tmp_path / "scaling")]) == 0
    report = json.loads((tmp_path / "scaling" / "report.json").read_text())
    params = [s["params"] for s in report["sizes"]]
    assert len(params) == 3 and params[1] >= 4 * params[0] and params[2] >= 4 * params[1]
    assert (tmp_path / "scaling" / "scaling.png").exists()
    assert main(["experiment", "mgdt-finetune", "--preset", "smoke", "--data", data,
                 "--out", str(tmp_path / "finetune")]) == 0
    report = json.loads((tmp_path / "finetune" / "report.json").read_text())
    assert report["game"] == "breakout" and "breakout" not in report["pretrained_on"]
    assert {"normalised", "n_episodes"} <= set(report["finetuned"]) and report["scratch"]
    assert (tmp_path / "finetune" / "finetune.png").exists()
