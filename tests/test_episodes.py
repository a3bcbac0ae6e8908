"""Pictures of in-context episodes: what record_episodes shows and the GIF it makes."""
import numpy as np
import torch
from PIL import Image

from icrl.envs import Watermaze, make_family
from icrl.evaluate import rollout
from icrl.experiments.episodes import record_episodes, save_side_by_side_gif
from icrl.models.policy import ModelSpec, PolicyConfig, SequencePolicy
from icrl.models.transformer import TransformerConfig


def tiny_policy(family):
    torch.manual_seed(0)
    spec = ModelSpec(context=12, transformer=TransformerConfig(n_layer=1, n_head=2, d_model=16,
                                                               d_ff=32))
    return SequencePolicy(PolicyConfig(family.obs_spec, family.n_actions, family.episode_len,
                                       spec)).eval()


def test_first_and_last_episode_of_a_watermaze_agent_with_its_map(tmp_path):
    family = Watermaze(episode_len=5)
    policy, task = tiny_policy(family), family.tasks()[3]
    first, last, returns = record_episodes(policy, family, task, 3, seed=2)
    assert len(first) == len(last) == 6        # every step's picture, and the final state
    assert first[0].shape == (72, 96 + 72, 3) and first[0].dtype == np.uint8
    assert np.array_equal(first[0], last[0])   # every episode starts at the centre facing north
    # the same returns as the batched evaluation of the same policy, task and seed
    assert np.array_equal(returns, rollout(policy, family, task[None], 3, seed=2)[0])
    gif = save_side_by_side_gif(tmp_path / "episodes.gif", first, last[:4], scale=2)
    with Image.open(gif) as image:
        assert image.n_frames == 6 and image.size == (2 * (2 * 168 + 4), 2 * 72)


def test_families_without_a_picture_show_their_observations():
    family = make_family("darkroom-pixels")
    first, last, returns = record_episodes(tiny_policy(family), family, family.tasks()[0], 2)
    assert first[0].shape == (6, 6, 3) and len(last) == family.episode_len + 1
    assert returns.shape == (2,)
