"""Source algorithms (the learners whose histories AD distils), by name."""
from __future__ import annotations

from dataclasses import fields

from ..config import check_value
from ..envs.base import TaskFamily
from ..envs.spec import ObsSpec
from ..errors import UserError
from .actor_critic import ActorCritic, ActorCriticConfig
from .bandit import UCB, RandomConfig, RandomPolicy, Thompson, ThompsonConfig, UCBConfig
from .base import Histories, Source, collect
from .dqn import DQN, DQNConfig
from .qlearning import QLearning, QLearningConfig

SOURCES = {
    "qlearning": (QLearning, QLearningConfig),
    "actor-critic": (ActorCritic, ActorCriticConfig),
    "ucb": (UCB, UCBConfig),
    "thompson": (Thompson, ThompsonConfig),
    "random": (RandomPolicy, RandomConfig),
    "dqn": (DQN, DQNConfig),
}


def make_source(name: str, family: TaskFamily, n: int, config: dict | None = None,
                seed: int = 0) -> Source:
    """`n` independent learners of the algorithm called `name` (see SOURCES) for `family`'s tasks,
    with hyperparameters overridden by `config` (keys of that algorithm's config dataclass).
    A source that does not apply to the family (see `applies`) is a UserError.

    The learner observes what `observed_spec` picks: the family's observations if it takes them,
    else the family's state (then `observes_state` is set and `collect` feeds it `env.state()`).
    Its first constructor argument describes that spec: the bounds (`high`) of a discrete one,
    the (H, W, C) `shape` of an image."""
    if name not in SOURCES:
        raise UserError(f"unknown source algorithm {name!r}; "
                        f"choose from {', '.join(sorted(SOURCES))}")
    cls, config_cls = SOURCES[name]
    if not applies(cls, family):
        fits = [k for k, (c, _) in SOURCES.items() if applies(c, family)]
        raise UserError(f"source {name!r} does not apply to {family.name} tasks; choose from "
                        f"{', '.join(fits)}")
    config = dict(config or {})
    types = {f.name: f.type for f in fields(config_cls)}
    unknown = sorted(set(config) - set(types))
    if unknown:
        raise UserError(f"unknown {name} hyperparameter(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(sorted(types))}")
    for key, value in config.items():
        kind = {int: int, "int": int, str: str, "str": str}.get(types[key], float)
        low, high, open_low = RANGES.get(key, (None, None, False))
        check_value(f"--set {key}", value, kind, low, high, open_low)
    spec, on_state = observed_spec(cls, family)
    dims = spec.high if spec.kind == "discrete" else spec.shape
    try:
        source = cls(dims, family.n_actions, n, config_cls(**config), seed=seed)
    except ValueError as e:      # settings that are each in range but do not go together
        raise UserError(f"{name}: {e}") from None
    source.observes_state = on_state
    return source


def observed_spec(cls, family: TaskFamily) -> tuple[ObsSpec | None, bool]:
    """What source class `cls` would observe on `family`: (the family's obs_spec, False) if its
    `obs_kinds` take the observations, else (the family's state_spec, True) if they take that,
    else (None, False). A class without `obs_kinds` takes any observations."""
    kinds = getattr(cls, "obs_kinds", None)
    if kinds is None or family.obs_spec.kind in kinds:
        return family.obs_spec, False
    state = getattr(family, "state_spec", None)
    if state is not None and state.kind in kinds:
        return state, True
    return None, False


def applies(cls, family: TaskFamily) -> bool:
    """Whether source class `cls` can learn `family`'s tasks: each class may declare the
    `families` (names) and the observation kinds (`obs_kinds`) it is made for; none: any. A kind
    that fits the family's state_spec, if the observations do not fit, applies too."""
    families = getattr(cls, "families", None)
    return (families is None or family.name in families) and \
        observed_spec(cls, family)[0] is not None


def parse_settings(items) -> dict:
    """Command-line `--set KEY=VALUE` items as a config dict: numbers where they read as one, else
    strings (make_source checks the keys, the types and the ranges)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = float(value) if any(c in value for c in ".eEnN") else int(value)
        except ValueError:
            out[key] = value
    return out


# Allowed ranges, (low, high, low is exclusive): outside them a source crashes deep inside its
# update or silently learns nothing.
RANGES = {
    "lr": (0, None, True), "gamma": (0, 1, False), "eps_start": (0, 1, False),
    "eps_end": (0, 1, False), "eps_decay_episodes": (0, None, False),
    "planning_sweeps": (0, None, False), "reward_stages": (1, None, False),
    "optimism_decay": (0, 1, True),
    "n_steps": (1, None, False), "hidden": (1, None, False), "entropy_coef": (0, None, False),
    "value_coef": (0, None, False), "c": (0, None, False), "prior_successes": (0, None, True),
    "prior_failures": (0, None, True), "init_value": (None, None, False),
}


__all__ = ["DQN", "DQNConfig", "Source", "Histories", "collect", "SOURCES", "make_source", "applies", "observed_spec",
           "parse_settings", "QLearning", "QLearningConfig", "ActorCritic", "ActorCriticConfig",
           "UCB", "UCBConfig", "Thompson", "ThompsonConfig", "RandomPolicy", "RandomConfig"]
