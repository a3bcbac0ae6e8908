"""The Multi-Game Decision Transformer's model: its tokens, its attention (the patches of one frame
see each other, everything else is causal) and its expert action inference.

The exact-cache property for frames of several patches (dt, bc and ad layouts, slides and
staggered resets) is in test_kv_property.py; here the cache is checked against the recomputing
agent in every return mode, and the per-row path against stale slots.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from icrl.agent import InContextAgent, RecomputingAgent, check_return_options, \
    expert_return_logits
from icrl.envs import make_family
from icrl.envs.spec import ObsSpec
from icrl.evaluate import evaluate, rollout
from icrl.models.encoders import PatchEmbedding
from icrl.models.layout import return_bins, reward_sign
from icrl.models.policy import ModelSpec, PolicyConfig, SequencePolicy
from icrl.models.transformer import CausalTransformer, TransformerConfig

FRAME = ObsSpec.image(4, 6, 2)        # 2x2 patches: a 2x3 grid of them, 6 tokens per frame
GRID = ObsSpec.discrete((5, 7))
SMALL = TransformerConfig(n_layer=2, n_head=2, d_model=16, d_ff=32)
N_ACTIONS, LOW, HIGH = 4, -3, 5       # 9 return bins


def make_policy(layout="dt", spec=FRAME, encoder=None, context=4, seed=0) -> SequencePolicy:
    """A small random policy; patches for frames unless told otherwise."""
    encoder = encoder or ("patch" if spec.kind == "image" else "auto")
    torch.manual_seed(seed)
    model = ModelSpec(context=context, layout=layout, encoder=encoder, patch=2, return_low=LOW,
                      return_high=HIGH, transformer=SMALL)
    policy = SequencePolicy(PolicyConfig(spec, N_ACTIONS, 6, model)).eval()
    with torch.no_grad():  # far larger than the init, so that what a token sees shows
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return policy


def random_inputs(spec: ObsSpec, batch: int, steps: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if spec.kind == "image":
        obs = torch.randint(0, 256, (batch, steps, *spec.shape), generator=g, dtype=torch.uint8)
    else:
        obs = torch.stack([torch.randint(0, h, (batch, steps), generator=g) for h in spec.high],
                          dim=-1)
    return {"obs": obs, "returns_to_go": torch.randint(LOW, HIGH + 1, (batch, steps),
                                                       generator=g).float(),
            "actions": torch.randint(0, N_ACTIONS, (batch, steps), generator=g),
            "rewards": torch.randn(batch, steps, generator=g),
            "prev_action": torch.randint(-1, N_ACTIONS, (batch, steps), generator=g),
            "prev_reward": torch.randn(batch, steps, generator=g),
            "step": torch.randint(0, 6, (batch, steps), generator=g)}


def features(policy, inputs) -> torch.Tensor:
    """The backbone's features, (B, L, tokens_per_step, d)."""
    with torch.no_grad():
        h = policy.backbone(policy.tokens(inputs))
    return h.view(h.shape[0], -1, policy.tokens_per_step, h.shape[-1])


def changed(a, b) -> torch.Tensor:
    """Which tokens' features differ, (L, tokens_per_step) for one row."""
    return (a[0] != b[0]).any(-1)


# -- tokens -------------------------------------------------------------------------------------

def test_patch_tokens_are_the_patches_in_row_major_order():
    torch.manual_seed(0)
    encoder = PatchEmbedding(FRAME, 8, patch=2)
    with torch.no_grad():
        encoder.position.normal_()
    blank = torch.zeros(1, *FRAME.shape, dtype=torch.uint8)
    with torch.no_grad():
        base = encoder(blank)[0]
        for r in range(2):
            for c in range(3):   # only patch (r, c) lit: only token 3r + c changes
                frame = blank.clone()
                frame[0, 2 * r:2 * r + 2, 2 * c:2 * c + 2] = 200
                moved = (encoder(frame)[0] != base).any(-1)
                assert moved.nonzero()[:, 0].tolist() == [3 * r + c]
        # and each token is the projection of its patch's pixels (row, column, channel)
        frame = torch.randint(0, 256, (1, *FRAME.shape), dtype=torch.uint8)
        want = torch.stack([encoder.proj(frame[0, 2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(-1)
                                         .float() / 255) for r in range(2) for c in range(3)])
        torch.testing.assert_close(encoder(frame)[0], want + encoder.position)


def test_return_bins_clip_at_both_ends_and_round_between():
    returns = torch.tensor([-100.0, -20.6, -20.0, -19.6, 3.4, 3.6, 99.4, 100.0, 100.6, 1e6])
    assert return_bins(returns, -20, 100).tolist() == [0, 0, 0, 0, 23, 24, 119, 120, 120, 120]
    # the policy's return classes are these bins: 0 .. high - low
    policy = make_policy()
    bins = policy.target("return", {"returns_to_go": torch.tensor([-50.0, 0.4, 50.0])})
    assert bins.tolist() == [0, 3, HIGH - LOW] and policy.n_classes["return"] == HIGH - LOW + 1


def test_rewards_are_reduced_to_their_sign():
    assert reward_sign(torch.tensor([-3.0, 0.0, 0.5, -1e-3, 7.0])).tolist() == [0, 1, 2, 0, 2]


# -- attention ----------------------------------------------------------------------------------

def rule(i: int, j: int, period: int, group: int, private=()) -> bool:
    """The attention rule, written out: j <= i, or both among the first `group` of one step;
    but a token at a private offset is seen by itself alone."""
    if j % period in private:
        return i == j
    return j <= i or (i // period == j // period and i % period < group and j % period < group)


@pytest.mark.parametrize("period, group, private", [
    (1, 1, ()), (4, 1, ()), (4, 2, ()), (3, 3, ()), (9, 6, ()), (4, 1, (1,)), (9, 6, (6,)),
    (5, 2, (2, 4))])
def test_each_token_depends_on_exactly_the_tokens_the_rule_lets_it_see(period, group, private):
    """Through two layers, feature i changes with token j exactly where the rule says i sees j
    (the rule is transitive, so two layers see no further than one)."""
    torch.manual_seed(0)
    model = CausalTransformer(SMALL, period=period, group=group, private=private).eval()
    L = 3 * period + 1                    # and a last step begun but not finished
    x = torch.randn(1, L, SMALL.d_model)
    with torch.no_grad():
        base = model(x)
        for j in range(L):
            nudged = x.clone()
            nudged[0, j] += torch.randn(SMALL.d_model)   # not a constant: LayerNorm
            moved = (model(nudged)[0] != base[0]).any(-1).tolist()
            assert moved == [rule(i, j, period, group, private) for i in range(L)], f"token {j}"
    assert (model.frame_mask(L, "cpu") is None) == (group == 1 and not private)


def test_mgdt_predicts_each_return_without_the_returns_given():
    """In the mgdt layout a step's return token reaches only that step's action logits: the
    return logits never see a return (in dt they see the earlier ones), and no later
    prediction does either."""
    inputs = random_inputs(FRAME, 1, 3)
    for layout, later_moved in (("mgdt", False), ("dt", True)):
        policy = make_policy(layout)
        nudged = {**inputs, "returns_to_go": inputs["returns_to_go"].clone()}
        nudged["returns_to_go"][0, 1] = torch.where(nudged["returns_to_go"][0, 1] > 0, LOW, HIGH)
        with torch.no_grad():
            a, b = policy(inputs), policy(nudged)
        assert torch.equal(a["return"][:, :2], b["return"][:, :2])      # up to its own step
        assert not torch.equal(a["action"][:, 1], b["action"][:, 1])    # its step's action
        assert torch.equal(a["action"][:, 0], b["action"][:, 0])
        assert (not torch.equal(a["return"][:, 2], b["return"][:, 2])) == later_moved, layout
        assert (not torch.equal(a["action"][:, 2], b["action"][:, 2])) == later_moved, layout
        assert (not torch.equal(a["reward"][:, 1], b["reward"][:, 1])) == later_moved, layout


def test_private_tokens_need_the_transformer():
    with pytest.raises(ValueError, match="only the transformer backbone"):
        SequencePolicy(PolicyConfig(GRID, N_ACTIONS, 6, ModelSpec(layout="mgdt", backbone="gru",
                                                                   transformer=SMALL)))
    with pytest.raises(ValueError, match="private offsets"):
        CausalTransformer(SMALL, period=4, group=2, private=(1,))


def test_a_frames_patches_see_each_other_but_not_the_future():
    policy = make_policy("dt")
    assert (policy.backbone.period, policy.backbone.group) == (9, 6)
    inputs = random_inputs(FRAME, 1, 3)
    base = features(policy, inputs)
    # one pixel of patch 2 of frame 1: every patch of frame 1 and all that follows change
    nudged = {**inputs, "obs": inputs["obs"].clone()}
    nudged["obs"][0, 1, 0, 4, 0] ^= 0xFF
    moved = changed(base, features(policy, nudged))
    assert not moved[0].any()
    assert moved[1:].all()
    # anything at the last timestep changes nothing before it
    other = {"obs": lambda x: x ^ 0xFF, "returns_to_go": lambda x: torch.where(x > 0, LOW, HIGH),
             "actions": lambda x: (x + 1) % N_ACTIONS, "rewards": lambda x: -x}
    for key, change in other.items():
        nudged = {**inputs, key: inputs[key].clone()}
        nudged[key][0, 2] = change(nudged[key][0, 2])
        moved = changed(base, features(policy, nudged))
        assert not moved[:2].any() and moved[2].any(), key


def test_with_group_one_a_later_patch_does_not_reach_an_earlier_one():
    policy = make_policy("dt")
    causal = CausalTransformer(SMALL, period=policy.tokens_per_step, group=1).eval()
    causal.load_state_dict(policy.backbone.state_dict())
    policy.backbone = causal
    inputs = random_inputs(FRAME, 1, 2)
    base = features(policy, inputs)
    nudged = {**inputs, "obs": inputs["obs"].clone()}
    nudged["obs"][0, 1, 0, 4, 0] ^= 0xFF          # patch 2 of frame 1
    moved = changed(base, features(policy, nudged))
    assert moved[1].tolist() == [False, False] + [True] * 7 and not moved[0].any()


@pytest.mark.parametrize("layout, spec, encoder", [("ad", GRID, None), ("dt", GRID, None),
                                                   ("ad", ObsSpec.image(16, 16, 1), "conv")])
def test_one_token_frames_attend_causally(layout, spec, encoder):
    policy = make_policy(layout, spec, encoder)
    assert policy.backbone.group == 1
    inputs = random_inputs(spec, 1, 3)
    base = features(policy, inputs)
    nudged = {**inputs, "obs": inputs["obs"].clone()}
    nudged["obs"][0, 1] = (nudged["obs"][0, 1] + 1) % 5
    moved = changed(base, features(policy, nudged))
    assert not moved[0].any() and moved[1:].all()


def test_a_mask_built_in_inference_mode_serves_training_after():
    model = CausalTransformer(SMALL, period=4, group=3)
    with torch.inference_mode():          # e.g. a slide while evaluating, mid-training
        model(torch.randn(1, 16, SMALL.d_model))
    x = torch.randn(2, 12, SMALL.d_model, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None


def test_the_transformer_rejects_groups_it_cannot_keep():
    with pytest.raises(ValueError, match="group"):
        CausalTransformer(SMALL, period=3, group=4)
    with pytest.raises(ValueError, match="multiple of the period"):
        CausalTransformer(SMALL, period=3, group=2).new_state(2, 4, tokens_per_step=4)


def test_the_per_row_path_never_sees_the_stale_slots_past_its_tokens():
    """After a reset the cache still holds the old keys; the tokens of a group fed one at a time
    must not see them (the aligned path reads only the slots written so far)."""
    torch.manual_seed(0)
    model = CausalTransformer(SMALL, period=4, group=3).eval()
    x = torch.randn(2, 8, SMALL.d_model)
    outs = []
    with torch.inference_mode():
        for per_row in (False, True):
            cache = model.new_state(2, 2, tokens_per_step=4)
            model.step(x, cache)
            cache.reset()
            steps = []
            for t in range(3):
                if per_row:
                    cache.common = None
                steps.append(model.step(x[:, t:t + 1] * 2, cache))
            outs.append(torch.cat(steps, 1))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout, mode", [
    ("dt", {}), ("dt", {"return_mode": "expert"}),
    ("dt", {"return_mode": "target", "target_return": 3.0}), ("bc", {}),
    ("mgdt", {"return_mode": "expert"})])
def test_cached_agent_matches_the_recomputing_one_through_slides(layout, mode):
    policy = make_policy(layout, context=3)
    agents = [cls(policy, seed=4, **mode) for cls in (InContextAgent, RecomputingAgent)]
    rng = np.random.default_rng(0)
    for agent in agents:
        agent.start(5)
    for t in range(10):                   # context 3 keeps 2: slides at steps 3, 4, 5, ...
        obs = rng.integers(0, 256, size=(5, *FRAME.shape), dtype=np.uint8)
        logits = [agent._walk(obs) for agent in agents]
        for name in logits[0]:
            torch.testing.assert_close(logits[0][name], logits[1][name], rtol=1e-5, atol=1e-5)
        assert torch.equal(agents[0].pending, agents[1].pending)
        rewards, done = rng.integers(0, 2, size=5).astype(np.float32), rng.random(5) < 0.3
        for agent in agents:
            agent.observe(rewards, done)


# -- expert action inference ------------------------------------------------------------------

def test_expert_return_logits_add_kappa_times_the_normalised_return():
    logits = torch.randn(3, HIGH - LOW + 1)
    for kappa in (0.0, 1.0, 10.0):
        got = expert_return_logits(logits, LOW, HIGH, kappa)
        for k, R in enumerate(range(LOW, HIGH + 1)):
            torch.testing.assert_close(got[:, k], logits[:, k] + kappa * (R - LOW) / (HIGH - LOW))
    with pytest.raises(ValueError, match="return bins"):
        expert_return_logits(logits, LOW, HIGH + 1, 1.0)


class ReturnRecorder(InContextAgent):
    """The cached agent, remembering the returns-to-go it fed at its last step."""

    def _feed(self, slot, inputs):
        if slot.field == "return":
            self.fed_return = inputs["returns_to_go"].clone()
        return super()._feed(slot, inputs)


def set_return_logits(policy, logits: torch.Tensor):
    """Make the return head say `logits` whatever it sees."""
    with torch.no_grad():
        policy.heads["return"].weight.zero_()
        policy.heads["return"].bias.copy_(logits)


def sampled_returns(policy, n: int, seed: int = 0, **options) -> torch.Tensor:
    agent = ReturnRecorder(policy, seed=seed, **options)
    agent.start(n)
    agent.act(np.zeros((n, *GRID.shape), dtype=np.int64))
    return agent.fed_return


def test_expert_sampling_follows_the_reweighted_distribution():
    """20,000 rows: each bin's frequency is within 0.015 of its probability (the standard error
    is at most 0.0036)."""
    policy = make_policy("dt", GRID)
    base = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, 0.0, 0.5, -1.0])
    set_return_logits(policy, base)
    n = 20_000
    for kappa in (10.0, 2.5, 0.0):
        returns = sampled_returns(policy, n, return_mode="expert", kappa=kappa)
        freq = torch.bincount(returns.long() - LOW, minlength=HIGH - LOW + 1) / n
        want = (base + kappa * torch.arange(HIGH - LOW + 1) / (HIGH - LOW)).softmax(-1)
        assert (freq - want).abs().max() < 0.015, (kappa, freq, want)
    # kappa 0 is plain sampling, draw for draw
    assert torch.equal(sampled_returns(policy, 500, seed=3, return_mode="expert", kappa=0.0),
                       sampled_returns(policy, 500, seed=3))
    # and a large one picks the highest return however unlikely the model finds it
    assert (sampled_returns(policy, 500, return_mode="expert", kappa=1e3) == HIGH).all()


def test_last_logits_are_the_model_s_before_any_reweighting():
    """After act(), last_logits holds what the heads said: the return logits as predicted (the
    expert reweighting is applied only when sampling) and the action logits logits() gives."""
    policy = make_policy("dt", GRID)
    base = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, 0.0, 0.5, -1.0])
    set_return_logits(policy, base)
    obs = np.zeros((3, *GRID.shape), dtype=np.int64)
    agent = InContextAgent(policy, seed=2, return_mode="expert", kappa=10.0)
    agent.start(3)
    agent.act(obs)
    assert torch.allclose(agent.last_logits["return"], base.expand(3, -1))
    twin = InContextAgent(policy, seed=2, return_mode="expert", kappa=10.0)
    twin.start(3)
    assert torch.equal(agent.last_logits["action"], twin.logits(obs))


def test_a_target_return_is_reduced_by_the_rewards_and_renewed_each_episode():
    policy = make_policy("dt", GRID)
    agent = ReturnRecorder(policy, seed=1, return_mode="target", target_return=6.0)
    agent.start(3)
    obs = np.zeros((3, *GRID.shape), dtype=np.int64)
    schedule = [  # rewards, done, and the returns fed at the next step
        ([1.0, 0.0, 2.5], [False, False, False], [5.0, 6.0, 3.5]),
        ([1.0, -1.0, 1.0], [False, True, False], [4.0, 6.0, 2.5]),
        ([0.5, 1.0, 4.0], [True, False, False], [6.0, 5.0, -1.5]),
    ]
    agent.act(obs)
    assert agent.fed_return.tolist() == [6.0, 6.0, 6.0]
    for rewards, done, want in schedule:
        agent.observe(np.array(rewards), np.array(done))
        agent.act(obs)
        assert agent.fed_return.tolist() == want
    agent.observe(np.zeros(3), np.zeros(3, dtype=bool))
    agent.reset([2])                      # a new task: a new episode
    agent.act(obs)
    assert agent.fed_return.tolist() == [6.0, 5.0, 6.0]


def test_each_row_may_have_its_own_target():
    policy = make_policy("dt", GRID)
    agent = ReturnRecorder(policy, return_mode="target", target_return=np.array([1, 2.5, -4]))
    agent.start(3)
    obs = np.zeros((3, *GRID.shape), dtype=np.int64)
    agent.act(obs)
    assert agent.fed_return.tolist() == [1.0, 2.5, -4.0]
    agent.observe(np.array([1.0, 1.0, 1.0]), np.array([False, True, False]))
    agent.act(obs)
    assert agent.fed_return.tolist() == [0.0, 2.5, -5.0]
    with pytest.raises(ValueError, match="target_return has 3 values for 2 rows"):
        agent.start(2)


@pytest.mark.parametrize("options, message", [
    ({"return_mode": "best"}, "return_mode must be one of"),
    ({"return_mode": None}, "return_mode must be one of"),
    ({"return_mode": "target"}, "target_return goes with"),
    ({"target_return": 5.0}, "target_return goes with"),
    ({"return_mode": "expert", "target_return": 5.0}, "target_return goes with"),
    ({"return_mode": "target", "target_return": float("nan")}, "target_return must be a finite"),
    ({"return_mode": "target", "target_return": "5"}, "target_return must be a finite"),
    ({"return_mode": "target", "target_return": True}, "target_return must be a finite"),
    ({"return_mode": "target", "target_return": []}, "target_return must be a finite"),
    ({"return_mode": "target", "target_return": [[1.0]]}, "target_return must be a finite"),
    ({"return_mode": "target", "target_return": [1.0, np.inf]}, "target_return must be a finite"),
    ({"return_mode": "expert", "kappa": -1.0}, "kappa must be"),
    ({"return_mode": "expert", "kappa": float("inf")}, "kappa must be"),
    ({"kappa": True}, "kappa must be"),
])
def test_bad_return_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        InContextAgent(make_policy("dt", GRID), **options)


@pytest.mark.parametrize("layout", ["bc", "ad"])
@pytest.mark.parametrize("options", [{"return_mode": "expert"},
                                     {"return_mode": "target", "target_return": 1.0}])
def test_return_modes_need_a_return_slot(layout, options):
    policy = make_policy(layout, GRID)
    with pytest.raises(ValueError, match="has no return slot"):
        InContextAgent(policy, **options)
    InContextAgent(policy, kappa=3.0)     # sampling (the default) suits every layout


def darkroom_policy(layout: str) -> SequencePolicy:
    family = make_family("darkroom")
    torch.manual_seed(0)
    return SequencePolicy(PolicyConfig(family.obs_spec, family.n_actions, family.episode_len,
                                       ModelSpec(context=8, layout=layout, transformer=SMALL)))


def test_evaluation_passes_the_return_options_on(monkeypatch):
    family, policy = make_family("darkroom"), darkroom_policy("dt")
    tasks = family.tasks()[:4]
    agents = []

    class Spy(InContextAgent):
        def start(self, n):
            agents.append(self)
            super().start(n)

    monkeypatch.setattr("icrl.evaluate.InContextAgent", Spy)
    for options in ({"return_mode": "expert", "kappa": 4.0},
                    {"return_mode": "target", "target_return": 2.0}):
        cached = rollout(policy, family, tasks, 1, seed=1, **options)
        assert np.array_equal(cached, rollout(policy, family, tasks, 1, seed=1, cache=False,
                                              **options))
        assert evaluate(policy, family, tasks, 1, 2, seed=1, chunk_size=4,
                        **options).shape == (2, 4, 1)
        assert len(agents) == 3          # one rollout, then a chunk per repeat
        for agent in agents:
            assert {k: getattr(agent, k) for k in options} == options
        agents.clear()
    # targets per task (or per row) are shared out to the chunks, rows rollout-major
    evaluate(policy, family, tasks, 1, 2, chunk_size=3, return_mode="target",
             target_return=np.array([1.0, 2.0, 3.0, 4.0]))
    assert torch.cat([agent.target for agent in agents]).tolist() == [1, 2, 3, 4] * 2
    with pytest.raises(ValueError, match="target_return has 3 values"):
        evaluate(policy, family, tasks, 1, 2, return_mode="target", target_return=[1, 2, 3])
    with pytest.raises(ValueError, match="kappa"):
        evaluate(policy, family, tasks, 1, return_mode="expert", kappa=-2)
    with pytest.raises(ValueError, match="no return slot"):
        evaluate(darkroom_policy("bc"), family, tasks, 1, return_mode="expert")
    check_return_options(policy, "target", 0, 0)  # integers are numbers too
