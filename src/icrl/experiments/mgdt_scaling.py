"""MGDT model-size scaling on MinAtar: three sizes, same data and steps, score vs parameters.

    the mgdt-minatar replay (made once, or --data) -> a Decision Transformer of each size trained
    on all five games with the same steps and batches -> each plays every game with expert action
    inference -> report.json ({"sizes": [{"params", "iqm", ...}]}) + scaling.png

The MGDT paper finds the score grows with model size (10M -> 40M -> 200M parameters on Atari).
Here the sizes span about 60x in parameters at CPU scale.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..report import write_json
from ..stats import iqm_with_ci
from ..train import train
from ..atomic import file_sha256
from .cache import cached_json
from .mgdt import _model_info, evaluation_key, normalised, play, prepare

OUTPUTS = ("replay.h5", "baselines.json", "models", "report.json", "scaling.png")
TAKES_DATA = True
# (layers, heads, width, MLP width): each about 8x the parameters of the one before
SIZES = ((1, 2, 64, 256), (2, 4, 128, 512), (4, 8, 256, 1024))
# Every size trains this many steps (half the mgdt-minatar run's: the largest model costs about
# 4x the default's compute per step on a CPU).
STEPS = 2000


def run(out_dir, family: str | None = None, preset: str = "default", progress: bool = True,
        log=print, data=None) -> dict:
    start = time.time()
    p, out, suite, data, baselines = prepare(out_dir, family, preset, data, progress, log)
    sizes = []
    for layers, heads, width, ff in SIZES:
        spec = replace(p.model, transformer=replace(p.model.transformer, n_layer=layers,
                                                    n_head=heads, d_model=width, d_ff=ff))
        folder = out / "models" / f"{layers}x{width}"
        ckpt = train(data, folder, spec, replace(p.train, steps=min(STEPS, p.train.steps)),
                     progress=progress)
        scores = cached_json(folder / "scores.json",
                             {"checkpoint": file_sha256(ckpt), **evaluation_key(p)},
                             lambda: play(ckpt, suite, p, return_mode="expert", kappa=p.kappa))
        norm = [normalised(s, baselines["random"][i], baselines["best"][i])
                for i, s in enumerate(scores)]
        info = _model_info(ckpt)
        s = iqm_with_ci(norm)
        sizes.append({"params": info["params"], "layers": layers, "d_model": width,
                      "iqm": s["mean"], "ci": s["ci"], "train_seconds": info["train_seconds"],
                      "per_game": {g: round(float(z.mean()), 4)
                                   for g, z in zip(suite.games, norm)}})
        log(f"{layers}x{width}: {info['params']:,} parameters, IQM {s['mean']:.3f} "
            f"[{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]")
    iqms = [s["iqm"] for s in sizes]
    report = {"games": list(suite.games), "sizes": sizes,
              "monotone": bool(all(a <= b for a, b in zip(iqms, iqms[1:]))),
              "params_ratio": round(sizes[-1]["params"] / sizes[0]["params"], 1),
              "method": f"DT with expert action inference (kappa {p.kappa}), "
                        f"{p.eval_episodes} episodes per game",
              "train_steps": min(STEPS, p.train.steps), "seconds_this_call": round(time.time() - start, 1),
              "preset": preset}
    write_json(out / "report.json", report)
    plot(report, out / "scaling.png")
    return report


def plot(report: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = report["sizes"]
    x = [s["params"] for s in sizes]
    y = np.array([s["iqm"] for s in sizes])
    lo = y - np.array([s["ci"][0] for s in sizes])
    hi = np.array([s["ci"][1] for s in sizes]) - y
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=4)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("normalised IQM (95% CI)")
    ax.set_title("MGDT on MinAtar: score vs model size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
