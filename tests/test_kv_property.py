"""Property test of the backbone state: on random schedules, every cached step equals a full
recompute — for token layouts with 1, 3, 4, 6, 8 and 9 tokens per timestep (the patches of a frame
seeing each other) and for a recurrent backbone.

Hypothesis draws a schedule — batch size, context length, how many steps, and for every row the
steps at which its context is emptied (never, periodically or at scattered times) and when its
episodes end (a per-row episode length and/or scattered done flags). The agent is then driven
through its public API (start, reset, act, observe) and at every step the logits of every row are
compared with the policy's plain forward over that row's window, which the test models on its own:
the tokens since the row's last reset; when it holds `context` tokens and one more comes, it keeps
the last 3/4 of its timesteps, then appends the new one (a recurrent backbone never slides).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from icrl.agent import InContextAgent
from icrl.envs.spec import ObsSpec
from icrl.models.policy import ModelSpec, PolicyConfig, SequencePolicy
from icrl.models.transformer import TransformerConfig, window_after_slide

N_ACTIONS = 4
EPISODE_LEN = 6          # step embeddings; longer episodes exercise the clamp
MAX_BATCH = 6
EXAMPLES = 200
GRID = ObsSpec.discrete((5, 7))
FRAME = ObsSpec.image(4, 6, 2)        # 2x2 patches: 6 tokens per frame
BIG_FRAME = ObsSpec.image(32, 48, 3)  # the conv encoder shrinks it 2x first (as Watermaze's 4x)
# name: (observations, layout, encoder, backbone, tokens per timestep)
VARIANTS = {
    "ad-1-token": (GRID, "ad", "factored", "transformer", 1),
    "bc-3-tokens": (GRID, "bc", "factored", "transformer", 3),
    "dt-4-tokens": (GRID, "dt", "factored", "transformer", 4),
    "dt-patches-9-tokens": (FRAME, "dt", "patch", "transformer", 9),   # 6 patches see each other
    "mgdt-patches-9-tokens": (FRAME, "mgdt", "patch", "transformer", 9),  # and a private return
    "bc-patches-8-tokens": (FRAME, "bc", "patch", "transformer", 8),
    "ad-patches-6-tokens": (FRAME, "ad", "patch", "transformer", 6),   # the whole step: one frame
    "ad-conv-1-token": (BIG_FRAME, "ad", "conv", "transformer", 1),
    "ad-gru": (GRID, "ad", "factored", "gru", 1),
}


@functools.lru_cache(maxsize=None)
def policy_for(variant: str, context: int) -> SequencePolicy:
    """A tiny random policy, one per variant and context length, built once."""
    spec, layout, encoder, backbone, _ = VARIANTS[variant]
    torch.manual_seed(1000 + context)
    model = ModelSpec(context=context, layout=layout, encoder=encoder, backbone=backbone,
                      patch=2, return_low=-3, return_high=5,
                      transformer=TransformerConfig(n_layer=3, n_head=2, d_model=16, d_ff=32))
    policy = SequencePolicy(PolicyConfig(spec, N_ACTIONS, EPISODE_LEN, model)).eval()
    # Far larger weights than the init, so that a wrong key, mask or position shows in the logits.
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return policy


def kept_after_slide(context: int) -> int:
    """The slide rule, written out here rather than taken from the library: keep 3/4, at least 1."""
    return max(1, (3 * context) // 4)


class RecordingAgent(InContextAgent):
    """The cached agent, remembering the raw logits that act() sampled from and the return it
    fed back (return-conditioned layouts)."""

    def _walk(self, obs):
        self.last_logits = super()._walk(obs)
        return self.last_logits

    def _feed(self, slot, inputs):
        if slot.field == "return":
            self.last_return = inputs["returns_to_go"].clone()
        return super()._feed(slot, inputs)


@st.composite
def time_sets(draw, steps: int):
    """Steps (of 0..steps-1) at which something happens to one row: never, periodically, or at
    scattered times (possibly many)."""
    times = st.integers(0, steps - 1)
    kind = draw(st.sampled_from(["never", "periodic", "scattered"]))
    if kind == "never":
        return frozenset()
    if kind == "periodic":
        period = draw(st.integers(1, steps))
        phase = draw(st.integers(0, period - 1))
        return frozenset(range(phase, steps, period))
    return draw(st.frozensets(times, max_size=steps))


@st.composite
def schedules(draw):
    context = draw(st.integers(2, 16))
    batch = draw(st.integers(1, MAX_BATCH))
    steps = draw(st.integers(1, 3 * context + 2))
    rows = []
    for _ in range(batch):
        rows.append({
            "resets": draw(time_sets(steps)),
            # Episodes end after `episode_len` steps of the row's own episode counter (None: no
            # fixed length, can run past EPISODE_LEN) and also at scattered steps.
            "episode_len": draw(st.none() | st.integers(1, 2 * EPISODE_LEN)),
            "dones": draw(time_sets(steps)),
        })
    return {
        "context": context,
        "batch": batch,
        "steps": steps,
        "rows": rows,
        "reset_as_mask": draw(st.booleans()),
        "greedy": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),   # observations, rewards, sampled actions
    }


def expected_logits(policy, windows) -> dict[str, torch.Tensor]:
    """Per target, (rows, classes): the logits at the last timestep of each row's window, from
    the policy's forward over exactly that window. Rows whose windows have the same length share
    one batched forward (no padding)."""
    out = {}
    by_length: dict[int, list[int]] = {}
    for b in range(len(windows)):
        by_length.setdefault(len(windows[b]), []).append(b)
    with torch.inference_mode():
        for group in by_length.values():
            inputs = {key: torch.stack([torch.stack([step[key] for step in windows[b]])
                                        for b in group]) for key in windows[group[0]][0]}
            for name, logits in policy(inputs).items():
                out.setdefault(name, torch.empty(len(windows), logits.shape[-1]))
                out[name][group] = logits[:, -1]
    return out


def run_schedule(variant, s, stats):
    C, B, steps = s["context"], s["batch"], s["steps"]
    spec, _, _, backbone, K = VARIANTS[variant]
    slides = backbone == "transformer"
    keep = kept_after_slide(C)
    assert keep == window_after_slide(C) and 1 <= keep < C
    policy = policy_for(variant, C)
    assert policy.tokens_per_step == K
    rng = np.random.default_rng(s["seed"])
    agent = RecordingAgent(policy, greedy=s["greedy"], seed=s["seed"])
    agent.start(B)

    # The test's own model of each row: its window of timesteps (each a dict of the fields the
    # policy embeds) and what the next timestep carries besides the observation.
    windows = [[] for _ in range(B)]
    prev_action = [-1] * B          # "no previous action"
    prev_reward = [0.0] * B
    step = [0] * B

    for t in range(steps):
        resetting = [b for b in range(B) if t in s["rows"][b]["resets"]]
        if resetting:
            if s["reset_as_mask"]:
                agent.reset(np.isin(np.arange(B), resetting))
            else:
                agent.reset(resetting)
            for b in resetting:
                windows[b], prev_action[b], prev_reward[b], step[b] = [], -1, 0.0, 0

        if spec.kind == "discrete":
            obs = np.stack([rng.integers(0, n, size=B) for n in spec.high], axis=1)
        else:
            obs = rng.integers(0, 256, size=(B, *spec.shape), dtype=np.uint8)
        actions = agent.act(obs)
        cached = agent.last_logits
        assert cached["action"].shape == (B, N_ACTIONS) and actions.shape == (B,)
        sliding = []
        for b in range(B):
            if slides and len(windows[b]) == C:
                windows[b] = windows[b][-keep:]
                sliding.append(b)
            windows[b].append({
                "obs": torch.as_tensor(obs[b]), "prev_action": torch.tensor(prev_action[b]),
                "prev_reward": torch.tensor(prev_reward[b]), "step": torch.tensor(step[b]),
                "actions": torch.tensor(int(actions[b])), "rewards": torch.tensor(0.0),
                "returns_to_go": agent.last_return[b] if "return" in cached
                else torch.tensor(0.0)})
        expected = expected_logits(policy, windows)
        if slides:
            lengths = agent.state.length.tolist()
            unfed = policy.slots[-1].field == "reward"   # the reward comes with observe()
            assert lengths == [K * len(w) - unfed for w in windows], \
                f"step {t}: cache lengths {lengths}"
        assert cached.keys() <= expected.keys()
        for name in cached:
            if not torch.allclose(cached[name], expected[name], atol=1e-5, rtol=1e-5):
                for b in range(B):   # name the first row that differs
                    torch.testing.assert_close(
                        cached[name][b], expected[name][b], atol=1e-5, rtol=1e-5,
                        msg=lambda m: f"step {t}, row {b}, {name}, window of "
                                      f"{len(windows[b])} steps: {m}")
                raise AssertionError(f"step {t}: cached {name} logits differ from the recompute")

        stats["steps"] += 1
        stats["slides"] += len(sliding)
        if sliding and len(sliding) < B:
            stats["staggered_slide_steps"] += 1
        if any(0 < r <= t for b in sliding for r in s["rows"][b]["resets"]):
            stats["slides_after_reset"] += 1

        # Half the rewards are 0/1 like the grid worlds', half arbitrary floats.
        rewards = np.where(rng.random(B) < 0.5, rng.integers(0, 2, size=B),
                           rng.normal(0, 2, size=B)).astype(np.float32)
        done = np.zeros(B, dtype=bool)
        for b in range(B):
            row = s["rows"][b]
            ends = row["episode_len"] is not None and (step[b] + 1) % row["episode_len"] == 0
            done[b] = ends or t in row["dones"]
        agent.observe(rewards, done)
        for b in range(B):
            windows[b][-1]["rewards"] = torch.tensor(float(rewards[b]))
            prev_action[b] = int(actions[b])
            prev_reward[b] = float(rewards[b])
            step[b] = 0 if done[b] else step[b] + 1
            stats["max_step"] = max(stats["max_step"], step[b])
    stats["examples"] += 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_logits_equal_recompute_on_random_schedules(variant):
    # Hypothesis runs inside this test so that the number of schedules really run can be checked
    # afterwards, whatever order pytest runs the tests in.
    stats = dict.fromkeys(["examples", "steps", "slides", "staggered_slide_steps",
                           "slides_after_reset", "max_step"], 0)
    seen = set()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None)
    @given(schedules())
    def check(schedule):
        seen.add(repr(schedule))
        run_schedule(variant, schedule, stats)

    check()
    assert stats["examples"] >= EXAMPLES, stats
    assert len(seen) >= EXAMPLES * 0.9, (len(seen), stats)
    # The schedules really exercised what the cache has to get right.
    assert stats["max_step"] >= EPISODE_LEN, stats
    if VARIANTS[variant][3] != "transformer":
        return  # a recurrent state never slides
    assert stats["slides"] >= EXAMPLES, stats
    assert stats["staggered_slide_steps"] >= 50, stats
    assert stats["slides_after_reset"] >= 20, stats


def test_slide_rule_of_the_model_matches_the_library():
    for context in range(2, 200):
        assert kept_after_slide(context) == window_after_slide(context)
