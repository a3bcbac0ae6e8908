"""Source algorithms (the learners whose histories AD distils), by name."""
from __future__ import annotations

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
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise UserError(f"unknown {name} hyperparameter(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(sorted(known))}")
    return cls(family.obs_dims, family.n_actions, n, config_cls(**config), seed=seed)


__all__ = ["Source", "Histories", "collect", "SOURCES", "make_source", "QLearning",
           "QLearningConfig", "ActorCritic", "ActorCriticConfig", "UCB", "UCBConfig", "Thompson",
           "ThompsonConfig", "RandomPolicy", "RandomConfig"]
