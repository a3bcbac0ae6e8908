"""Make a history dataset: run a source algorithm on every (task, seed) of one side of the split.

The histories are made in chunks of `chunk_size` rows, each with its own seed, and every finished
chunk is saved (atomically) in `OUT.parts/` beside the output (icrl/parts.py). A run that is killed
and started again with the same settings skips the chunks already on disk, so it ends with exactly
the dataset an uninterrupted run makes. The chunks are then joined into the output file and
removed. With a `shard`, a process makes only its share of the chunks and leaves the join to a
last run without one; with `workers`, one call starts that many local processes, one shard each,
and joins their chunks itself (for slow sources whose chunks each keep one core busy).
"""
from __future__ import annotations

import json
import multiprocessing
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .atomic import output_lock
from .config import check, param
from .data.store import HistoryArrays, HistoryStore, write_store
from .envs.base import TaskFamily
from .errors import UserError
from .parts import WHOLE, Parts, Shard, chunk_seed
from .sources import make_source
from .sources.base import collect, collect_run

CHUNK_KEYS = ("obs", "actions", "rewards", "dones", "episode_returns")


@dataclass
class GenerateConfig:
    source: str = param("qlearning", help="source RL algorithm (see icrl.sources.SOURCES)")
    source_config: dict = param({}, help="the source's hyperparameters (--set KEY=VALUE)")
    n_episodes: int = param(100, low=1, flag="episodes", help="episodes per task")
    seeds_per_task: int = param(20, low=1, help="independent histories per task")
    every: int = param(1, low=1, help="keep every k-th episode")
    expert_episodes: int = param(0, low=0, help="if > 0: after the episodes, record only this "
                                 "many greedy episodes (data for Expert Distillation)")
    tasks: str = param("train", help="task set of the split to run on: train, test, or ood")
    n_test: int = param(16, low=1, help="held-out tasks in the split")
    n_train: int | None = param(None, low=1, help="cap on the training tasks (default: every "
                                "task not held out)")
    split_seed: int = param(0, low=0)
    seed: int = param(0, low=0)
    chunk_size: int = param(2048, low=1, help="histories per chunk; finished chunks survive an "
                            "interrupted run")
    steps: int = param(0, low=0, help="if > 0: record every transition of a learning run of "
                       "this many steps per history, episodes of any length (replay data for "
                       "the Decision Transformer); --episodes and --every are then unused")

    def validate(self, family: TaskFamily):
        check(self)  # types and ranges, as declared above
        if self.steps and (self.every != 1 or self.expert_episodes):
            raise UserError("--steps records whole runs: leave --every and --expert-episodes "
                            "at their defaults")
        if self.every > self.n_episodes:
            raise UserError(f"--every: must be between 1 and the episode count "
                            f"({self.n_episodes}), got {self.every}")
        sets = self.split(family)
        if self.tasks not in sets:
            raise UserError(f"--tasks: must be one of {', '.join(sets)} for {family.name}, "
                            f"got {self.tasks!r}")

    def split(self, family: TaskFamily) -> dict[str, np.ndarray]:
        try:
            return family.split(self.n_test, self.split_seed, self.n_train)
        except ValueError as e:
            raise UserError(str(e)) from None


def generate(family: TaskFamily, out: str | Path, cfg: GenerateConfig, progress: bool = True,
             shard: Shard = WHOLE, workers: int = 1) -> Path:
    """Write the dataset to `out` and return its path. Reruns resume (see the module docstring);
    if `out` already holds the dataset these settings make, it is returned as it is. Sizes that
    cannot fit, and an output another process is writing, are refused up front (UserError).

    With a `shard` other than the whole job, only that shard's chunks are made; the chunk
    folder `OUT.parts` is returned and a later call without a shard joins it into `out`.
    `workers` > 1 makes the chunks in that many processes (shards i/workers) before the join;
    the file is the one a single process writes with the workers' share of threads (a PyTorch
    source's float rounding, and so its histories, depend on the thread count)."""
    cfg.validate(family)
    check_generate_size(family, cfg, out)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UserError(f"--workers: expected an integer >= 1, got {workers!r}")
    if workers > 1 and not shard.whole:
        raise UserError("--workers runs every shard itself: give --workers or --shard, not both")
    if workers > 1 and not Path(out).exists():
        _generate_in_processes(family, Path(out), cfg, workers, progress)
    with output_lock(shard.lock_path(out)):
        return _generate(family, Path(out), cfg, progress, shard)


def _generate_in_processes(family: TaskFamily, out: Path, cfg: GenerateConfig, workers: int,
                           progress: bool):
    """Shards 0..workers-1 of the job, each in a process of its own (spawned: no state of this
    one is shared), with the cores split between them."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    jobs = [(family.config(), str(out), cfg, Shard(i, workers), threads) for i in range(workers)]
    # The workers' BLAS and OpenMP pools too: each would start one thread per core, N
    # processes x all cores.
    limits = {k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                        "MKL_NUM_THREADS")}
    saved = {k: os.environ.get(k) for k in limits}
    os.environ.update(limits)      # read by the spawned interpreters as they start
    try:
        pool = multiprocessing.get_context("spawn").Pool(workers)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    with pool:
        # a worker's error (a UserError too) is raised here
        for _ in tqdm(pool.imap_unordered(_generate_shard, jobs), total=workers,
                      desc=f"generate {out.name} ({workers} processes)", disable=not progress):
            pass
        pool.close()    # let the workers exit on their own rather than be terminated
        pool.join()


def _generate_shard(job):
    import torch

    from .envs import family_from_config

    family_config, out, cfg, shard, threads = job
    torch.set_num_threads(threads)
    generate(family_from_config(family_config), out, cfg, progress=False, shard=shard)


def _generate(family: TaskFamily, out: Path, cfg: GenerateConfig, progress: bool,
              shard: Shard) -> Path:
    split = cfg.split(family)
    task_ids = np.repeat(split[cfg.tasks], cfg.seeds_per_task)
    tasks = family.tasks()[task_ids]
    source = make_source(cfg.source, family, 1, cfg.source_config, cfg.seed)  # checks the names
    expert, replay = cfg.expert_episodes > 0, cfg.steps > 0
    meta = {
        "kind": "replay" if replay else "expert" if expert else "histories",
        "family": family.config(),
        "split": {"seed": cfg.split_seed, **{k: v.tolist() for k, v in split.items()}},
        "source": {"name": cfg.source, "config": source.hyperparameters()},
        "generate": asdict(cfg),
        "obs_spec": family.obs_spec.to_dict(),
        "n_actions": family.n_actions,
        "episode_len": family.episode_len,     # the longest an episode may be
        # a replay's rows finish different numbers of episodes: known once they are joined
        "n_episodes": None if replay else cfg.n_episodes + cfg.expert_episodes,
        "every": 1 if expert else cfg.every,
        "record_from": cfg.n_episodes if expert else 0,
    }
    parts = Parts(out, meta, CHUNK_KEYS)
    if _finished(out, meta):
        parts.remove()  # a run killed just after its join
        return out
    parts.start()

    starts = range(0, len(tasks), cfg.chunk_size)
    mine = [i for i in range(len(starts)) if shard.owns(i)]
    for i in tqdm(mine, desc=f"generate {out.name} (chunks)",
                  disable=not progress or len(starts) == 1):
        if parts.load(i) is not None:
            continue
        rows = slice(starts[i], starts[i] + cfg.chunk_size)
        parts.save(i, _collect_chunk(family, tasks[rows], cfg, meta, chunk_seed(cfg.seed, i),
                                     progress))
    if not shard.whole:
        return parts.folder

    def load(i):
        data = parts.load(i)
        if data is None:
            raise UserError(f"{parts.folder}: chunk {i} was damaged while joining; rerun to "
                            f"redo it")
        return data

    if replay:  # every row's episode returns padded (NaN) to the most any row finished
        meta["n_episodes"] = max(load(i)["episode_returns"].shape[1] for i in range(len(starts)))

    def chunks():
        for i, start in enumerate(starts):
            data = load(i)
            returns = data["episode_returns"]
            data["episode_returns"] = np.pad(returns, ((0, 0), (0, meta["n_episodes"] -
                                                                returns.shape[1])),
                                             constant_values=np.nan)
            rows = slice(start, start + cfg.chunk_size)
            yield HistoryArrays(**data, task_ids=task_ids[rows], tasks=tasks[rows],
                                seeds=np.arange(len(task_ids))[rows] % cfg.seeds_per_task)

    write_store(out, chunks(), meta)
    parts.remove()
    return out


def _collect_chunk(family, tasks, cfg: GenerateConfig, meta: dict, seed: int,
                   progress: bool) -> dict[str, np.ndarray]:
    source = make_source(cfg.source, family, len(tasks), cfg.source_config, seed)
    if cfg.steps:
        hist = collect_run(family, tasks, source, cfg.steps, seed=seed, progress=progress)
        return {"obs": hist.obs, "actions": hist.actions,
                "rewards": hist.rewards.astype(np.float16), "dones": hist.dones,
                "episode_returns": hist.episode_returns}
    record_from = meta["record_from"]
    hist = collect(family, tasks, source, meta["n_episodes"], every=meta["every"],
                   record_from=record_from, greedy_from=record_from or None, seed=seed,
                   progress=progress)
    return {"obs": hist.obs, "actions": hist.actions, "rewards": hist.rewards.astype(np.float16),
            "dones": hist.dones, "episode_returns": hist.episode_returns}


def _finished(out: Path, meta: dict) -> bool:
    """Whether `out` already is the dataset these settings make. Anything else there is an error
    rather than something to overwrite."""
    if not out.exists():
        return False
    if out.is_dir():
        raise UserError(f"{out} is a directory, expected a file path")
    with HistoryStore(out) as store:  # raises a clear error for a damaged or foreign file
        stored = store.meta
    planned = {k: v for k, v in json.loads(json.dumps(meta)).items() if v is not None}
    if {k: stored.get(k) for k in planned} != planned:
        raise UserError(f"{out} holds a dataset made with other settings; delete it or choose "
                        f"another output path")
    return True


def check_generate_size(family: TaskFamily, cfg: GenerateConfig, out: str | Path):
    """UserError, before any work, if the dataset cannot fit on the disk of `out` or one chunk in
    memory (a lower bound: absurd sizes such as 10**12 episodes fail here, not in an allocation)."""
    from .resources import check_fits

    n = len(cfg.split(family)[cfg.tasks]) * cfg.seeds_per_task
    episodes = cfg.n_episodes + cfg.expert_episodes
    steps = cfg.steps or (cfg.expert_episodes or -(-cfg.n_episodes // cfg.every)) * \
        family.episode_len
    spec = family.obs_spec
    # obs, then a uint8 action, a float16 reward and a bool done
    step_bytes = int(np.prod(spec.shape)) * spec.store_dtype.itemsize + 4
    # on disk, plus float32 returns; while collecting, the rewards are float32
    check_fits(disk=n * (steps * step_bytes + episodes * 4), disk_path=out,
               memory=min(n, cfg.chunk_size) * (steps * (step_bytes + 2) + episodes * 4),
               what=f"{n} histories of {steps} steps",
               advice="use fewer tasks, seeds or episodes, or a smaller --chunk-size")
