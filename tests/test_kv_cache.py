"""The window really is limited: a policy's output depends on which tokens are in its window, so
the cached = recomputed property test (test_kv_property.py) would catch a cache that kept or
dropped the wrong ones."""
import torch

from icrl.envs.spec import ObsSpec
from icrl.models.policy import ModelSpec, PolicyConfig, SequencePolicy
from icrl.models.transformer import TransformerConfig


def test_cache_matters():
    torch.manual_seed(0)
    policy = SequencePolicy(PolicyConfig(ObsSpec.discrete((9, 9)), 5, 20, ModelSpec(
        context=4, transformer=TransformerConfig(n_layer=2, n_head=2, d_model=32, d_ff=64))))
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = {"obs": torch.randint(0, 9, (1, 10, 2)), "prev_action": torch.randint(-1, 5, (1, 10)),
         "prev_reward": torch.rand(1, 10), "step": torch.arange(10)[None]}
    full = policy.eval()(x)["action"][0, -1]
    window = policy({k: v[:, -4:] for k, v in x.items()})["action"][0, -1]
    assert not torch.allclose(full, window, atol=1e-3)
