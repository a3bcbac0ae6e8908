"""Data efficiency (paper Fig. 6): AD from subsampled actor-critic histories vs the learner itself.

    actor-critic histories on the training goals (every 10th of 1,000 episodes kept) -> train AD
    (per training seed) -> AD in context on the held-out goals -> the actor-critic from scratch on
    the same goals for its whole 1,000 episodes -> report.json + data_efficiency.png

Both curves are drawn against the environment episodes each consumed on a held-out goal: AD's
in-context episodes, the learner's own episodes. The report gives the episodes each needs to reach
50% and 90% of the oracle's return (see `episodes_to`).
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
from ..models.transformer import TransformerConfig
from ..report import save_figure, write_json
from ..train import ModelSpec, TrainConfig, train
from .cache import cached_evaluation, cached_returns
from .incontext import learner_curve

OUTPUTS = ("data", "ad", "source.npz", "report.json", "data_efficiency.png")
FAMILY = "darkroom"
THRESHOLDS = (0.5, 0.9)     # fractions of the oracle's return


@dataclass
class DataEfficiencyPreset:
    histories: GenerateConfig   # its n_episodes is also the length of the source's own curve
    model: ModelSpec
    train: TrainConfig
    ad_episodes: int            # AD's in-context episodes on each held-out goal
    rollouts: int = 4           # runs per held-out goal: AD's per training seed, and the source's
    temperature: float = 1.0    # AD's sampling temperature
    train_seeds: int = 1
    smooth: int = 5             # centred running mean (episodes, odd) applied before thresholds


# The actor-critic's defaults (lr 3e-3, entropy 0.02, 5-step returns) are the fastest settings
# that converge on every goal, well within the 1,000 episodes (docs/data-efficiency.md has the
# sweep): a deliberately strong source for AD to beat.
_ACTOR_CRITIC: dict = {}

PRESETS: dict[str, dict[str, DataEfficiencyPreset]] = {
    "darkroom": {"default": DataEfficiencyPreset(
        histories=GenerateConfig(source="actor-critic", source_config=_ACTOR_CRITIC,
                                 n_episodes=1000, every=10, seeds_per_task=10, n_test=16),
        # 80 steps: 4 kept episodes, i.e. 40 of the learner's episodes per window
        model=ModelSpec(context=80, transformer=TransformerConfig()),
        train=TrainConfig(steps=1500, batch_size=128),
        # temperature 0.7, as Dark Room's long preset (docs/darkroom.md has the sweep)
        ad_episodes=100, rollouts=4, temperature=0.7, train_seeds=3)},
}


def get_preset(family: str, name: str) -> DataEfficiencyPreset:
    if family not in PRESETS:
        raise UserError(f"data-efficiency: no preset for family {family!r}; choose from "
                        f"{', '.join(PRESETS)}")
    if name not in PRESETS[family]:
        raise UserError(f"data-efficiency: unknown preset {name!r} for {family}; choose from "
                        f"{', '.join(PRESETS[family])}")
    preset = PRESETS[family][name]
    if preset.smooth < 1 or preset.smooth % 2 == 0:
        raise UserError(f"data-efficiency: smooth must be an odd number >= 1, got {preset.smooth}")
    return copy.deepcopy(preset)


def run(out_dir, family: str | None = None, preset: str = "default", progress: bool = True,
        log=print) -> dict:
    family_name = family or FAMILY
    p = get_preset(family_name, preset)
    fam = make_family(family_name)
    out = Path(out_dir)
    t0 = time.time()

    log(f"[1/4] generating {p.histories.source} histories ({p.histories.n_episodes} episodes, "
        f"every {p.histories.every}th kept)")
    data = generate(fam, out / "data" / "histories.h5", p.histories, progress=progress)
    tasks = fam.tasks()[p.histories.split(fam)["test"]]

    log(f"[2/4] the {p.histories.source} from scratch on {len(tasks)} held-out goals")
    source = cached_returns(out / "source.npz", {
        "source": p.histories.source, "config": p.histories.source_config,
        "tasks": tasks.tolist(), "episodes": p.histories.n_episodes, "rollouts": p.rollouts,
        "seed": p.histories.seed + 1},
        lambda: learner_curve(fam, tasks, p.histories.source, p.histories.source_config,
                              p.histories.n_episodes, p.rollouts, seed=p.histories.seed + 1))

    ad = []
    for seed in range(p.train_seeds):
        log(f"[3/4] training AD (seed {seed}, {p.train.steps} steps, context {p.model.context})")
        ckpt = train(data, out / "ad" / f"seed{seed}", p.model,
                     dataclasses.replace(p.train, seed=seed), progress=progress)
        log(f"[4/4] AD in context on {len(tasks)} held-out goals (seed {seed})")
        ad.append(cached_evaluation(ckpt, fam, tasks, p.ad_episodes, p.rollouts,
                                    temperature=p.temperature, seed=seed, progress=progress))

    oracle = float(fam.oracle_returns(tasks).mean())
    curves = {"AD": curve(np.stack(ad), oracle, p.smooth),
              "source": curve(source, oracle, p.smooth)}
    report = {
        "family": family_name,
        "oracle_return_mean": oracle,
        "curves": curves,
        "thresholds": (f"first episode at which the mean curve, smoothed by a centred running "
                       f"mean over {p.smooth} episodes, reaches 50% / 90% of the oracle return"),
        "test_tasks": p.histories.split(fam)["test"].tolist(),
        "config": {"preset": preset, **dataclasses.asdict(p)},
        "wall_seconds": round(time.time() - t0, 1),
    }
    write_json(out / "report.json", report)
    plot(report, out / "data_efficiency.png")
    for line in summary_lines(report):
        log(line)
    return report


def curve(returns: np.ndarray, oracle: float, smooth: int) -> dict:
    """One curve of the report from returns (..., n_episodes): mean and std over every leading
    axis (training seeds, rollouts, goals) and the episodes needed to reach each threshold."""
    flat = np.asarray(returns, dtype=np.float64).reshape(-1, returns.shape[-1])
    mean = flat.mean(0)
    return {"episodes": list(range(1, len(mean) + 1)),
            "returns_mean": mean.round(4).tolist(),
            "returns_std": flat.std(0).round(4).tolist(),
            "n_runs": len(flat),
            "last_return_mean": round(float(mean[-1]), 4),
            **{f"episodes_to_{round(100 * f)}pct": episodes_to(mean, f * oracle, smooth)
               for f in THRESHOLDS}}


def episodes_to(returns_mean, target: float, smooth: int = 1) -> int | None:
    """The number of episodes consumed (1-based) when the curve first reaches `target`, after a
    centred running mean over `smooth` episodes (shorter at the ends), or None if it never does.
    Smoothing keeps one lucky episode of a noisy mean from counting as reaching the level."""
    y = np.asarray(returns_mean, dtype=np.float64)
    half = smooth // 2
    sums = np.concatenate([[0.0], np.cumsum(y)])
    lo = np.maximum(np.arange(len(y)) - half, 0)
    hi = np.minimum(np.arange(len(y)) + half + 1, len(y))
    smoothed = (sums[hi] - sums[lo]) / (hi - lo)
    reached = np.flatnonzero(smoothed >= target)
    return int(reached[0]) + 1 if len(reached) else None


def summary_lines(report: dict) -> list[str]:
    lines = [f"episodes to reach 50% / 90% of the oracle return ({report['oracle_return_mean']:.2f})"]
    for name, c in report["curves"].items():
        lines.append(f"  {name:>6}: {c['episodes_to_50pct']} / {c['episodes_to_90pct']}   "
                     f"(return after {c['episodes'][-1]} episodes: {c['last_return_mean']:.2f})")
    return lines + [f"({report['wall_seconds']:.0f} s)"]


def plot(report: dict, path: Path) -> Path:
    """Both mean curves (±1 s.e.) against episodes consumed, log x, with the oracle and the
    threshold levels; a marker where each curve first reaches 90%."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    oracle = report["oracle_return_mean"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    source = report["config"]["histories"]["source"]
    labels = {"AD": "AD (in-context episodes)", "source": f"{source} (its own episodes)"}
    for name, c in report["curves"].items():
        x, mean = np.array(c["episodes"]), np.array(c["returns_mean"])
        sem = np.array(c["returns_std"]) / np.sqrt(c["n_runs"])
        line, = ax.plot(x, mean, lw=2 if name == "AD" else 1.4, label=labels.get(name, name))
        ax.fill_between(x, mean - sem, mean + sem, color=line.get_color(), alpha=0.2)
        if c["episodes_to_90pct"] is not None:
            ax.axvline(c["episodes_to_90pct"], color=line.get_color(), ls="--", lw=0.8)
    ax.axhline(oracle, color="k", ls=":", lw=1, label="oracle")
    for f in THRESHOLDS:
        ax.axhline(f * oracle, color="grey", ls="-", lw=0.5, alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("environment episodes on the held-out goal")
    ax.set_ylabel("return")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", fontsize=8)
    n = len(report["test_tasks"])
    ax.set_title(f"{report['family']}: data efficiency, {n} held-out goals\n(mean over goals, "
                 f"rollouts and training seeds; band ±1 s.e.; dashed: 90% of oracle reached)",
                 fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
