"""The examples of docs/api.md, run for real on a tiny model, and the InContextAgent contract.

The blocks marked `<!-- test: NAME -->` in docs/api.md are executed in a temporary directory; the
generate/train blocks get tiny sizes substituted for their keyword arguments.
"""
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from icrl.agent import InContextAgent
from icrl.checkpoint import load_policy
from icrl.envs import make_family
from icrl.evaluate import rollout
from icrl.envs.spec import ObsSpec
from icrl.models.policy import ModelSpec, PolicyConfig, SequencePolicy
from icrl.models.transformer import TransformerConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
BLOCK = re.compile(r"```python\n((?:(?!```).)*)```\n<!-- test: (\w+) -->", re.S)
TINY = {"n_episodes": 4, "seeds_per_task": 1, "every": 1, "expert_episodes": 2, "steps": 2,
        "batch_size": 4, "context": 40, "n_layer": 1, "n_head": 2, "d_model": 16, "d_ff": 32}
CKPT = "runs/darkroom/ad/seed0/model.pt"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models step fastest on one thread, and much faster when other processes hold cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def examples() -> dict:
    return {name: code for code, name in BLOCK.findall(DOC.read_text())}


def shrink(code: str) -> str:
    pattern = r"\b(%s)=[0-9.e-]+" % "|".join(TINY)
    return re.sub(pattern, lambda m: f"{m.group(1)}={TINY[m.group(1)]}", code)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Runs the generate and train examples (tiny) once; the other examples read their output."""
    d = tmp_path_factory.mktemp("api")
    cwd = os.getcwd()
    os.chdir(d)
    try:
        blocks = examples()
        for name in ("generate", "train"):
            code = shrink(blocks[name])
            assert code != blocks[name], f"no sizes substituted in the {name} example"
            exec(code, {})
    finally:
        os.chdir(cwd)
    assert (d / CKPT).is_file() and (d / "runs/darkroom/ed/seed0/model.pt").is_file()
    return d


@pytest.fixture
def run_example(workdir, monkeypatch):
    """run_example(name, ns=None) -> the namespace after executing that docs example; every
    InContextAgent.act call is logged in the returned namespace under "_acts"."""
    monkeypatch.chdir(workdir)
    log = []
    act = InContextAgent.act

    def logged(self, obs):
        actions = act(self, obs)
        log.append(actions.copy())
        return actions

    monkeypatch.setattr(InContextAgent, "act", logged)

    def run(name, ns=None):
        ns = {} if ns is None else ns
        exec(examples()[name], ns)
        ns["_acts"] = log
        return ns
    return run


@pytest.fixture
def policy(workdir):
    return load_policy(workdir / CKPT)[0]


@pytest.fixture
def sharp_policy():
    """A small untrained policy (context 12) with large weights, so that differences in context
    show in the logits."""
    torch.manual_seed(0)
    policy = SequencePolicy(PolicyConfig(ObsSpec.discrete((9, 9)), 5, 20, ModelSpec(
        context=12, transformer=TransformerConfig(n_layer=2, n_head=2, d_model=16, d_ff=32))))
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return policy.eval()


def drive(agent, env, n_episodes):
    """The batched loop of the docs; returns (actions (steps, n), returns (n, n_episodes))."""
    agent.start(env.n)
    obs, acts = env.reset(), []
    returns = np.zeros((env.n, n_episodes))
    episode = np.zeros(env.n, dtype=int)
    while episode.min() < n_episodes:
        acts.append(agent.act(obs))
        obs, rewards, done = env.step(acts[-1])
        agent.observe(rewards, done)
        active = episode < n_episodes
        returns[active, episode[active]] += rewards[active]
        episode += done
        if done.any():
            obs = env.reset(done)
    return np.stack(acts), returns


def test_docs_mark_every_example():
    assert set(examples()) == {"generate", "train", "gym_loop", "new_task", "batched", "evaluate"}


def test_gym_loop_example_matches_the_batched_env(run_example, policy):
    ns = run_example("gym_loop")
    gym_actions = np.stack(ns["_acts"])
    assert ns["returns"].shape == (3, 2) and ns["obs"].shape == (3, 2)
    assert ns["actions"].shape == (3,) and ns["actions"].dtype == np.int64
    assert (ns["finished"] == 2).all() and len(ns["_acts"]) == 2 * 20
    assert ((ns["returns"] >= 0) & (ns["returns"] <= 20)).all()
    # The same goals in the batched env, same seed: the same actions and returns.
    env = make_family("darkroom").make(np.array(ns["goals"]))
    acts, returns = drive(InContextAgent(policy, seed=0), env, 2)
    np.testing.assert_array_equal(gym_actions, acts)
    np.testing.assert_array_equal(ns["returns"], returns)

    run_example("new_task", ns)
    assert tuple(ns["obs"][0]) == (4, 4) and tuple(ns["envs"][0].unwrapped.task) == (0, 0)
    # Row 0 holds its one new step; rows 1, 2 slid (context 40: kept 30) and added one.
    assert ns["agent"].state.length.tolist() == [1, 31, 31]
    assert ns["actions"].shape == (3,)


def test_batched_example_takes_the_actions_of_rollout(run_example, policy):
    ns = run_example("batched")
    example_actions = np.stack(ns["_acts"])
    assert ns["returns"].shape == (16, 10) and (ns["episode"] == 10).all()

    steps = []

    class Recording(type(ns["family"])):
        def make(self, tasks, seed=0):
            env = super().make(tasks, seed)
            step = env.step
            env.step = lambda a: (steps.append(np.array(a)), step(a))[1]
            return env

    returns = rollout(policy, Recording(), ns["tasks"], 10, temperature=1.0, seed=0)
    np.testing.assert_array_equal(example_actions, np.stack(steps))
    np.testing.assert_array_equal(ns["returns"], returns)


def test_evaluate_example(run_example):
    ns = run_example("evaluate")
    assert ns["returns"].shape == (4, 16, 40) and ns["curve"].shape == (40,)
    assert ns["one"].shape == (16, 40) and ns["oracle"] > 0


def test_same_seed_same_actions(policy):
    family = make_family("darkroom")
    tasks = family.tasks()[:6]
    a, _ = drive(InContextAgent(policy, seed=3), family.make(tasks), 3)
    b, _ = drive(InContextAgent(policy, seed=3), family.make(tasks), 3)
    c, _ = drive(InContextAgent(policy, seed=4), family.make(tasks), 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_greedy_actions_are_the_argmax_of_logits(sharp_policy):
    """A greedy agent's action at step t equals the argmax of the logits of another agent that
    replayed steps 0..t-1, also after the window slid (context 12)."""
    rng = np.random.default_rng(0)
    trace = [(rng.integers(0, 9, size=(4, 2)), rng.integers(0, 2, size=4).astype(np.float32),
              np.full(4, t % 5 == 4)) for t in range(30)]   # obs, reward, done (5-step episodes)
    agent = InContextAgent(sharp_policy, greedy=True)
    agent.start(4)
    actions = []
    for obs, rewards, done in trace:
        actions.append(agent.act(obs))
        agent.observe(rewards, done)
    assert len(np.unique(actions)) > 1
    for t in (0, 5, 11, 12, 13, 29):
        replay = InContextAgent(sharp_policy, greedy=True)
        replay.start(4)
        for (obs, rewards, done), expected in zip(trace[:t], actions):
            np.testing.assert_array_equal(replay.act(obs), expected)
            replay.observe(rewards, done)
        logits = replay.logits(trace[t][0])
        np.testing.assert_array_equal(logits.argmax(-1).numpy(), actions[t])


@pytest.mark.parametrize("rows", [[2], np.array([False, False, True, False])])
def test_reset_one_row(sharp_policy, rows):
    family = make_family("darkroom")
    env = family.make(family.tasks()[[3, 30, 50, 77]])
    reset, kept = InContextAgent(sharp_policy, seed=1), InContextAgent(sharp_policy, seed=1)
    reset.start(4)
    kept.start(4)
    obs = env.reset()
    for _ in range(25):
        actions = reset.act(obs)
        np.testing.assert_array_equal(kept.act(obs), actions)
        obs, rewards, done = env.step(actions)
        reset.observe(rewards, done)
        kept.observe(rewards, done)
        obs = env.reset(done) if done.any() else obs
    reset.reset(rows)
    fresh = InContextAgent(sharp_policy)
    fresh.start(4)
    after, before, first = reset.logits(obs), kept.logits(obs), fresh.logits(obs)
    torch.testing.assert_close(after[2], first[2], rtol=0, atol=1e-6)
    others = [0, 1, 3]
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=1e-6)
    assert not torch.allclose(after[2], before[2], atol=1e-3)


def test_agent_misuse_raises(policy):
    agent = InContextAgent(policy)
    with pytest.raises(RuntimeError):
        agent.act(np.zeros((2, 2), dtype=int))          # before start()
    agent.start(2)
    obs = np.full((2, 2), 4)
    with pytest.raises(RuntimeError):
        agent.observe(np.zeros(2), np.zeros(2, dtype=bool))   # observe without act
    agent.act(obs)
    with pytest.raises(RuntimeError):
        agent.act(obs)                                   # act twice without observe
    agent.observe(np.zeros(2), np.zeros(2, dtype=bool))
    for bad in (np.zeros((3, 2), dtype=int), np.zeros(2, dtype=int), np.zeros((2, 3), dtype=int)):
        with pytest.raises(ValueError):
            agent.act(bad)
    assert agent.act(obs).shape == (2,)                  # still usable after the errors


@pytest.mark.parametrize("n", [0, -1, 2.0])
def test_start_needs_a_positive_integer(policy, n):
    with pytest.raises(ValueError):
        InContextAgent(policy).start(n)


@pytest.mark.parametrize("temperature", [0, -1.0])
def test_temperature_must_be_positive(workdir, policy, temperature):
    with pytest.raises(ValueError):
        InContextAgent(policy, temperature=temperature)
    with pytest.raises(ValueError):
        InContextAgent.load(workdir / CKPT, temperature=temperature)
