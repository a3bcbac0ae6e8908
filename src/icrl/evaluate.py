"""In-context evaluation: frozen weights, empty contexts, many consecutive episodes, all tasks in
one batch. The cached agent is the default; the recomputing one (agent.py) exists to check and
benchmark it."""
from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from .agent import InContextAgent, RecomputingAgent, check_return_options
from .envs.base import TaskFamily
from .errors import UserError
from .models.policy import SequencePolicy
from .parts import WHOLE, Parts, Shard, chunk_seed
from .resources import check_evaluate_size, check_fits


def rollout(policy: SequencePolicy, family: TaskFamily, tasks: np.ndarray, n_episodes: int, *,
            greedy: bool = False, temperature: float = 1.0, seed: int = 0, cache: bool = True,
            return_mode: str = "sample", target_return=None,
            kappa: float = 10.0, progress: bool = False) -> np.ndarray:
    """Returns (n_tasks, n_episodes): each task's return in each consecutive in-context episode.
    `return_mode`, `target_return` (a number, or one per task) and `kappa`: how a
    return-conditioned layout chooses its returns-to-go (see InContextAgent)."""
    tasks = _check_inputs(policy, family, tasks, n_episodes)
    check_evaluate_size(policy, len(tasks))
    agent_cls = InContextAgent if cache else RecomputingAgent
    agent = agent_cls(policy, greedy=greedy, temperature=temperature, seed=seed,
                      return_mode=return_mode, target_return=target_return, kappa=kappa)
    env = family.make(tasks, seed=seed)
    agent.start(len(tasks))
    returns = np.zeros((len(tasks), n_episodes))
    episode = np.zeros(len(tasks), dtype=np.int64)   # each row's current episode
    rows = np.arange(len(tasks))
    bar = tqdm(total=n_episodes, desc="in-context episodes", disable=not progress, leave=False)
    obs = env.reset()
    while (episode < n_episodes).any():
        obs, reward, done = env.step(agent.act(obs))
        agent.observe(reward, done)
        live = episode < n_episodes   # rows past their last episode act on, unrecorded
        returns[rows[live], episode[live]] += reward[live]
        episode += done
        if done.any():  # episodes may end at different times: reset only the rows that ended
            obs = env.reset(done)
            bar.update(int(episode.min()) - bar.n)
    bar.close()
    return returns


EVAL_CHUNK = 1024  # rows (task x rollout) per batch: bounds the memory of a large evaluation


def evaluate(policy, family, tasks, n_episodes: int, rollouts_per_task: int = 1, *,
             seed: int = 0, chunk_size: int = EVAL_CHUNK, parts: Parts | None = None,
             shard: Shard = WHOLE, progress: bool = False, return_mode: str = "sample",
             target_return=None, kappa: float = 10.0, **kwargs):
    """Rollouts batched over tasks x repeats: returns (rollouts_per_task, n_tasks, n_episodes).

    The rows (rollout-major) run in batches of `chunk_size`, each seeded by chunk_seed(seed, i),
    so results depend on the chunk size but not on how chunks are shared out. With `parts`
    (a Parts folder of this evaluation's settings) finished chunks are saved there and reused by a
    rerun; with a `shard`, only its chunks run and None is returned (a last call without a shard
    joins them). `return_mode`, `target_return`, `kappa` (checked first: see InContextAgent) and
    the other keyword arguments go to `rollout`; `target_return` is a number, one per task, or
    one per row (rollout-major, as the rows)."""
    tasks = _check_inputs(policy, family, tasks, n_episodes)
    check_return_options(policy, return_mode, target_return, kappa)
    for name, value in (("rollouts_per_task", rollouts_per_task), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    n_rows = len(tasks) * rollouts_per_task
    targets = None   # one per row, when given per task or per row
    if np.ndim(target_return):
        targets = np.asarray(target_return)
        if len(targets) == len(tasks):
            targets = np.tile(targets, rollouts_per_task)
        elif len(targets) != n_rows:
            raise ValueError(f"target_return has {len(targets)} values: give one per task "
                             f"({len(tasks)}) or one per row ({n_rows})")
    # Before anything is built: one chunk's rollouts, and every row's task and returns.
    check_evaluate_size(policy, min(n_rows, chunk_size))
    check_fits(f"{n_rows} rollouts of {n_episodes} episodes", "lower --rollouts or "
               "--episodes", memory=8 * n_rows * (n_episodes + tasks.shape[1]))
    rows = np.repeat(tasks[None], rollouts_per_task, axis=0).reshape(-1, tasks.shape[1])
    starts = range(0, len(rows), chunk_size)
    chunks = {}
    if parts is not None:
        parts.start()
    for i in tqdm([i for i in range(len(starts)) if shard.owns(i)], desc="evaluation chunks",
                  disable=not progress or len(starts) == 1):
        if parts is not None and parts.load(i) is not None:
            continue
        chunk = slice(starts[i], starts[i] + chunk_size)
        returns = rollout(policy, family, rows[chunk], n_episodes, seed=chunk_seed(seed, i),
                          progress=progress, return_mode=return_mode, kappa=kappa,
                          target_return=target_return if targets is None else targets[chunk],
                          **kwargs)
        if parts is None:
            chunks[i] = returns
        else:
            parts.save(i, {"returns": returns})
    if not shard.whole:
        return None
    returns = np.concatenate([chunks[i] if parts is None else _saved(parts, i)
                              for i in range(len(starts))])
    if parts is not None:
        parts.remove()
    return returns.reshape(rollouts_per_task, len(tasks), n_episodes)


def _saved(parts: Parts, chunk: int) -> np.ndarray:
    data = parts.load(chunk)
    if data is None:
        raise UserError(f"{parts.folder}: chunk {chunk} was damaged; rerun to redo it")
    return data["returns"]


def _check_inputs(policy, family: TaskFamily, tasks, n_episodes) -> np.ndarray:
    """ValueError, in one line, for inputs that would otherwise fail deep inside a rollout (or,
    worse, run: a policy of another family indexes embeddings with foreign observations)."""
    if not isinstance(policy, SequencePolicy):
        raise TypeError(f"policy must be a SequencePolicy, got {type(policy).__name__}")
    if not isinstance(family, TaskFamily):
        raise TypeError(f"family must be a TaskFamily, got {type(family).__name__}")
    cfg = policy.cfg
    misfit = cfg.misfit(family)
    if misfit:
        raise ValueError(f"the policy was not made for {family.name}: {misfit}")
    if isinstance(n_episodes, bool) or not isinstance(n_episodes, (int, np.integer)) \
            or n_episodes < 1:
        raise ValueError(f"n_episodes must be an integer >= 1, got {n_episodes!r}")
    table = family.tasks()
    try:  # float64 first: a cast to the table's int64 would truncate 2.5 to a valid 2
        tasks = np.asarray(tasks, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"tasks must be an array of {family.name} task parameters") from None
    if tasks.ndim != 2 or tasks.shape[1:] != table.shape[1:] or len(tasks) == 0:
        raise ValueError(f"tasks must have shape (n_tasks >= 1, {table.shape[1]}) for "
                         f"{family.name} (rows of family.tasks()), got {tasks.shape}")
    for task in np.unique(tasks, axis=0):
        family.check_task(task)  # ValueError naming a row that is no task of the family
    return tasks.astype(table.dtype)
