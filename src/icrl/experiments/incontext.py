"""Experiment 1: in-context RL on held-out tasks — AD vs ED vs the source algorithm.

    generate histories + expert data -> train AD and ED (per training seed) -> evaluate on the
    held-out tasks from empty contexts -> report.json + incontext.png
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from ..checkpoint import load_policy
from ..envs import make_family
from ..evaluate import evaluate
from ..generate import generate
from ..report import plot_incontext, summarize, write_json
from ..sources import make_source
from ..sources.base import collect
from ..train import train
from .presets import Preset, get_preset


def run_incontext(family_name: str, out_dir, preset: Preset | None = None,
                  progress: bool = True, log=print) -> dict:
    preset = preset or get_preset(family_name)
    family = make_family(family_name)
    out = Path(out_dir)
    t0 = time.time()

    log(f"[1/4] generating {family_name} learning histories and expert data")
    data = generate(family, out / "data" / "histories.h5", preset.histories, progress=progress)
    expert = generate(family, out / "data" / "expert.h5", preset.expert, progress=progress)
    train_ids, test_ids = family.split(preset.histories.n_test, preset.histories.split_seed)
    test_tasks = family.tasks()[test_ids]

    log("[2/4] source algorithm's own learning curve on the held-out tasks")
    source_curve = _source_curve(family, test_tasks, preset)

    results = {"AD": [], "ED": []}
    for seed in range(preset.train_seeds):
        for method, path, steps in (("AD", data, preset.train.steps),
                                    ("ED", expert, preset.ed_steps)):
            log(f"[3/4] training {method} (seed {seed}, {steps} steps)")
            cfg = dataclasses.replace(preset.train, steps=steps, seed=seed)
            ckpt = train(path, out / method.lower() / f"seed{seed}", preset.model, cfg,
                         progress=progress)
            policy, _ = load_policy(ckpt)
            log(f"[4/4] evaluating {method} (seed {seed}) on {len(test_tasks)} held-out tasks")
            results[method].append(evaluate(policy, family, test_tasks, preset.eval_episodes,
                                            preset.eval_rollouts, greedy=preset.greedy,
                                            temperature=preset.temperature, seed=seed,
                                            progress=progress))

    n_seeds = preset.train_seeds
    report = {
        "family": family_name,
        "oracle_return_mean": float(family.oracle_returns(test_tasks).mean()),
        "split": {"seed": preset.histories.split_seed, "train_tasks": train_ids.tolist(),
                  "test_tasks": test_ids.tolist()},
        "methods": {**{m: summarize(np.stack(r), len(test_tasks), n_seeds)
                       for m, r in results.items()},
                    "source": summarize(source_curve, len(test_tasks), 1)},
        "goal_reached_last_episode": {m: float((np.stack(r)[..., -1] > 0).mean())
                                      for m, r in results.items()},
        "config": dataclasses.asdict(preset),
        "wall_seconds": round(time.time() - t0, 1),
    }
    write_json(out / "report.json", report)
    plot_incontext(report, out / "incontext.png",
                   f"{family_name}: in-context RL on {len(test_tasks)} held-out tasks")
    return report


def _source_curve(family, tasks, preset: Preset) -> np.ndarray:
    """The source's learning curve over the evaluation's episodes, from scratch on each task."""
    cfg = preset.histories
    batch = np.repeat(tasks, preset.eval_rollouts, axis=0)
    source = make_source(cfg.source, family, len(batch), cfg.source_config, seed=cfg.seed + 1)
    hist = collect(family, batch, source, preset.eval_episodes, record_from=preset.eval_episodes)
    return hist.episode_returns

