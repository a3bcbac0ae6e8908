"""Source algorithms (the learners whose histories AD distils), by name."""
from __future__ import annotations

import math
from dataclasses import fields

from ..envs.base import TaskFamily
from ..errors import UserError
from .actor_critic import ActorCritic, ActorCriticConfig
from .bandit import UCB, RandomConfig, RandomPolicy, Thompson, ThompsonConfig, UCBConfig
from .base import Histories, Source, collect
from .qlearning import QLearning, QLearningConfig

SOURCES = {
    "qlearning": (QLearning, QLearningConfig),
    "actor-critic": (ActorCritic, ActorCriticConfig),
    "ucb": (UCB, UCBConfig),
    "thompson": (Thompson, ThompsonConfig),
    "random": (RandomPolicy, RandomConfig),
}


def make_source(name: str, family: TaskFamily, n: int, config: dict | None = None,
                seed: int = 0) -> Source:
    """`n` independent learners of the algorithm called `name` (see SOURCES) for `family`'s tasks,
    with hyperparameters overridden by `config` (keys of that algorithm's config dataclass)."""
    if name not in SOURCES:
        raise UserError(f"unknown source algorithm {name!r}; "
                        f"choose from {', '.join(sorted(SOURCES))}")
    cls, config_cls = SOURCES[name]
    config = dict(config or {})
    types = {f.name: f.type for f in fields(config_cls)}
    unknown = sorted(set(config) - set(types))
    if unknown:
        raise UserError(f"unknown {name} hyperparameter(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(sorted(types))}")
    for key, value in config.items():
        _check_hyperparameter(name, key, value, types[key])
    return cls(family.obs_spec.high, family.n_actions, n, config_cls(**config), seed=seed)


# Allowed ranges, (low, high, low is exclusive): outside them a source crashes deep inside its
# update or silently learns nothing.
RANGES = {
    "lr": (0, None, True), "gamma": (0, 1, False), "eps_start": (0, 1, False),
    "eps_end": (0, 1, False), "eps_decay_episodes": (0, None, False),
    "planning_sweeps": (0, None, False), "reward_stages": (1, None, False),
    "n_steps": (1, None, False), "hidden": (1, None, False), "entropy_coef": (0, None, False),
    "value_coef": (0, None, False), "c": (0, None, False), "prior_successes": (0, None, True),
    "prior_failures": (0, None, True), "init_value": (None, None, False),
}


def _check_hyperparameter(source: str, key: str, value, annotation):
    """One line naming the setting (as `--set KEY` on the command line) for a wrong type or range."""
    where = f"--set {key}"
    # annotations are strings under `from __future__ import annotations`
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: expected a number, got {value!r}")
    if annotation in (int, "int") and not isinstance(value, int):
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if not math.isfinite(value):
        raise UserError(f"{where}: {value!r} is not a finite number")
    low, high, open_low = RANGES.get(key, (None, None, False))
    if (low is not None and (value <= low if open_low else value < low)) or \
            (high is not None and value > high):
        bounds = f"{'>' if open_low else '>='} {low}" if high is None else \
            f"between {low} and {high}"
        raise UserError(f"{where}: must be {bounds} for {source}, got {value!r}")


__all__ = ["Source", "Histories", "collect", "SOURCES", "make_source", "QLearning",
           "QLearningConfig", "ActorCritic", "ActorCriticConfig", "UCB", "UCBConfig", "Thompson",
           "ThompsonConfig", "RandomPolicy", "RandomConfig"]
