"""The public API's answers to bad arguments: a ValueError (TypeError for a wrong kind of object,
UserError for bad files and training settings) that says what is wrong, never a crash deep inside
or a silently wrong result."""
import math

import numpy as np
import pytest
import torch

from icrl.agent import InContextAgent
from icrl.checkpoint import load_policy, save_checkpoint
from icrl.envs import make_family
from icrl.errors import UserError
from icrl.evaluate import evaluate, rollout
from icrl.models.policy import PolicyConfig, SequencePolicy
from icrl.models.transformer import TransformerConfig
from icrl.train import ModelSpec, TrainConfig, train, validate_train_config

TINY = TransformerConfig(n_layer=1, n_head=1, d_model=8, d_ff=8)


def tiny_policy(family="darkroom", context=4) -> SequencePolicy:
    fam = make_family(family)
    torch.manual_seed(0)
    return SequencePolicy(PolicyConfig(fam.obs_spec, fam.n_actions, fam.episode_len,
                                       ModelSpec(context=context, transformer=TINY)))


@pytest.fixture(scope="module")
def darkroom():
    return make_family("darkroom")


@pytest.fixture(scope="module")
def policy():
    return tiny_policy()


# -- PolicyConfig

@pytest.mark.parametrize("context", [1, 0, -3, 2.5, True])
def test_policy_config_rejects_a_context_below_two(context):
    with pytest.raises(ValueError, match="--context: (must be >= 2|expected an integer)"):
        PolicyConfig(make_family("darkroom").obs_spec, 5, 20,
                     ModelSpec(context=context, transformer=TINY))


def test_a_context_of_two_slides_and_keeps_acting(darkroom):
    """Context 2 is the smallest window that can slide (to 1 token); 1 used to overflow the
    cache at the second cached step."""
    agent = InContextAgent(tiny_policy(context=2), seed=0)
    agent.start(3)
    env = darkroom.make(darkroom.tasks()[:3])
    obs = env.reset()
    for _ in range(7):
        obs, reward, done = env.step(agent.act(obs))
        agent.observe(reward, done)
    assert agent.state.length.max().item() <= 2


@pytest.mark.parametrize("changes, message", [
    ({"obs_spec": (9, 9)}, "obs_spec"), ({"n_actions": 0}, "n_actions"),
    ({"episode_len": 0}, "episode_len"),
    ({"model": ModelSpec(transformer=TransformerConfig(n_head=3))}, "divisible by n_head"),
    ({"model": ModelSpec(transformer=TransformerConfig(n_layer=0))}, "--layers"),
    ({"model": ModelSpec(transformer={"n_layer": 1})}, "transformer must be a config"),
    ({"model": ModelSpec(layout="xyz")}, "layout"),
])
def test_policy_config_rejects_bad_fields(changes, message):
    args = {"obs_spec": make_family("darkroom").obs_spec, "n_actions": 5, "episode_len": 20,
            "model": ModelSpec(context=4, transformer=TINY), **changes}
    with pytest.raises(ValueError, match=message):
        PolicyConfig(**args)


def test_policy_config_round_trips(policy):
    cfg = PolicyConfig.from_dict(policy.cfg.to_dict())
    assert cfg == policy.cfg and isinstance(cfg.obs_spec.shape, tuple)
    PolicyConfig(policy.cfg.obs_spec, np.int64(5), 20,
                 ModelSpec(context=np.int64(4), transformer=TINY))  # NumPy integers are fine


# -- InContextAgent

@pytest.mark.parametrize("temperature", [0, -1.0, math.nan, math.inf, "1", None, True])
def test_agent_temperature_must_be_a_finite_positive_number(policy, temperature):
    with pytest.raises(ValueError, match="temperature"):
        InContextAgent(policy, temperature=temperature)


def test_agent_rejects_bad_arguments(policy):
    with pytest.raises(TypeError, match="SequencePolicy"):
        InContextAgent(object())
    with pytest.raises(ValueError, match="seed"):
        InContextAgent(policy, seed=-1)
    agent = InContextAgent(policy)
    for n in (0, -2, 1.5, "3", True):
        with pytest.raises(ValueError, match="positive integer"):
            agent.start(n)
    agent.start(2)
    for obs in (np.zeros((2,), int), np.zeros((3, 2), int), np.zeros((2, 3), int),
                np.full((2, 2), 9), np.full((2, 2), -1), np.full((2, 2), 0.5)):
        with pytest.raises(ValueError, match="observations"):
            agent.act(obs)
    for rows in ([2], [-1], np.ones(3, dtype=bool), [0.5]):
        with pytest.raises(ValueError, match="rows"):
            agent.reset(rows)
    agent.reset([1])
    agent.reset(np.array([True, False]))
    actions = agent.act(np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="rewards"):
        agent.observe(np.zeros(3), np.zeros(3, bool))
    with pytest.raises(ValueError, match="bool done"):
        agent.observe(np.zeros(2), np.zeros(2))
    agent.observe(np.zeros(2), np.zeros(2, bool))  # still usable after the errors
    assert actions.shape == (2,)


# -- rollout() and evaluate()

@pytest.mark.parametrize("tasks, message", [
    (np.array([3, 4]), "shape"),                      # one task, not a batch of them
    (np.zeros((0, 2), int), "shape"),
    (np.zeros((2, 3), int), "shape"),
    (np.array([[3, 9]]), "not a darkroom task"),      # off the 9x9 grid
    (np.array([[2.5, 4]]), "not a darkroom task"),    # would be truncated to a valid (2, 4)
    (np.array([["a", "b"]]), "task parameters"),
])
def test_rollout_rejects_tasks_that_are_not_the_familys(policy, darkroom, tasks, message):
    with pytest.raises(ValueError, match=message):
        rollout(policy, darkroom, tasks, 1)
    with pytest.raises(ValueError, match=message):
        evaluate(policy, darkroom, tasks, 1)


@pytest.mark.parametrize("n_episodes", [0, -1, 2.5, True])
def test_rollout_needs_a_positive_episode_count(policy, darkroom, n_episodes):
    with pytest.raises(ValueError, match="n_episodes"):
        rollout(policy, darkroom, darkroom.tasks()[:2], n_episodes)


@pytest.mark.parametrize("rollouts", [0, -1, 1.5])
def test_evaluate_needs_a_positive_rollout_count(policy, darkroom, rollouts):
    with pytest.raises(ValueError, match="rollouts_per_task"):
        evaluate(policy, darkroom, darkroom.tasks()[:2], 1, rollouts)


@pytest.mark.parametrize("temperature", [0, -0.5, math.inf])
def test_rollout_temperature(policy, darkroom, temperature):
    with pytest.raises(ValueError, match="temperature"):
        rollout(policy, darkroom, darkroom.tasks()[:2], 1, temperature=temperature)


def test_rollout_rejects_a_policy_of_another_family(darkroom):
    with pytest.raises(ValueError, match="not made for darkroom"):
        rollout(tiny_policy("bandit"), darkroom, darkroom.tasks()[:2], 1)
    with pytest.raises(TypeError, match="TaskFamily"):
        rollout(tiny_policy(), "darkroom", darkroom.tasks()[:2], 1)


def test_valid_rollouts_still_run(policy, darkroom):
    tasks = darkroom.tasks()[:3].tolist()  # lists are fine too
    assert rollout(policy, darkroom, tasks, 2).shape == (3, 2)
    assert evaluate(policy, darkroom, np.asarray(tasks), 1, 2).shape == (2, 3, 1)


# -- checkpoints

def _save(path, policy, family):
    fam = make_family(family)
    split = {"seed": 0, **{k: v.tolist() for k, v in fam.split(4).items()}}
    return save_checkpoint(path, {"policy_config": policy.cfg.to_dict(), "family": fam.config(),
                                  "split": split, "state_dict": policy.state_dict()})


def test_load_policy_rejects_a_model_that_does_not_fit_its_family(tmp_path):
    path = _save(tmp_path / "model.pt", tiny_policy("bandit"), "darkroom")
    with pytest.raises(UserError, match="does not fit its family darkroom"):
        load_policy(path)
    with pytest.raises(UserError, match="does not fit"):
        InContextAgent.load(path)


def test_load_policy_notices_a_flipped_byte_in_the_weights(tmp_path, policy):
    path = _save(tmp_path / "model.pt", policy, "darkroom")
    load_policy(path)
    data = bytearray(path.read_bytes())
    # the largest tensor's bytes sit in the archive's middle; torch.load would not notice
    at = data.find(policy.state_dict()["heads.action.weight"].numpy().tobytes()[:16])
    assert at > 0
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_policy(path)


def test_load_policy_rejects_a_context_below_two(tmp_path, policy):
    path = _save(tmp_path / "model.pt", policy, "darkroom")
    ckpt = torch.load(path, weights_only=True)
    ckpt["policy_config"]["model"]["context"] = 1
    torch.save(ckpt, path)
    with pytest.raises(UserError, match="--context: (must be >= 2|expected an integer)"):
        load_policy(path)


# -- training settings

@pytest.mark.parametrize("cfg, spec, message", [
    (TrainConfig(steps=2.5), ModelSpec(), "--steps: expected an integer, got 2.5"),
    (TrainConfig(steps=True), ModelSpec(), "--steps: expected an integer, got True"),
    (TrainConfig(batch_size=0), ModelSpec(), "--batch-size: must be >= 1, got 0"),
    (TrainConfig(lr=math.nan), ModelSpec(), "--lr: must be a finite number"),
    (TrainConfig(lr=math.inf), ModelSpec(), "--lr: must be a finite number"),
    (TrainConfig(lr="0.1"), ModelSpec(), "--lr: expected a number"),
    (TrainConfig(seed=2 ** 63), ModelSpec(), "--seed: must be below 2\\*\\*63"),
    (TrainConfig(checkpoint_every=0), ModelSpec(), "--checkpoint-every"),
    (TrainConfig(grad_clip=0), ModelSpec(), "--grad-clip: must be > 0"),
    (TrainConfig(min_lr_frac=2), ModelSpec(), "--min-lr-frac: must be between 0 and 1"),
    (TrainConfig(beta2=1.0), ModelSpec(), "--beta2: must be >= 0 and < 1"),
    (TrainConfig(device=3), ModelSpec(), "--device: expected a string"),
    (TrainConfig(), ModelSpec(context=1), "--context: must be >= 2, got 1"),
    (TrainConfig(), ModelSpec(layout="abc"), "--layout: must be one of"),
    (TrainConfig(), ModelSpec(transformer=TransformerConfig(n_layer=0)),
     "--layers: must be >= 1, got 0"),
    (TrainConfig(), ModelSpec(transformer=TransformerConfig(n_head=3)), "divisible"),
    (TrainConfig(), ModelSpec(transformer=TransformerConfig(dropout=1.0)), "--dropout"),
])
def test_validate_train_config(cfg, spec, message):
    with pytest.raises(UserError, match=message):
        validate_train_config(cfg, spec)


def test_train_checks_settings_before_touching_the_output(tmp_path):
    with pytest.raises(UserError, match="context"):
        train(tmp_path / "absent.h5", tmp_path / "out", ModelSpec(context=1), progress=False)
    assert not (tmp_path / "out").exists()
