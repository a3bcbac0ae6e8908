"""Summaries of in-context return curves (the report schema) and the in-context figure."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def summarize(returns: np.ndarray, n_tasks: int, n_seeds: int) -> dict:
    """`returns`: (..., n_episodes), any leading axes (seeds, rollouts, tasks). Mean and std are
    over all of them; the headline is the last episode's mean."""
    flat = np.asarray(returns, dtype=np.float64).reshape(-1, returns.shape[-1])
    mean = flat.mean(0)
    return {"episode_returns_mean": mean.round(4).tolist(),
            "episode_returns_std": flat.std(0).round(4).tolist(),
            "last_return_mean": round(float(mean[-1]), 4),
            "first_return_mean": round(float(mean[0]), 4),
            "n_tasks": int(n_tasks), "n_seeds": int(n_seeds), "n_rollouts": int(len(flat))}


def write_json(path: str | Path, obj: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def plot_incontext(report: dict, path: str | Path, title: str, ylabel: str = "return") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, m in report["methods"].items():
        mean, std = np.array(m["episode_returns_mean"]), np.array(m["episode_returns_std"])
        sem = std / np.sqrt(m["n_rollouts"])
        x = np.arange(1, len(mean) + 1)
        line, = ax.plot(x, mean, label=name, lw=2 if name == "AD" else 1.5)
        ax.fill_between(x, mean - sem, mean + sem, color=line.get_color(), alpha=0.2)
    ax.axhline(report["oracle_return_mean"], color="k", ls="--", lw=1, label="oracle")
    ax.set_xlabel("in-context episode")
    ax.set_ylabel(ylabel)
    ax.set_title(title + "\n(mean over tasks, rollouts and training seeds; band: ±1 s.e.)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path
