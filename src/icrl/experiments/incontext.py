"""Experiment 1 (and 5, 6): in-context RL on held-out tasks — AD vs ED vs the source algorithm.

    generate histories + expert data -> train AD and ED (per training seed) -> evaluate on every
    evaluation set of the split (held-out "test" tasks; the bandit adds out-of-distribution "ood"
    tasks) from empty contexts -> report.json + incontext.png

The same code runs every family; a preset may add reference learners (the bandit's UCB, Thompson
sampling, random), which are run on the same tasks and reported with the best-task oracle.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np

from ..atomic import check_directory, is_temporary
from ..baselines.rl2 import train_rl2
from ..checkpoint import load_policy
from ..data.store import HistoryStore
from ..envs import make_family
from ..errors import UserError
from ..evaluate import evaluate
from ..generate import generate
from ..report import plot_incontext, summarize, write_json
from ..sources import make_source
from ..sources.base import collect
from ..train import train
from .episodes import record_episodes, save_side_by_side_gif
from .presets import Preset, get_preset


# What a run writes in its output directory. A rerun on the same directory reuses finished data
# and checkpoints and resumes an interrupted training (settings must match).
OUTPUTS = ("data", "ad", "ed", "rl2", "report.json", "incontext.png", "ad_episodes.gif")
METHODS = ("AD", "ED", "RL2")


def parse_methods(text: str) -> tuple[str, ...]:
    """"AD,ED,RL2" -> ("AD", "ED", "RL2"), in that canonical order; UserError for others."""
    names = [m.strip().upper() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise UserError(f"--methods: choose among {', '.join(METHODS)} (comma-separated), "
                        f"got {text!r}")
    return tuple(m for m in METHODS if m in names)


def check_output_dir(out_dir, outputs=OUTPUTS):
    """UserError unless `out_dir` is new, empty, or holds only an earlier run's `outputs` (to
    resume it) and the hidden temporary files of a killed writer: never anyone else's files."""
    out = Path(out_dir)
    check_directory(out)
    others = sorted(p.name for p in out.iterdir()
                    if p.name not in outputs and not is_temporary(p)) if out.is_dir() else []
    if others:
        raise UserError(f"{out} holds other files ({', '.join(others[:3])}); choose an empty "
                        f"or new directory")


def clear_outputs(out_dir, outputs=OUTPUTS):
    """Delete an earlier run's outputs (only the names in `outputs`)."""
    for name in outputs:
        path = Path(out_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def run_incontext(family_name: str, out_dir, preset: Preset | None = None,
                  methods: tuple[str, ...] = ("AD", "ED"), progress: bool = True,
                  log=print) -> dict:
    preset = preset or get_preset(family_name)
    methods = parse_methods(",".join(methods))
    family = make_family(family_name)
    out = Path(out_dir)
    t0 = time.time()

    log(f"[1/4] generating {family_name} learning histories and expert data")
    data = generate(family, out / "data" / "histories.h5", preset.histories, progress=progress)
    expert = generate(family, out / "data" / "expert.h5", preset.expert, progress=progress)
    split = preset.histories.split(family)
    eval_sets = {name: family.tasks()[ids] for name, ids in split.items() if name != "train"}

    log("[2/4] the source algorithm and the reference learners on the evaluation tasks")
    learners = {"source": (preset.histories.source, preset.histories.source_config),
                **preset.references}
    curves = {s: {name: learner_curve(family, tasks, src, config, preset.eval_episodes,
                                      preset.eval_rollouts, seed=preset.histories.seed + 1)
                  for name, (src, config) in learners.items()}
              for s, tasks in eval_sets.items()}

    results = {s: {m: [] for m in methods} for s in eval_sets}
    for seed in range(preset.train_seeds):
        for method in methods:
            where = out / method.lower() / f"seed{seed}"
            if method == "RL2":  # online, on the training tasks of the histories' split
                log(f"[3/4] training RL² (seed {seed}, {preset.rl2.steps:,} environment steps)")
                ckpt = train_rl2(data, where, dataclasses.replace(preset.rl2, seed=seed),
                                 progress=progress)
            else:
                path, steps = (data, preset.train.steps) if method == "AD" else \
                    (expert, preset.ed_steps)
                log(f"[3/4] training {method} (seed {seed}, {steps} steps)")
                cfg = dataclasses.replace(preset.train, steps=steps, seed=seed)
                ckpt = train(path, where, preset.model, cfg, progress=progress)
            policy, _ = load_policy(ckpt)
            for s, tasks in eval_sets.items():
                log(f"[4/4] evaluating {method} (seed {seed}) on {len(tasks)} {s} tasks")
                results[s][method].append(evaluate(
                    policy, family, tasks, preset.eval_episodes, preset.eval_rollouts,
                    greedy=preset.greedy, temperature=preset.temperature, seed=seed,
                    progress=progress))

    sections = {s: _section(family, tasks, results[s], curves[s], preset)
                for s, tasks in eval_sets.items()}
    report = {
        "family": family_name,
        **sections.pop("test"),
        "split": {"seed": preset.histories.split_seed,
                  **{f"{k}_tasks": v.tolist() for k, v in split.items()}},
        **sections,  # further evaluation sets, e.g. "ood", each with its own methods
        "histories": histories_summary(data),
        "config": dataclasses.asdict(preset),
        "wall_seconds": round(time.time() - t0, 1),
    }
    if family.obs_spec.kind == "image" and "AD" in methods:
        log("[4/4] drawing AD's first and last in-context episode on one held-out task")
        report["animation"] = _animate_ad(family, eval_sets["test"][0], out, preset)
    write_json(out / "report.json", report)
    n_test = len(eval_sets["test"])
    plot_incontext(report, out / "incontext.png", f"{family_name}: in-context RL",
                   xlabel="pull" if family.episode_len == 1 else "in-context episode",
                   ylabel="reward per pull" if family.episode_len == 1 else "return",
                   section_titles={"test": f"{n_test} held-out tasks",
                                   **{s: f"{len(t)} {s} tasks" for s, t in eval_sets.items()
                                      if s != "test"}})
    return report


def _animate_ad(family, task, out: Path, preset: Preset) -> dict:
    """ad_episodes.gif: the first training seed's AD, its first (left) and last (right)
    in-context episode on `task`."""
    policy, _ = load_policy(out / "ad" / "seed0" / "model.pt")
    first, last, returns = record_episodes(policy, family, task, preset.eval_episodes,
                                           greedy=preset.greedy, temperature=preset.temperature)
    save_side_by_side_gif(out / "ad_episodes.gif", first, last)
    return {"file": "ad_episodes.gif", "task": np.asarray(task).tolist(),
            "first_return": float(returns[0]), "last_return": float(returns[-1])}


def _section(family, tasks, results: dict, curves: dict, preset: Preset) -> dict:
    """The report's numbers on one evaluation set. `results`: per method, one return array per
    training seed; `curves`: per learner, its (rollouts, tasks, episodes) returns."""
    n = len(tasks)
    oracle = family.oracle_returns(tasks)
    methods = {**{m: (np.stack(r), preset.train_seeds) for m, r in results.items()},
               "source": (curves["source"], 1)}
    references = {name: (curves[name], 1) for name in preset.references}
    if references:
        references["oracle"] = (np.broadcast_to(oracle[:, None], curves["source"].shape[1:]), 1)
    section = {"oracle_return_mean": float(oracle.mean()),
               "methods": {m: summarize(r, n, seeds) for m, (r, seeds) in methods.items()},
               "goal_reached_last_episode": {m: float((np.stack(r)[..., -1] > 0).mean())
                                             for m, r in results.items()}}
    if references:
        section["references"] = {m: summarize(r, n, seeds) for m, (r, seeds) in references.items()}
    section["cumulative_regret"] = {m: cumulative_regret(r, oracle)
                                    for m, (r, _) in {**methods, **references}.items()}
    if preset.train_seeds > 1:  # the spread between training seeds of each method's regret
        section["cumulative_regret_seed_std"] = {
            m: round(float(np.std([cumulative_regret(x, oracle) for x in r])), 4)
            for m, r in results.items()}
    return section


def histories_summary(path) -> dict:
    """What AD distils, on its training tasks: the source's mean return in each recorded
    episode of the histories (every `every`-th of its run: the pace AD is trained to follow,
    faster than the source's own curve when episodes are skipped) and in its run's last one."""
    with HistoryStore(path) as store:
        returns = store.column("episode_returns").astype(np.float64)
        every, first = store.meta["every"], store.meta["record_from"]
    kept = returns[:, first::every]
    return {"every": every, "n_histories": len(returns),
            "recorded_episode_return_mean": [round(float(x), 4) for x in kept.mean(0)],
            "final_return_mean": round(float(returns[:, -1].mean()), 4)}


def cumulative_regret(returns: np.ndarray, oracle: np.ndarray) -> float:
    """Sum over episodes (pulls) of the oracle's return minus the curve's, averaged over tasks,
    rollouts and seeds. `returns`: (..., n_tasks, n_episodes); `oracle`: (n_tasks,)."""
    shortfall = oracle[:, None] - np.asarray(returns, dtype=np.float64)
    return round(float(shortfall.sum(-1).mean()), 4) + 0.0  # + 0.0: never print "-0.0"


def learner_curve(family, tasks, source: str, config: dict, episodes: int, rollouts: int,
                  seed: int) -> np.ndarray:
    """A learner's own curve over `episodes` episodes, from scratch on each task, `rollouts`
    independent runs each: (rollouts, n_tasks, episodes), like `evaluate`'s. `seed` should
    differ from the training histories' seed."""
    batch = np.repeat(tasks, rollouts, axis=0)
    learner = make_source(source, family, len(batch), config, seed=seed)
    hist = collect(family, batch, learner, episodes, record_from=episodes, seed=seed)
    return hist.episode_returns.reshape(len(tasks), rollouts, -1).swapaxes(0, 1)
