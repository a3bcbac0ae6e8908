"""Context size ablation (paper Fig. 7): AD with contexts of 1/2, 1, 2, 4 and 8 episodes.

    the Dark Room preset's histories (made once) -> train AD with each context, several training
    seeds, the same steps and the same timesteps per batch -> each model in context on the
    held-out goals -> report.json + context_size.png

The paper finds in-context RL only with multi-episode contexts: a window shorter than an episode
cannot see the reward of an earlier attempt, so the model can only imitate the average policy.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..envs import make_family
from ..errors import UserError
from ..generate import GenerateConfig, generate
from ..report import save_figure, write_json
from ..train import ModelSpec, TrainConfig, train
from .cache import cached_evaluation
from .presets import get_preset as get_family_preset

OUTPUTS = ("data", "ad", "report.json", "context_size.png")
FAMILY = "darkroom"


@dataclass
class ContextSizePreset:
    histories: GenerateConfig
    model: ModelSpec                      # its context is replaced by each size in turn
    train: TrainConfig                    # its batch_size is replaced: see tokens_per_batch
    context_episodes: tuple[float, ...] = (0.5, 1, 2, 4, 8)
    # Every size trains on batches of the same number of timesteps (batch_size = tokens_per_batch
    # / context steps): the same predicted actions and about the same compute per step.
    tokens_per_batch: int = 5120
    train_seeds: int = 3
    eval_episodes: int = 40
    eval_rollouts: int = 4
    temperature: float = 1.0


def _darkroom() -> ContextSizePreset:
    base = get_family_preset("darkroom", "default")
    # 600 steps of 5,120 timesteps (the preset trains 1,500 of 10,240) keep 15 trainings within
    # about half an hour on 2 cores.
    return ContextSizePreset(histories=base.histories, model=base.model,
                             train=dataclasses.replace(base.train, steps=600),
                             eval_episodes=base.eval_episodes, eval_rollouts=base.eval_rollouts,
                             temperature=base.temperature)


PRESETS = {"darkroom": {"default": _darkroom}}


def get_preset(family: str, name: str) -> ContextSizePreset:
    if family not in PRESETS:
        raise UserError(f"context-size: no preset for family {family!r}; choose from "
                        f"{', '.join(PRESETS)}")
    if name not in PRESETS[family]:
        raise UserError(f"context-size: unknown preset {name!r} for {family}; choose from "
                        f"{', '.join(PRESETS[family])}")
    entry = PRESETS[family][name]
    return copy.deepcopy(entry() if callable(entry) else entry)


def context_steps(p: ContextSizePreset, episode_len: int) -> list[int]:
    """Each context size in timesteps; UserError for sizes the preset cannot train."""
    steps = [round(e * episode_len) for e in p.context_episodes]
    if len(set(steps)) != len(steps) or min(steps) < 2:
        raise UserError(f"context-size: context_episodes {p.context_episodes} must give distinct "
                        f"contexts of at least 2 steps ({episode_len} steps per episode)")
    if max(steps) > p.tokens_per_batch:
        raise UserError(f"context-size: tokens_per_batch {p.tokens_per_batch} is smaller than "
                        f"the largest context ({max(steps)} steps)")
    return steps


def run(out_dir, family: str | None = None, preset: str = "default", progress: bool = True,
        log=print) -> dict:
    family_name = family or FAMILY
    p = get_preset(family_name, preset)
    fam = make_family(family_name)
    sizes = context_steps(p, fam.episode_len)
    out = Path(out_dir)
    t0 = time.time()

    log(f"[1/3] generating {family_name} learning histories (shared by every context)")
    data = generate(fam, out / "data" / "histories.h5", p.histories, progress=progress)
    tasks = fam.tasks()[p.histories.split(fam)["test"]]

    contexts = []
    for episodes, steps in zip(p.context_episodes, sizes):
        model = dataclasses.replace(p.model, context=steps)
        per_seed = []
        for seed in range(p.train_seeds):
            cfg = dataclasses.replace(p.train, seed=seed,
                                      batch_size=p.tokens_per_batch // steps)
            log(f"[2/3] training AD, context {steps} steps ({_episodes(episodes)}), seed {seed}: "
                f"{cfg.steps} steps of {cfg.batch_size} windows")
            ckpt = train(data, out / "ad" / f"ctx{steps}" / f"seed{seed}", model, cfg,
                         progress=progress)
            log(f"[3/3] evaluating it in context on {len(tasks)} held-out goals")
            returns = cached_evaluation(ckpt, fam, tasks, p.eval_episodes, p.eval_rollouts,
                                        temperature=p.temperature, seed=seed, progress=progress)
            per_seed.append(returns.mean(axis=(0, 1)))   # mean over rollouts and goals
        contexts.append(context_entry(episodes, steps, np.stack(per_seed)))

    report = {
        "family": family_name,
        "oracle_return_mean": float(fam.oracle_returns(tasks).mean()),
        "contexts": contexts,
        "test_tasks": p.histories.split(fam)["test"].tolist(),
        "config": {"preset": preset, **dataclasses.asdict(p)},
        "wall_seconds": round(time.time() - t0, 1),
    }
    write_json(out / "report.json", report)
    plot(report, out / "context_size.png")
    for line in summary_lines(report):
        log(line)
    return report


def context_entry(episodes: float, steps: int, per_seed: np.ndarray) -> dict:
    """One context's numbers from its per-seed mean curves (n_seeds, n_episodes): the mean curve,
    and the last episode's return as mean ± std over the seeds' means."""
    last = per_seed[:, -1]
    return {"context_episodes": episodes, "context_steps": steps,
            "last_return_mean": round(float(last.mean()), 4),
            "last_return_std": round(float(last.std()), 4),
            "n_seeds": len(per_seed),
            "last_return_per_seed": last.round(4).tolist(),
            "first_return_mean": round(float(per_seed[:, 0].mean()), 4),
            "episode_returns_mean": per_seed.mean(0).round(4).tolist(),
            "episode_returns_std": per_seed.std(0).round(4).tolist()}


def _episodes(n: float) -> str:
    return f"{n:g} episode" + ("" if n == 1 else "s")


def summary_lines(report: dict) -> list[str]:
    lines = ["context (episodes, steps): last-episode return, mean ± std over training seeds"]
    for c in report["contexts"]:
        lines.append(f"  {c['context_episodes']:>4g} {c['context_steps']:>5}: "
                     f"{c['last_return_mean']:6.2f} ± {c['last_return_std']:.2f}  "
                     f"({c['n_seeds']} seeds; first episode {c['first_return_mean']:.2f})")
    return lines + [f"  oracle: {report['oracle_return_mean']:.2f}",
                    f"({report['wall_seconds']:.0f} s)"]


def plot(report: dict, path: Path) -> Path:
    """Left: the in-context curve of each context (mean over seeds, band ±1 std over seeds).
    Right: last-episode return against context size, error bars ±1 std over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    oracle = report["oracle_return_mean"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(report["contexts"])))
    for c, color in zip(report["contexts"], colors):
        mean, std = np.array(c["episode_returns_mean"]), np.array(c["episode_returns_std"])
        x = np.arange(1, len(mean) + 1)
        left.plot(x, mean, color=color, lw=1.6,
                  label=f"{_episodes(c['context_episodes'])} ({c['context_steps']} steps)")
        left.fill_between(x, mean - std, mean + std, color=color, alpha=0.15)
    left.set_xlabel("in-context episode")
    left.set_title("held-out goals: return per in-context episode", fontsize=10)
    episodes = [c["context_episodes"] for c in report["contexts"]]
    right.errorbar(episodes, [c["last_return_mean"] for c in report["contexts"]],
                   yerr=[c["last_return_std"] for c in report["contexts"]], marker="o",
                   capsize=4, color="C0", label="AD, last episode")
    right.set_xscale("log", base=2)
    right.set_xticks(episodes, [f"{e:g}" for e in episodes])
    right.set_xlabel("context (episodes)")
    right.set_title("last in-context episode's return vs context size", fontsize=10)
    for ax in (left, right):
        ax.axhline(oracle, color="k", ls=":", lw=1, label="oracle")
        ax.set_ylabel("return")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    n_seeds = min(c["n_seeds"] for c in report["contexts"])
    fig.suptitle(f"{report['family']}: context size ({len(report['test_tasks'])} held-out goals; "
                 f"mean over goals and rollouts, then over {n_seeds} training seeds; ±1 std over "
                 f"seeds)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
