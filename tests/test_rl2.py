"""RL²: GAE as defined, exact resumption, checkpoints that the AD evaluation loads, in-context
learning on the bandit, and the command line around it."""
import os
import signal

import pytest
import torch

import icrl.baselines.rl2 as rl2
from icrl.baselines.rl2 import RL2Config, _gae, train_rl2
from icrl.checkpoint import load_policy
from icrl.cli import main
from icrl.envs import make_family
from icrl.evaluate import evaluate
from icrl.experiments.incontext import parse_methods
from icrl.generate import GenerateConfig, generate


@pytest.fixture(scope="module")
def split_files(tmp_path_factory):
    """Tiny history files whose only use here is their stored split."""
    d = tmp_path_factory.mktemp("rl2")
    return {name: generate(make_family(name), d / f"{name}.h5",
                           GenerateConfig(source="random", n_episodes=2, seeds_per_task=1,
                                          n_test=n_test), progress=False)
            for name, n_test in (("darkroom", 16), ("bandit", 500))}


def tiny(**changes) -> RL2Config:
    return RL2Config(**{"steps": 3 * 8 * 40, "n_envs": 8, "trial_episodes": 2, "hidden": 16,
                        "layers": 1, "unroll": 7, "epochs": 2, "minibatches": 2,
                        "checkpoint_every": 1, "log_every": 1, **changes})


def test_gae_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.rand(3, 6, generator=g), torch.rand(3, 6, generator=g)
    following = torch.rand(3, generator=g)
    gamma, lam = 0.9, 0.8
    nexts = torch.cat([values[:, 1:], following[:, None]], dim=1)
    deltas = rewards + gamma * nexts - values
    expected = torch.stack([sum((gamma * lam) ** (k - t) * deltas[:, k] for k in range(t, 6))
                            for t in range(6)], dim=1)
    assert torch.allclose(_gae(rewards, values, following, gamma, lam), expected, atol=1e-6)


def test_interrupted_run_resumes_to_the_same_weights(split_files, tmp_path, monkeypatch):
    data = split_files["darkroom"]
    whole = train_rl2(data, tmp_path / "whole", tiny(), progress=False)

    trials = []
    trial = rl2._Learner.trial

    def interrupted(self, *args):  # Ctrl-C during the second trial
        trials.append(1)
        if len(trials) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        yield from trial(self, *args)

    monkeypatch.setattr(rl2._Learner, "trial", interrupted)
    with pytest.raises(KeyboardInterrupt, match="training state saved"):
        train_rl2(data, tmp_path / "parts", tiny(), progress=False)
    monkeypatch.setattr(rl2._Learner, "trial", trial)
    parts = train_rl2(data, tmp_path / "parts", tiny(), progress=False)
    a, b = (torch.load(p, weights_only=True)["state_dict"] for p in (whole, parts))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.load(parts, weights_only=True)["step"] == tiny().steps


def test_other_settings_are_refused_on_resume(split_files, tmp_path):
    train_rl2(split_files["darkroom"], tmp_path, tiny(steps=8 * 40), progress=False)
    from icrl.errors import UserError
    with pytest.raises(UserError, match="other settings .*lr"):
        train_rl2(split_files["darkroom"], tmp_path, tiny(lr=1e-3), progress=False)
    # more steps is a continuation, not a conflict
    train_rl2(split_files["darkroom"], tmp_path, tiny(steps=2 * 8 * 40), progress=False)


def test_checkpoint_is_a_recurrent_policy_that_evaluate_runs(split_files, tmp_path):
    ckpt = train_rl2(split_files["darkroom"], tmp_path, tiny(), progress=False)
    policy, meta = load_policy(ckpt)
    assert policy.cfg.model.backbone == "gru" and meta["data"]["source"] == "rl2"
    family = make_family("darkroom")
    test = family.tasks()[meta["split"]["test"]]
    assert not set(meta["split"]["test"]) & set(meta["split"]["train"])
    returns = evaluate(policy, family, test, n_episodes=3, rollouts_per_task=2)
    assert returns.shape == (2, 16, 3) and ((returns >= 0) & (returns <= 20)).all()


def test_rl2_learns_in_context_on_the_bandit(split_files, tmp_path):
    """A short run must already exploit what its own pulls revealed: on held-out tasks its later
    pulls pay more than its first ones and than random pulls (0.5 on average)."""
    cfg = RL2Config(steps=400_000, n_envs=128, trial_episodes=20, hidden=64, layers=1,
                    unroll=20, epochs=1, minibatches=1, lr=3e-3, gamma=0.9, entropy_coef=0.03)
    policy, meta = load_policy(train_rl2(split_files["bandit"], tmp_path, cfg, progress=False))
    family = make_family("bandit")
    tasks = family.tasks()[meta["split"]["test"][:200]]
    returns = evaluate(policy, family, tasks, n_episodes=20, rollouts_per_task=2)
    first, last = returns[..., :3].mean(), returns[..., -10:].mean()
    best = family.oracle_returns(tasks).mean()
    assert last > first + 0.1 and last > 0.7, (first, last, best)


def test_methods_are_checked():
    assert parse_methods("rl2, AD") == ("AD", "RL2")
    from icrl.errors import UserError
    for bad in ("", "AD,PPO", ",,"):
        with pytest.raises(UserError, match="--methods"):
            parse_methods(bad)


def test_command_line(split_files, tmp_path, capsys):
    out = tmp_path / "rl2"
    assert main(["rl2", str(split_files["darkroom"]), "--out", str(out), "--steps", "320",
                 "--n-envs", "8", "--trial-episodes", "2", "--hidden", "16", "--layers", "1"]) == 0
    assert (out / "model.pt").is_file()
    assert main(["rl2", str(tmp_path / "missing.h5"), "--out", str(out)]) == 2
    assert main(["rl2", str(split_files["darkroom"]), "--out", str(out), "--n-envs", "0"]) == 2
    assert main(["rl2", str(split_files["darkroom"]), "--out", str(out), "--n-envs", "1e12"]) == 2
    assert main(["run", "darkroom", "--out", str(tmp_path / "r"), "--methods", "AD,DQN"]) == 2
    err = capsys.readouterr().err
    assert "--n-envs" in err and "--methods" in err and "parallel trials need" in err
