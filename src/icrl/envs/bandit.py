"""Adversarial Bandit: 10 Bernoulli arms whose best arm's parity shifts between training and test.

A task is the vector of arm means, each drawn from U[0, 1]; the largest is then moved to an arm of
the *favoured* parity with probability `favour_prob`, else to one of the other parity (arms are
numbered from 0: "odd" means arms 1, 3, 5, 7, 9). The in-distribution tasks favour odd arms (they
give the training tasks and a held-out test set), the out-of-distribution ("ood") tasks favour even
arms. Each pull is an episode of length 1 that pays Bernoulli(mean of the arm); there is nothing to
observe (a constant observation 0).

The task table is drawn once from `task_seed`, so a family config names the same tasks everywhere.
"""
from __future__ import annotations

import numpy as np

from .spec import ObsSpec
from .base import BatchedEnv, TaskFamily


class BanditEnv(BatchedEnv):
    def __init__(self, means: np.ndarray, seed: int = 0):
        self.means = np.asarray(means, dtype=np.float64)
        self.n = len(self.means)
        self.rng = np.random.default_rng(seed)
        self.rows = np.arange(self.n)

    def reset(self, mask=None):
        return np.zeros((self.n, 1), dtype=np.int64)

    def step(self, actions):
        p = self.means[self.rows, np.asarray(actions, dtype=np.int64)]
        reward = (self.rng.random(self.n) < p).astype(np.float32)
        return np.zeros((self.n, 1), dtype=np.int64), reward, np.ones(self.n, dtype=bool)


def draw_means(n: int, n_arms: int, favour_odd: bool, favour_prob: float,
               rng: np.random.Generator) -> np.ndarray:
    """`n` tasks whose best arm has the favoured parity with probability `favour_prob`."""
    means = rng.random((n, n_arms))
    favoured = np.arange(1 if favour_odd else 0, n_arms, 2)
    other = np.arange(0 if favour_odd else 1, n_arms, 2)
    use_favoured = rng.random(n) < favour_prob
    best = np.where(use_favoured, rng.choice(favoured, size=n), rng.choice(other, size=n))
    # Swap the largest mean into the chosen arm.
    rows, top = np.arange(n), means.argmax(axis=1)
    means[rows, top], means[rows, best] = means[rows, best], means[rows, top]
    return means


class AdversarialBandit(TaskFamily):
    name = "bandit"
    obs_spec = ObsSpec.discrete((1,))   # nothing to see: a constant 0
    episode_len = 1

    def __init__(self, n_arms: int = 10, n_tasks: int = 20000, n_ood_tasks: int = 500,
                 favour_prob: float = 0.95, task_seed: int = 0):
        if n_arms < 2 or n_tasks < 2 or n_ood_tasks < 1 or not 0 <= favour_prob <= 1:
            raise ValueError("a bandit needs n_arms >= 2, n_tasks >= 2, n_ood_tasks >= 1 and "
                             "favour_prob in [0, 1]")
        self.n_actions, self.n_tasks, self.n_ood_tasks = n_arms, n_tasks, n_ood_tasks
        self.favour_prob, self.task_seed = favour_prob, task_seed
        rng = np.random.default_rng(task_seed)
        self._table = np.concatenate([
            draw_means(n_tasks, n_arms, True, favour_prob, rng),
            draw_means(n_ood_tasks, n_arms, False, favour_prob, rng)])

    def config(self):
        return {"name": self.name, "n_arms": self.n_actions, "n_tasks": self.n_tasks,
                "n_ood_tasks": self.n_ood_tasks, "favour_prob": self.favour_prob,
                "task_seed": self.task_seed}

    def tasks(self):
        """(n_tasks + n_ood_tasks, n_arms) arm means: odd-favoured rows first, then even-favoured."""
        return self._table.copy()

    def make(self, tasks, seed=0):
        return BanditEnv(tasks, seed)

    def oracle_returns(self, tasks):
        return np.asarray(tasks, dtype=np.float64).max(axis=1)

    def split(self, n_test, seed=0, n_train=None):
        """Train and test are disjoint odd-favoured tasks; "ood" is every even-favoured task."""
        ids = self._partition(self.n_tasks, n_test, seed, n_train)
        return {**ids, "ood": np.arange(self.n_tasks, self.n_tasks + self.n_ood_tasks)}

    def check_task(self, task):
        task = np.asarray(task, dtype=np.float64)
        if task.shape != (self.n_actions,) or not ((task >= 0) & (task <= 1)).all():
            raise ValueError(f"a bandit task is {self.n_actions} arm means in [0, 1], "
                             f"got {task.tolist()}")
        return task
