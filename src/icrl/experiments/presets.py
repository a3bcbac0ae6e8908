"""Embedded default configurations per task family: `icrl run FAMILY --preset NAME`.

"default" finishes in minutes on a 2-core CPU; "long" (Dark Room, Key-to-Door) trains longer for
the numbers documented in docs/darkroom.md and docs/keydoor.md.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from ..baselines.rl2 import RL2Config
from ..errors import UserError
from ..generate import GenerateConfig
from ..models.transformer import TransformerConfig
from ..train import ModelSpec, TrainConfig


@dataclass
class Preset:
    histories: GenerateConfig                 # learning histories of the source on train tasks
    expert: GenerateConfig                    # converged-policy episodes, for Expert Distillation
    model: ModelSpec
    train: TrainConfig                        # for AD
    ed_steps: int                             # ED's training steps (same model, same context)
    eval_episodes: int = 40
    eval_rollouts: int = 4                    # rollouts per held-out task (per training seed)
    greedy: bool = False
    temperature: float = 1.0                  # sampling temperature of the in-context policy
    train_seeds: int = 1
    # RL², trained online on the same split when a run asks for it (--methods AD,ED,RL2)
    rl2: RL2Config = field(default_factory=RL2Config)
    # Learners run from scratch on the same evaluation tasks, reported beside the methods with the
    # oracle: {report name: (source name, its hyperparameters)}.
    references: dict[str, tuple[str, dict]] = field(default_factory=dict)


# RL² (docs/rl2.md): a 1-layer GRU of 128 trained by PPO on 512 trials at a time. Back-propagation
# through 100 steps (5 Dark Room episodes) is what lets it learn to remember across episodes: with
# the paper's 20-step unroll every gradient stops at an episode boundary and it never does.
# A strong entropy bonus (0.05) keeps its search broad: at 0.01 it learns to search only the
# training goals' cells and finds few held-out goals (docs/rl2.md).
def _rl2(steps: int, trial_episodes: int, **changes) -> RL2Config:
    return RL2Config(**{"steps": steps, "n_envs": 512, "trial_episodes": trial_episodes,
                        "hidden": 128, "layers": 1, "unroll": 100, "epochs": 2,
                        "minibatches": 4, "lr": 2e-3, "entropy_coef": 0.05, **changes})


# Dyna-style Q-learning: systematic exploration, then straight back to the reward (docs/darkroom.md).
_DYNA_Q = {"lr": 1.0, "gamma": 0.9, "init_value": 5.0, "eps_start": 0.0, "planning_sweeps": 30}


def _darkroom(steps: int, ed_steps: int, train_seeds: int = 1, temperature: float = 1.0) -> Preset:
    return Preset(
        histories=GenerateConfig(source="qlearning", source_config=_DYNA_Q, n_episodes=60,
                                 every=2, seeds_per_task=20, n_test=16),
        expert=GenerateConfig(source="qlearning", source_config=_DYNA_Q, n_episodes=60,
                              expert_episodes=20, seeds_per_task=4, n_test=16),
        model=ModelSpec(context=80, transformer=TransformerConfig()),
        train=TrainConfig(steps=steps),
        ed_steps=ed_steps, eval_episodes=40, eval_rollouts=4, train_seeds=train_seeds,
        temperature=temperature, rl2=_rl2(steps=12_000_000, trial_episodes=10))


# Dark Room Hard: 17x17 and a sparse reward make exploration the whole problem. The source needs
# ~100 episodes; keeping every 4th episode and a 10-episode window lets AD see much of that search.
_DYNA_Q_HARD = {**_DYNA_Q, "init_value": 0.5}

_DARKROOM_HARD = Preset(
    histories=GenerateConfig(source="qlearning", source_config=_DYNA_Q_HARD, n_episodes=140,
                             every=4, seeds_per_task=4, n_test=50),
    expert=GenerateConfig(source="qlearning", source_config=_DYNA_Q_HARD, n_episodes=140,
                          expert_episodes=20, seeds_per_task=1, n_test=50),
    model=ModelSpec(context=200, transformer=TransformerConfig()),
    train=TrainConfig(steps=2000, batch_size=48),
    ed_steps=800, eval_episodes=80, eval_rollouts=4,
    rl2=_rl2(steps=10_000_000, trial_episodes=20))

# Adversarial Bandit: UCB histories of 100 pulls on 19,500 odd-favoured tasks; AD's context holds
# a whole history. c = 0.3 suits Bernoulli rewards (variance <= 1/4) far better than UCB1's c = 1
# in 100 pulls (regret about 12 instead of 27; docs/bandit.md).
_UCB = {"c": 0.3}

_BANDIT = Preset(
    histories=GenerateConfig(source="ucb", source_config=_UCB, n_episodes=100, seeds_per_task=1,
                             n_test=500),
    expert=GenerateConfig(source="ucb", source_config=_UCB, n_episodes=100, expert_episodes=100,
                          seeds_per_task=1, n_test=500, n_train=4000),
    model=ModelSpec(context=100, transformer=TransformerConfig()),
    train=TrainConfig(steps=800),
    ed_steps=150, eval_episodes=100, eval_rollouts=2,
    # a trial is a whole history of 100 pulls; gamma 0.9: a pull's value is its next few
    rl2=_rl2(steps=4_000_000, trial_episodes=100, gamma=0.9, entropy_coef=0.03),
    references={"UCB": ("ucb", _UCB), "Thompson": ("thompson", {}), "random": ("random", {})})

# Dark Key-to-Door: Dyna Q-learning whose state also says whether the key was paid for; it goes
# from 0.3 to 2 (optimal) in about 25 episodes. 2,000 training tasks, 1,000 held out.
_DYNA_Q_KEYDOOR = {**_DYNA_Q, "init_value": 0.5, "reward_stages": 3}


def _keydoor(steps: int, ed_steps: int, temperature: float) -> Preset:
    return Preset(
        histories=GenerateConfig(source="qlearning", source_config=_DYNA_Q_KEYDOOR, n_episodes=30,
                                 seeds_per_task=1, n_test=1000, n_train=2000),
        expert=GenerateConfig(source="qlearning", source_config=_DYNA_Q_KEYDOOR, n_episodes=40,
                              expert_episodes=10, seeds_per_task=1, n_test=1000, n_train=1000),
        model=ModelSpec(context=200, transformer=TransformerConfig()),
        train=TrainConfig(steps=steps, batch_size=48),
        ed_steps=ed_steps, eval_episodes=50, eval_rollouts=1, temperature=temperature,
        rl2=_rl2(steps=10_000_000, trial_episodes=10))


# Watermaze (docs/watermaze.md): AD sees only pixels, but its source is tabular Dyna Q-learning on
# the true state (position and heading on a 7x7x8 grid), which learns from 0.4 to about 7 in 120
# episodes for a fraction of a pixel DQN's cost; the histories record the rendered frames (only of
# the kept episodes: every 8th). Held out: 64 platforms of a seeded sample of 4,096.
_WATERMAZE_Q = {"lr": 1.0, "gamma": 0.5, "init_value": 0.4, "eps_start": 0.0,
                "planning_sweeps": 3}

_WATERMAZE = Preset(
    histories=GenerateConfig(source="qlearning", source_config=_WATERMAZE_Q, n_episodes=120,
                             every=8, seeds_per_task=1, n_test=64, n_train=400, chunk_size=200),
    expert=GenerateConfig(source="qlearning", source_config=_WATERMAZE_Q, n_episodes=120,
                          expert_episodes=6, seeds_per_task=1, n_test=64, n_train=200,
                          chunk_size=200),
    # 4 episodes of frames per window, each through the convolutional encoder (4x4-pooled).
    model=ModelSpec(context=200, transformer=TransformerConfig()),
    # More steps lower the loss but not the in-context return (docs/watermaze.md).
    train=TrainConfig(steps=5000, batch_size=16),
    # Sampling at temperature 0.5 keeps AD on what it found: at 1 it settles below 2 whatever
    # the training, at 0.5 near 3.4, reached by about episode 40 (docs/watermaze.md has the sweep).
    ed_steps=500, eval_episodes=80, eval_rollouts=2, temperature=0.5)


PRESETS: dict[str, dict[str, Preset]] = {
    "darkroom": {"default": _darkroom(steps=1500, ed_steps=600),
                 # Sampling at temperature 0.7 trades a little exploration for steadier
                 # exploitation (docs/darkroom.md has the sweep).
                 "long": _darkroom(steps=2500, ed_steps=600, train_seeds=3, temperature=0.7)},
    "darkroom-hard": {"default": _DARKROOM_HARD},
    "bandit": {"default": _BANDIT},
    # Sampling below temperature 1 keeps AD on the route it found (docs/keydoor.md has the sweep).
    "keydoor": {"default": _keydoor(steps=2500, ed_steps=800, temperature=0.7),
                "long": _keydoor(steps=5000, ed_steps=800, temperature=0.5)},
    "watermaze": {"default": _WATERMAZE},
    # The same histories' learner with the true state as AD's observation (docs/watermaze.md).
    "watermaze-state": {"default": _WATERMAZE},
}


def get_preset(family: str, name: str = "default") -> Preset:
    if family not in PRESETS:
        raise UserError(f"no presets for family {family!r}; choose from {', '.join(PRESETS)}")
    if name not in PRESETS[family]:
        raise UserError(f"unknown preset {name!r} for {family}; "
                        f"choose from {', '.join(PRESETS[family]) or 'none yet'}")
    return copy.deepcopy(PRESETS[family][name])
