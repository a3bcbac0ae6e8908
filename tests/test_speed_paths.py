"""The fast paths give the results of the straightforward ones they replace.

- Dyna Q-learning's planning sweeps (only tried pairs, a task stops once a sweep leaves it
  unchanged) against the plain sweep over every task's whole table: the same histories and the
  same Q-tables, bit for bit, for the same seeds.
- The KV cache's aligned path (every row at the same length: slices, no mask) against its
  general per-row path, step by step through slides and resets.
- RoPE as a complex rotation against the textbook pairwise formula.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from icrl.agent import InContextAgent
from icrl.envs import make_family
from icrl.envs.spec import ObsSpec
from icrl.models.policy import ModelSpec, PolicyConfig, SequencePolicy
from icrl.models.transformer import TransformerConfig, rope_table, rotate
from icrl.sources import QLearning, QLearningConfig, collect


class PlainSweepQLearning(QLearning):
    """The reference: every sweep backs up every (task, s, a) of the table from the state values
    before the sweep, and keeps the new value where the pair was tried."""

    def end_episode(self):
        self.episode += 1
        if self.config.planning_sweeps == 0:
            return
        n_states = self.q.shape[1]
        next_flat = (self.next_state + self.rows[:, None, None] * n_states).ravel()
        q = self.q.reshape(-1)
        for _ in range(self.config.planning_sweeps):
            values = self.q.max(axis=2)
            backup = self.reward.ravel() + self.config.gamma * values.ravel()[next_flat]
            np.copyto(q, q + self.config.lr * (backup - q), where=self.tried.ravel())


DYNA = {"lr": 1.0, "gamma": 0.9, "init_value": 5.0, "eps_start": 0.0, "planning_sweeps": 30}


@pytest.mark.parametrize("family_name, config, episodes", [
    ("darkroom", DYNA, 40),                                       # the Dark Room preset's source
    ("darkroom", {**DYNA, "lr": 0.5, "eps_start": 0.3, "planning_sweeps": 7}, 30),
    ("darkroom-hard", {**DYNA, "init_value": 0.5}, 40),          # sparse reward
    ("keydoor", {**DYNA, "init_value": 0.5, "reward_stages": 3}, 15),
])
def test_planning_sweeps_match_the_plain_sweep(family_name, config, episodes):
    family = make_family(family_name)
    tasks = family.tasks()[np.random.default_rng(1).permutation(len(family.tasks()))[:60]]
    runs = []
    for cls in (PlainSweepQLearning, QLearning):
        source = cls(family.obs_spec.high, family.n_actions, len(tasks),
                     QLearningConfig(**config), seed=5)
        runs.append((source, collect(family, tasks, source, episodes, seed=5)))
    (plain, h_plain), (fast, h_fast) = runs
    for key in ("obs", "actions", "rewards", "dones", "episode_returns"):
        np.testing.assert_array_equal(getattr(h_fast, key), getattr(h_plain, key), err_msg=key)
    np.testing.assert_array_equal(fast.q.view(np.uint32), plain.q.view(np.uint32))
    # The learners did learn, so the sweeps had values to carry.
    assert h_fast.episode_returns[:, -1].mean() > h_fast.episode_returns[:, 0].mean()


def _policy(layout: str, spec: ObsSpec, context: int) -> SequencePolicy:
    torch.manual_seed(3)
    model = ModelSpec(context=context, layout=layout, patch=2, return_low=-3, return_high=5,
                      transformer=TransformerConfig(n_layer=2, n_head=2, d_model=16, d_ff=32))
    policy = SequencePolicy(PolicyConfig(spec, 4, 6, model)).eval()
    with torch.no_grad():  # larger than the init, so a wrong key or position shows
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return policy


class GeneralPathAgent(InContextAgent):
    """The cached agent, told before every step that its rows may differ in length: every step
    then takes the per-row path (indexed writes, a mask over the whole capacity)."""

    def _feed(self, slot, inputs):
        self.state.common = None
        return super()._feed(slot, inputs)


@pytest.mark.parametrize("layout, spec", [("ad", ObsSpec.discrete((5, 7))),
                                          ("dt", ObsSpec.image(4, 6, 2))])   # 9 tokens a step
def test_aligned_path_matches_the_general_path(layout, spec):
    policy, batch, context = _policy(layout, spec, context=5), 3, 5
    fast, general = InContextAgent(policy, seed=2), GeneralPathAgent(policy, seed=2)
    rng = np.random.default_rng(0)
    for agent in (fast, general):
        agent.start(batch)
    aligned_steps = 0
    for t in range(4 * context):
        if t == 2 * context:   # all rows reset together: aligned again, at length 0
            fast.reset(np.ones(batch, dtype=bool))
            general.reset(np.ones(batch, dtype=bool))
        aligned_steps += fast.state.common is not None
        obs = rng.integers(0, spec.bounds, size=(batch, *spec.shape))
        logits = fast.logits(obs)
        torch.testing.assert_close(logits, general.logits(obs), rtol=1e-5, atol=1e-5)
        actions = fast.pending.numpy()
        np.testing.assert_array_equal(actions, general.pending.numpy())
        rewards = rng.integers(0, 2, size=batch).astype(np.float32)
        done = np.full(batch, (t + 1) % 3 == 0)
        fast.observe(rewards, done)
        general.observe(rewards, done)
    assert aligned_steps == 4 * context        # the fast agent never left the aligned path
    assert fast.state.length.tolist() == general.state.length.tolist()


def test_cache_notices_rows_that_differ_and_realign():
    policy = _policy("ad", ObsSpec.discrete((5, 7)), context=4)
    agent = InContextAgent(policy)
    agent.start(2)
    obs = np.zeros((2, 2), dtype=np.int64)
    # context 4 keeps 3 when it slides: row 0 slides to row 1's length and the rows realign
    for reset_rows, common in [(None, 1), ([1], None), (None, None), (None, None), (None, 4),
                               ([0, 1], 1)]:
        if reset_rows is not None:
            agent.reset(reset_rows)
        agent.act(obs)
        agent.observe(np.zeros(2), np.zeros(2, dtype=bool))
        assert agent.state.common == common, agent.state.length.tolist()


def test_rope_is_the_pairwise_rotation():
    head_dim, base = 8, 10000.0
    x = torch.randn(3, 7, 2, 2, head_dim)            # (B, L, q/k, heads, head_dim)
    table = rope_table(7, head_dim, base, scale=1.0)
    rotated = rotate(x, table)
    angles = torch.arange(7, dtype=torch.float64)[:, None] * \
        base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    cos = angles.cos().float()[None, :, None, None]
    sin = angles.sin().float()[None, :, None, None]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    expected = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    torch.testing.assert_close(rotated, expected, rtol=0, atol=1e-6)


def test_rope_table_does_not_depend_on_its_length():
    short, long = rope_table(10, 16, 10000.0, 0.25), rope_table(300, 16, 10000.0, 0.25)
    assert torch.equal(short, long[:10])
    # the query rows carry the attention scale, the key rows do not
    torch.testing.assert_close(short[:, 0], short[:, 1] * 0.25)
