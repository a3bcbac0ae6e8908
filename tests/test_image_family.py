"""Image observations through the same pipeline: Dark Room drawn as a 6x6 frame goes through
generate -> train -> evaluate with the convolutional and the patch encoder, and the return-
conditioned layout trains on the same data."""
import numpy as np
import pytest
import torch

from icrl.checkpoint import load_policy
from icrl.data.store import HistoryStore
from icrl.envs import make_family
from icrl.evaluate import evaluate, rollout
from icrl.generate import GenerateConfig, generate
from icrl.models.policy import ModelSpec
from icrl.models.transformer import TransformerConfig
from icrl.train import TrainConfig, train

SMALL = TransformerConfig(n_layer=2, n_head=2, d_model=32, d_ff=64)


@pytest.fixture(scope="module")
def pixel_data(tmp_path_factory):
    family = make_family("darkroom-pixels")
    out = tmp_path_factory.mktemp("pixels") / "histories.h5"
    cfg = GenerateConfig(source="random", n_episodes=6, seeds_per_task=2, n_test=6)
    return family, generate(family, out, cfg, progress=False)


def test_the_family_draws_the_agent_on_its_cell():
    family = make_family("darkroom-pixels")
    env = family.make(family.tasks()[:2])
    frames = env.reset()
    assert frames.shape == (2, 6, 6, 1) and frames.dtype == np.uint8
    assert (frames.reshape(2, -1) == 255).sum(1).tolist() == [1, 1]
    assert frames[0, 3, 3, 0] == 255                 # the centre (x=3, y=3)
    frames, _, _ = env.step(np.array([3, 0]))          # right; up
    assert frames[0, 3, 4, 0] == 255 and frames[1, 4, 3, 0] == 255
    family.obs_spec.check(frames, 2)


def test_the_store_keeps_uint8_frames(pixel_data):
    family, path = pixel_data
    with HistoryStore(path) as store:
        obs = store.read(np.arange(2))["obs"]
    assert obs.dtype == np.uint8 and obs.shape[2:] == (6, 6, 1)
    assert set(np.unique(obs)) == {0, 255}


@pytest.mark.parametrize("encoder,tokens", [("conv", 1), ("patch", 4)])
def test_generate_train_evaluate_with_an_image_encoder(pixel_data, tmp_path, encoder, tokens):
    family, data = pixel_data
    spec = ModelSpec(context=24, encoder=encoder, transformer=SMALL)
    ckpt = train(data, tmp_path / encoder, spec, TrainConfig(steps=30, batch_size=8),
                 progress=False)
    policy, saved = load_policy(ckpt)
    assert policy.tokens_per_step == tokens and saved["policy_config"]["model"]["encoder"] == encoder
    tasks = family.tasks()[saved["split"]["test"]]
    returns = evaluate(policy, family, tasks, n_episodes=4, rollouts_per_task=2, seed=1)
    oracle = family.oracle_returns(tasks)
    assert returns.shape == (2, len(tasks), 4)
    assert ((returns >= 0) & (returns <= oracle[None, :, None])).all()
    # the cache over several image tokens per step is exact: same actions, same returns
    cached = rollout(policy, family, tasks, 4, seed=5, cache=True)
    recomputed = rollout(policy, family, tasks, 4, seed=5, cache=False)
    np.testing.assert_array_equal(cached, recomputed)


def test_the_return_conditioned_layout_learns_returns_and_rewards(pixel_data, tmp_path):
    """Random actions are not learnable, but the return-to-go and the reward are predictable
    from the frames: the summed loss of the dt layout falls well below its start."""
    family, data = pixel_data
    spec = ModelSpec(context=12, layout="dt", encoder="patch", return_low=0, return_high=12,
                     transformer=SMALL)
    ckpt = train(data, tmp_path / "dt", spec, TrainConfig(steps=150, batch_size=16, lr=3e-3),
                 progress=False)
    policy, saved = load_policy(ckpt)
    assert policy.tokens_per_step == 4 + 3
    assert saved["final_loss"] < 0.75 * (np.log(13) + np.log(5) + np.log(3))
    # it acts through the same agent: the return is decoded, then the action
    tasks = family.tasks()[saved["split"]["test"]]
    returns = rollout(policy, family, tasks, 2, seed=0)
    assert returns.shape == (len(tasks), 2) and np.isfinite(returns).all()
    assert torch.isfinite(torch.stack([p.sum() for p in policy.parameters()])).all()


def test_large_frames_are_shrunk_by_averaging_evenly_spaced_pixels():
    import torch

    from icrl.models.encoders import downsample, pooling_for

    assert pooling_for(72, 96) == 4 and pooling_for(10, 10) == 1 and pooling_for(6, 6) == 1
    frames = torch.randint(0, 256, (2, 5, 72, 96, 3), dtype=torch.uint8)
    small = downsample(frames, 4)
    assert small.shape == (10, 3, 18, 24)
    block = frames[1, 2, 4:8, 8:12, 2].float()       # frame 7 of 10, block (1, 2), blue
    want = block[1::2, 1::2].mean() / 255             # its pixels at odd rows and columns
    assert torch.isclose(small[7, 2, 1, 2], want)
    # p = 1 is the plain conversion to floats in [0, 1]
    assert torch.equal(downsample(frames, 1), frames.reshape(-1, 72, 96, 3).permute(0, 3, 1, 2)
                       .float() / 255)
