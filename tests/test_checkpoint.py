"""Checkpoints of the first core (format 1: AD on integer observations) load into today's policy
with the same weights, so models trained before the sequence policy keep working."""
import torch

from icrl.checkpoint import KIND, load_policy
from icrl.envs import make_family
from icrl.models.policy import ModelSpec, PolicyConfig, SequencePolicy
from icrl.models.transformer import TransformerConfig


def test_a_format_1_checkpoint_loads_with_the_same_outputs(tmp_path):
    family = make_family("darkroom")
    torch.manual_seed(0)
    tiny = TransformerConfig(n_layer=2, n_head=2, d_model=16, d_ff=32)
    policy = SequencePolicy(PolicyConfig(family.obs_spec, 5, 20, ModelSpec(context=8,
                                                                           transformer=tiny)))
    # the names and config the first core used
    renames = {"encoder.tables.": "obs_embed.", "backbone.": "transformer.",
               "heads.action.": "head."}
    old_state = {}
    for key, value in policy.state_dict().items():
        prefix = next((p for p in renames if key.startswith(p)), "")
        old_state[renames.get(prefix, "") + key[len(prefix):] if prefix else key] = value
    old = {"format_version": 1, "kind": KIND, "state_dict": old_state,
           "policy_config": {"obs_dims": [9, 9], "n_actions": 5, "episode_len": 20,
                             "context": 8, "transformer": vars(tiny)},
           "family": family.config(), "split": {"seed": 0, "train": [0, 1], "test": [2]}}
    torch.save(old, tmp_path / "model.pt")
    loaded, ckpt = load_policy(tmp_path / "model.pt")
    assert loaded.cfg == policy.cfg and ckpt["format_version"] == 2
    x = {"obs": torch.randint(0, 9, (2, 8, 2)), "prev_action": torch.randint(-1, 5, (2, 8)),
         "prev_reward": torch.rand(2, 8), "step": torch.arange(8).repeat(2, 1)}
    torch.testing.assert_close(loaded(x)["action"], policy.eval()(x)["action"])
