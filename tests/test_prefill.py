"""InContextAgent.prefill: recorded timesteps enter the context as if the agent had acted them."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from icrl.agent import InContextAgent, RecomputingAgent
from icrl.envs import make_family
from icrl.envs.spec import ObsSpec
from icrl.models.policy import ModelSpec, PolicyConfig, SequencePolicy
from icrl.models.transformer import TransformerConfig

FAMILY = make_family("darkroom")
GOALS = FAMILY.tasks()[[3, 17, 40, 62, 80]]
STEPS = 33   # past an episode end (20) and several slides of the 8-step window


def small_policy(layout="ad", backbone="transformer") -> SequencePolicy:
    """Random weights, scaled up so that every input visibly moves the logits."""
    torch.manual_seed(0)
    policy = SequencePolicy(PolicyConfig(ObsSpec.discrete((9, 9)), 5, 20, ModelSpec(
        context=8, layout=layout, backbone=backbone,
        transformer=TransformerConfig(n_layer=2, n_head=2, d_model=32, d_ff=64))))
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return policy.eval()


def greedy_run(policy):
    """A greedy agent acting STEPS steps: its recorded timesteps, the next observation, the
    logits it gives there, and the agent."""
    agent = InContextAgent(policy, greedy=True)
    agent.start(len(GOALS))
    env = FAMILY.make(GOALS)
    obs = env.reset()
    record = []
    for _ in range(STEPS):
        logits = agent._walk(obs)  # act(), keeping the return-to-go the dt layout chose
        actions = agent.pending.numpy()
        rtg = None
        if "return" in logits:
            rtg = (logits["return"].argmax(-1) + policy.cfg.model.return_low).numpy()
        next_obs, rewards, done = env.step(actions)
        agent.observe(rewards, done)
        record.append((obs, actions, rewards, done, rtg))
        obs = env.reset(done) if done.any() else next_obs
    return record, obs, agent.logits(obs), agent


def prefilled(cls, policy, record) -> InContextAgent:
    agent = cls(policy, greedy=True)
    agent.start(len(GOALS))
    for obs, actions, rewards, done, rtg in record:
        agent.prefill(obs, actions, rewards, done, returns_to_go=rtg)
    return agent


@pytest.mark.parametrize("layout,backbone", [("ad", "transformer"), ("dt", "transformer"),
                                             ("ad", "gru")])
def test_prefill_reaches_the_state_of_acting(layout, backbone):
    policy = small_policy(layout, backbone)
    record, obs, logits, acted = greedy_run(policy)
    agent = prefilled(InContextAgent, policy, record)
    for name in ("prev_action", "prev_reward", "step_in_episode"):
        assert torch.equal(getattr(agent, name), getattr(acted, name)), name
    assert torch.equal(agent.logits(obs), logits)


@pytest.mark.parametrize("layout", ["ad", "dt"])
def test_prefilled_cache_equals_recomputing(layout):
    policy = small_policy(layout)
    record, obs, _, _ = greedy_run(policy)
    cached = prefilled(InContextAgent, policy, record).logits(obs)
    recomputed = prefilled(RecomputingAgent, policy, record).logits(obs)
    torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=1e-5)


def test_prefill_then_act_draws_the_same_random_numbers():
    """Prefill draws no random numbers: a sampling agent acts after it as its seed says."""
    policy = small_policy()
    record, obs, _, _ = greedy_run(policy)
    runs = []
    for _ in range(2):
        agent = InContextAgent(policy, temperature=1.0, seed=5)
        agent.start(len(GOALS))
        for step in record:
            agent.prefill(*step[:4])
        runs.append(agent.act(obs))
    assert (runs[0] == runs[1]).all()


def test_bad_input_raises_and_feeds_nothing():
    n = len(GOALS)
    obs, actions = np.full((n, 2), 4), np.zeros(n, dtype=np.int64)
    rewards, done = np.zeros(n, dtype=np.float32), np.zeros(n, dtype=bool)
    policy = small_policy()
    agent = InContextAgent(policy, greedy=True)
    with pytest.raises(RuntimeError, match="start"):
        agent.prefill(obs, actions, rewards, done)
    agent.start(n)
    bad = [
        dict(actions=np.zeros(n - 1, dtype=np.int64)),
        dict(actions=np.zeros(n)),                              # floats
        dict(actions=np.zeros(n, dtype=bool)),
        dict(actions=np.full(n, 5)),                            # out of range
        dict(actions=np.full(n, -1)),
        dict(rewards=np.full(n, np.nan)),
        dict(rewards=np.zeros(n + 1)),
        dict(rewards=np.array(["a"] * n)),
        dict(done=np.zeros(n, dtype=int)),                      # indices, not a mask
        dict(obs=np.full((n, 3), 4)),
        dict(obs=np.full((n, 2), 9)),                           # off the grid
        dict(returns_to_go=np.zeros(n)),                        # ad has no return slot
    ]
    for change in bad:
        args = {"obs": obs, "actions": actions, "rewards": rewards, "done": done, **change}
        with pytest.raises(ValueError):
            agent.prefill(**args)
    clean = InContextAgent(policy, greedy=True)
    clean.start(n)
    assert torch.equal(agent.logits(obs), clean.logits(obs))  # nothing was fed
    with pytest.raises(RuntimeError, match="observe"):
        agent.prefill(obs, actions, rewards, done)              # a step is pending

    dt = InContextAgent(small_policy("dt"), greedy=True)
    dt.start(n)
    for rtg in (None, np.full(n, np.inf), np.zeros(n, dtype=bool), np.zeros(n - 1)):
        with pytest.raises(ValueError, match="returns_to_go"):
            dt.prefill(obs, actions, rewards, done, returns_to_go=rtg)
    dt.prefill(obs, actions, rewards, done, returns_to_go=np.full(n, 12.0))


def test_docs_example_runs():
    """The prefill example of docs/api.md, on a small policy and three goals."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    [code] = [c for c in re.findall(r"```python\n(.*?)```", doc, re.S) if "agent.prefill(" in c]
    ns = {"np": np, "InContextAgent": InContextAgent, "policy": small_policy(),
          "family": FAMILY, "tasks": GOALS[:3]}
    exec(code, ns)
    assert ns["actions"].shape == (3,) and ns["agent"].step_in_episode.tolist() == [0, 0, 0]
