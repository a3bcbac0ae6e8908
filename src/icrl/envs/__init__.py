"""Task families by name."""
from __future__ import annotations

from ..errors import UserError
from .atari import Atari
from .base import BatchedEnv, TaskFamily
from .bandit import AdversarialBandit
from .darkroom import DarkRoom
from .keydoor import DarkKeyToDoor
from .minatar import MinAtar
from .watermaze import Watermaze

FAMILIES = {
    "darkroom": lambda: DarkRoom(),
    "darkroom-hard": lambda: DarkRoom(size=17, sparse=True),
    "darkroom-pixels": lambda: DarkRoom(size=6, episode_len=12, pixels=True),  # image tests
    "keydoor": lambda: DarkKeyToDoor(),
    "bandit": lambda: AdversarialBandit(),
    "watermaze": lambda: Watermaze(),
    "watermaze-state": lambda: Watermaze(observe="state"),   # the true state: a perception check
    "minatar": lambda: MinAtar(),
    "atari": lambda: Atari(),
}


def make_family(name: str, **overrides) -> TaskFamily:
    """The task family called `name` (see FAMILIES), with optional settings overridden."""
    if name not in FAMILIES:
        raise UserError(f"unknown task family {name!r}; choose from {', '.join(sorted(FAMILIES))}")
    family = FAMILIES[name]()
    if overrides:
        family = type(family)(**{**_init_args(family), **overrides})
    return family


def family_from_config(config: dict) -> TaskFamily:
    """Rebuild a family from the `config()` stored in a dataset or checkpoint."""
    config = dict(config)
    name = config.pop("name", None)
    if name not in FAMILIES:
        raise UserError(f"unknown task family {name!r} in stored config")
    return make_family(name, **config)


def _init_args(family: TaskFamily) -> dict:
    return {k: v for k, v in family.config().items() if k != "name"}


__all__ = ["BatchedEnv", "TaskFamily", "DarkRoom", "DarkKeyToDoor", "AdversarialBandit",
           "Watermaze", "MinAtar", "Atari", "FAMILIES", "make_family", "family_from_config"]
