"""Summaries of in-context return curves (the report schema) and the in-context figure."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .atomic import atomic_write


def summarize(returns: np.ndarray, n_tasks: int, n_seeds: int) -> dict:
    """`returns`: (..., n_episodes), any leading axes (seeds, rollouts, tasks). Mean and std are
    over all of them; the headline is the last episode's mean."""
    flat = np.asarray(returns, dtype=np.float64).reshape(-1, returns.shape[-1])
    mean = flat.mean(0)
    summary = {"episode_returns_mean": mean.round(4).tolist(),
               "episode_returns_std": flat.std(0).round(4).tolist(),
               "last_return_mean": round(float(mean[-1]), 4),
               "first_return_mean": round(float(mean[0]), 4),
               "n_tasks": int(n_tasks), "n_seeds": int(n_seeds), "n_rollouts": int(len(flat))}
    if n_seeds > 1:  # the spread a claim rests on: between training seeds, not tasks
        per_seed = flat.reshape(n_seeds, -1, flat.shape[-1])[:, :, -1].mean(1)
        summary["last_return_per_seed"] = per_seed.round(4).tolist()
        summary["last_return_seed_std"] = round(float(per_seed.std()), 4)
    return summary


def write_json(path: str | Path, obj: dict) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
    return Path(path)


def plot_incontext(report: dict, path: str | Path, title: str, xlabel: str = "in-context episode",
                   ylabel: str = "return", section_titles: dict | None = None) -> Path:
    """One row of panels per evaluation set (the held-out tasks first, then e.g. "ood"): the
    return curves of the methods (solid, ±1 s.e. band), of the reference learners (dashed) and
    the oracle; when the report has references, a second panel with the cumulative regret."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = section_titles or {"test": "held-out tasks"}
    sections = [("test", report)] + [(k, report[k]) for k in titles if k != "test" and k in report]
    with_regret = "references" in report
    fig, axes = plt.subplots(len(sections), 2 if with_regret else 1, squeeze=False,
                             figsize=(12 if with_regret else 7, 4.2 * len(sections)))
    for (name, section), row in zip(sections, axes):
        oracle = section["oracle_return_mean"]
        curves = [(m, s, "-") for m, s in section["methods"].items()]
        curves += [(m, s, "--") for m, s in section.get("references", {}).items() if m != "oracle"]
        for label, m, style in curves:
            mean, std = np.array(m["episode_returns_mean"]), np.array(m["episode_returns_std"])
            sem = std / np.sqrt(m["n_rollouts"])
            x = np.arange(1, len(mean) + 1)
            line, = row[0].plot(x, mean, style, label=label, lw=2 if label == "AD" else 1.3)
            row[0].fill_between(x, mean - sem, mean + sem, color=line.get_color(), alpha=0.2)
            if with_regret:
                row[1].plot(x, np.cumsum(oracle - mean), style, color=line.get_color(),
                            label=label, lw=2 if label == "AD" else 1.3)
        row[0].axhline(oracle, color="k", ls=":", lw=1, label="oracle")
        row[0].set_ylabel(ylabel)
        row[0].set_title(titles.get(name, name), fontsize=10)
        if with_regret:
            row[1].set_ylabel("cumulative regret")
            row[1].set_title(titles.get(name, name) + ": regret (lower is better)", fontsize=10)
        for ax in row:
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize=8)
    fig.suptitle(title + "\n(mean over tasks, rollouts and training seeds; band: ±1 s.e.)",
                 fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure atomically (PNG by the suffix) and free it."""
    import matplotlib.pyplot as plt

    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    return Path(path)


def is_summary(path: str | Path) -> bool:
    """Whether `path` holds an evaluation summary (which a new evaluation may replace)."""
    try:
        summary = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # ValueError covers bad JSON and bad UTF-8
        return False
    return isinstance(summary, dict) and "episode_returns_mean" in summary


def evaluation_summary(family, task_set: str, tasks, returns) -> dict:
    """The summary `icrl evaluate` prints and writes: `returns` (rollouts, tasks, episodes) of
    the tasks `tasks` of `family`, which form the split's set `task_set`."""
    return {"family": family.name, "tasks": task_set,
            "oracle_return_mean": float(family.oracle_returns(tasks).mean()),
            **summarize(returns, len(tasks), 1)}


def evaluation_line(summary: dict) -> str:
    """One line for an evaluation summary: first and last episode's mean return, the oracle's."""
    mean = summary["episode_returns_mean"]
    return (f"{summary['family']}, {summary['n_tasks']} {summary['tasks']} tasks x "
            f"{summary['n_rollouts'] // summary['n_tasks']} rollouts: return {mean[0]:.2f} "
            f"(episode 1) -> {mean[-1]:.2f} (episode {len(mean)}), "
            f"oracle {summary['oracle_return_mean']:.2f}")


def report_lines(report: dict) -> list[str]:
    """An experiment report as a small table: per evaluation set, each curve's first and last
    episode mean return and its cumulative regret; then the wall time."""
    sections = [("held-out tasks", report)] + [
        (f"{k} tasks", v) for k, v in report.items() if isinstance(v, dict) and "methods" in v]
    lines = []
    for title, section in sections:
        lines.append(f"{title}: first / last episode, cumulative regret")
        curves = {**section["methods"], **section.get("references", {})}
        for name, m in curves.items():
            spread = f"  (± {m['last_return_seed_std']:.2f} over {m['n_seeds']} seeds)" \
                if "last_return_seed_std" in m else ""
            lines.append(f"  {name:>9}: {m['first_return_mean']:6.2f} / "
                         f"{m['last_return_mean']:6.2f}   {section['cumulative_regret'][name]:8.2f}"
                         f"{spread}")
        if "oracle" not in curves:
            lines.append(f"  {'oracle':>9}: {section['oracle_return_mean']:.2f}")
    return lines + [f"({report['wall_seconds']:.0f} s)"]
