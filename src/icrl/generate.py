"""Make a history dataset: run a source algorithm on every (task, seed) of one side of the split."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .data.store import HistoryArrays, write_store
from .envs.base import TaskFamily
from .errors import UserError
from .sources import make_source
from .sources.base import collect


@dataclass
class GenerateConfig:
    source: str = "qlearning"
    source_config: dict = field(default_factory=dict)
    n_episodes: int = 100            # episodes the source runs on each task
    seeds_per_task: int = 20         # independent histories per task
    every: int = 1                   # keep every k-th episode
    expert_episodes: int = 0         # > 0: after n_episodes, record this many greedy episodes only
    tasks: str = "train"             # which side of the split to run on
    n_test: int = 16                 # size of the held-out side of the split
    split_seed: int = 0
    seed: int = 0

    def validate(self, family: TaskFamily):
        n_tasks = len(family.tasks())
        checks = [
            (self.n_episodes >= 1, "episodes must be >= 1"),
            (self.seeds_per_task >= 1, "seeds per task must be >= 1"),
            (1 <= self.every <= self.n_episodes, "every must be between 1 and the episode count"),
            (self.expert_episodes >= 0, "expert episodes must be >= 0"),
            (self.tasks in ("train", "test"), "tasks must be 'train' or 'test'"),
            (0 < self.n_test < n_tasks, f"n_test must be between 1 and {n_tasks - 1}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)


def generate(family: TaskFamily, out: str | Path, cfg: GenerateConfig,
             progress: bool = True) -> Path:
    cfg.validate(family)
    train_ids, test_ids = family.split(cfg.n_test, cfg.split_seed)
    task_ids = np.repeat(train_ids if cfg.tasks == "train" else test_ids, cfg.seeds_per_task)
    tasks = family.tasks()[task_ids]
    source = make_source(cfg.source, family, len(tasks), cfg.source_config, cfg.seed)
    expert = cfg.expert_episodes > 0
    total = cfg.n_episodes + cfg.expert_episodes
    hist = collect(family, tasks, source, total, every=1 if expert else cfg.every,
                   record_from=cfg.n_episodes if expert else 0,
                   greedy_from=cfg.n_episodes if expert else None, seed=cfg.seed,
                   progress=progress)
    meta = {
        "kind": "expert" if expert else "histories",
        "family": family.config(),
        "split": {"seed": cfg.split_seed, "train": train_ids.tolist(), "test": test_ids.tolist()},
        "source": {"name": cfg.source, "config": source.hyperparameters()},
        "generate": asdict(cfg),
        "episode_len": family.episode_len,
        "n_episodes": total,
        "every": 1 if expert else cfg.every,
        "record_from": cfg.n_episodes if expert else 0,
    }
    arrays = HistoryArrays(hist.obs, hist.actions, hist.rewards, task_ids, tasks,
                           np.tile(np.arange(cfg.seeds_per_task), len(task_ids) // cfg.seeds_per_task),
                           hist.episode_returns)
    return write_store(out, arrays, meta)
