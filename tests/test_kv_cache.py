"""A cached step must give the logits of a full recompute of the same window."""
import numpy as np
import torch

from icrl.agent import InContextAgent
from icrl.models.ad import InContextPolicy, PolicyConfig
from icrl.models.transformer import TransformerConfig


def make_policy(context=12, seed=0):
    torch.manual_seed(seed)
    cfg = PolicyConfig((9, 9), 5, 20, context, TransformerConfig(n_layer=2, n_head=2, d_model=32,
                                                                 d_ff=64))
    policy = InContextPolicy(cfg).eval()
    # Larger weights than the init so that mistakes in masking or positions show in the logits.
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return policy


def recompute(policy, tokens, row, n):
    """Logits of the last token of row `row`, recomputed from scratch over its last n tokens."""
    window = {k: torch.stack(v[row][-n:])[None] for k, v in tokens.items()}
    return policy(**window)[0, -1]


def test_cached_logits_equal_full_recompute_with_staggered_resets():
    policy, B, steps = make_policy(context=12), 5, 60
    rng = np.random.default_rng(0)
    agent = InContextAgent(policy, seed=0)
    agent.start(B)
    tokens = {k: [[] for _ in range(B)] for k in ("obs", "prev_action", "prev_reward", "step")}
    # Rows join at different times (their context is emptied at a random step) and have episodes
    # of different lengths, so the ring buffers of the batch are out of phase.
    restart_at = {0: 0, 1: 7, 2: 13, 3: 29, 4: 41}
    episode_len = {0: 5, 1: 20, 2: 7, 3: 3, 4: 11}
    t_in_episode = np.zeros(B, dtype=int)
    for t in range(steps):
        for b in range(B):
            if restart_at[b] == t:
                agent.reset([b])
                for k in tokens:
                    tokens[k][b] = []
                t_in_episode[b] = 0
        obs = rng.integers(0, 9, size=(B, 2))
        for b in range(B):
            tokens["obs"][b].append(torch.as_tensor(obs[b]))
            tokens["prev_action"][b].append(agent.prev_action[b].clone())
            tokens["prev_reward"][b].append(agent.prev_reward[b].clone())
            tokens["step"][b].append(agent.step_in_episode[b].clone())
        cached = agent.logits(obs)
        for b in range(B):
            n = int(agent.cache.length[b])
            seen = len(tokens["obs"][b])
            # The window is the whole history until it first fills, then 9..12 tokens.
            assert n == seen if seen <= 12 else 9 <= n <= 12
            torch.testing.assert_close(cached[b], recompute(policy, tokens, b, n), atol=2e-5,
                                       rtol=1e-4)
        agent.pending = torch.as_tensor(rng.integers(0, 5, size=B))
        t_in_episode += 1
        done = np.array([t_in_episode[b] % episode_len[b] == 0 for b in range(B)])
        agent.observe(rng.integers(0, 2, size=B).astype(np.float32), done)


def test_cache_matters():
    """Sanity check of the test above: the window really is limited to `context` tokens."""
    policy = make_policy(context=4)
    x = {"obs": torch.randint(0, 9, (1, 10, 2)), "prev_action": torch.randint(0, 6, (1, 10)),
         "prev_reward": torch.rand(1, 10), "step": torch.arange(10)[None]}
    full = policy(**x)[0, -1]
    window = policy(**{k: v[:, -4:] for k, v in x.items()})[0, -1]
    assert not torch.allclose(full, window, atol=1e-3)
