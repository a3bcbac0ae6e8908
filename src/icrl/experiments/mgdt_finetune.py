"""MGDT fine-tuning on a held-out MinAtar game: pretrained on four games vs from scratch.

    the mgdt-minatar replay (made once, or --data) -> a Decision Transformer pretrained on the
    other four games' data -> 1% of the held-out game's transitions (whole episodes drawn at
    random) -> fine-tuned from the pretrained weights, and trained from scratch, on that 1%, for
    each of a few step budgets -> each plays the held-out game with expert action inference ->
    report.json + finetune.png (score vs fine-tuning steps)

The MGDT paper finds fine-tuning the multi-game model on 1% of a new game's data beats training
on that 1% from scratch.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..data.store import HistoryArrays, HistoryStore, write_store
from ..envs import family_from_config
from ..envs.games import GameSuite
from ..errors import UserError
from ..report import write_json
from ..stats import iqm_with_ci
from ..train import train
from ..atomic import file_sha256
from .cache import cached_json
from .mgdt import evaluation_key, normalised, play, prepare

OUTPUTS = ("replay.h5", "baselines.json", "pretrain.h5", "heldout.h5", "pretrain", "finetuned",
           "scratch", "report.json", "finetune.png")
TAKES_DATA = True
HELDOUT = "breakout"
FRACTION = 0.01
BUDGETS = (250, 1000)          # fine-tuning steps; the last is the headline comparison
# Pretraining on the four games: a third of mgdt-minatar's steps, at a lower peak rate, to keep
# the experiment within about half an hour of a 2-core CPU.
PRETRAIN = {"steps": 4000, "lr": 5e-4}
EVAL_EPISODES = 32


def run(out_dir, family: str | None = None, preset: str = "default", progress: bool = True,
        log=print, data=None) -> dict:
    start = time.time()
    p, out, suite, data, baselines = prepare(out_dir, family, preset, data, progress, log)
    if HELDOUT not in suite.games:
        raise UserError(f"the held-out game {HELDOUT} is not in the preset's games")
    others = tuple(g for g in suite.games if g != HELDOUT)
    pre_data = select(data, out / "pretrain.h5", suite, others)
    held_data = select(data, out / "heldout.h5", suite, (HELDOUT,), FRACTION, seed=p.seed)
    pretrain = replace(p.train, **{k: min(v, getattr(p.train, k)) for k, v in PRETRAIN.items()})
    pretrained = train(pre_data, out / "pretrain", p.model, pretrain, progress=progress)

    heldout = subsuite(suite, (HELDOUT,))
    g = suite.games.index(HELDOUT)
    evaluation = replace(p, eval_episodes=max(p.eval_episodes, EVAL_EPISODES)
                         if p.eval_episodes >= 16 else p.eval_episodes)
    curves = {"finetuned": [], "scratch": []}
    budgets = BUDGETS if p.train.steps >= max(BUDGETS) else (p.train.steps,)
    for steps in budgets:
        for name in curves:
            cfg = replace(p.train, steps=steps, warmup_steps=min(p.train.warmup_steps, steps // 10),
                          init_from=str(pretrained) if name == "finetuned" else None)
            ckpt = train(held_data, out / name / f"{steps}-steps", p.model, cfg,
                         progress=progress)
            scores = cached_json(out / name / f"{steps}-steps" / "scores.json",
                                 {"checkpoint": file_sha256(ckpt), **evaluation_key(evaluation)},
                                 lambda: play(ckpt, heldout, evaluation,
                                              return_mode="expert", kappa=p.kappa)[0])
            z = normalised(scores, baselines["random"][g], baselines["best"][g])
            s = iqm_with_ci([z])
            curves[name].append({"steps": steps, "normalised": round(float(z.mean()), 4),
                                 "iqm": s["mean"], "ci": s["ci"], "n_episodes": len(scores)})
            log(f"{name} {steps} steps: normalised {z.mean():.3f}")
    with HistoryStore(held_data) as store:
        held_steps = store.n_histories * store.n_steps
    report = {"game": HELDOUT, "pretrained_on": list(others),
              "finetuned": curves["finetuned"][-1], "scratch": curves["scratch"][-1],
              "pretrain_steps": pretrain.steps,
              "curves": curves, "heldout_transitions": held_steps, "fraction": FRACTION,
              "method": f"DT with expert action inference (kappa {p.kappa})",
              "seconds_this_call": round(time.time() - start, 1), "preset": preset}
    write_json(out / "report.json", report)
    plot(report, out / "finetune.png")
    return report


def subsuite(suite: GameSuite, games: tuple[str, ...]) -> GameSuite:
    """The suite of these of `suite`'s games, every other setting kept."""
    return family_from_config({**suite.config(), "games": list(games)})


def select(src: Path, out: Path, suite: GameSuite, games: tuple[str, ...],
           fraction: float | None = None, seed: int = 0) -> Path:
    """A store of `games`' data from the replay `src`, as their own suite: every row of those
    games, or (with `fraction`) whole episodes drawn at random until that fraction of their
    transitions, concatenated into one row. Reused when `out` already holds this selection."""
    with HistoryStore(src) as store:
        wanted = {"from": store.fingerprint()["sha256"], "games": list(games),
                  "fraction": fraction, "seed": seed}
        if out.exists():
            with HistoryStore(out) as done:
                if done.meta.get("selection") == wanted:
                    return out
        ids = [suite.games.index(g) for g in games]
        rows = np.flatnonzero(np.isin(store.column("task_ids"), ids))
        part = subsuite(suite, games)
        meta = {k: v for k, v in store.meta.items()
                if k not in ("format_version", "n_histories", "n_steps")}
        meta.update(family=part.config(), selection=wanted,
                    split={"seed": 0, **{k: v.tolist() for k, v in part.split().items()}})
        if fraction is None:
            renumber = {old: new for new, old in enumerate(ids)}
            task_ids, seeds = store.column("task_ids"), store.column("seeds")
            returns = store.column("episode_returns")

            def parts():
                for r in rows:
                    game = np.array([renumber[int(task_ids[r])]])
                    yield HistoryArrays(**{k: v[None] for k, v in store.read(int(r)).items()},
                                        task_ids=game, tasks=game[:, None],
                                        seeds=seeds[r:r + 1], episode_returns=returns[r:r + 1])
            write_store(out, parts(), meta)
            return out
        episodes = []                       # (row, first step, last step) of finished episodes
        for r in rows:
            ends = np.flatnonzero(store.read(int(r), keys=("dones",))["dones"])
            episodes += [(int(r), a, b) for a, b in zip(np.r_[0, ends[:-1] + 1], ends)]
        total = len(rows) * store.n_steps
        rng = np.random.default_rng(seed)
        chosen, size = [], 0
        for k in rng.permutation(len(episodes)):
            if size >= fraction * total:
                break
            chosen.append(episodes[k])
            size += episodes[k][2] - episodes[k][1] + 1
        chosen.sort()
        pieces = [store.read(r, slice(a, b + 1)) for r, a, b in chosen]
        d = {k: np.concatenate([x[k] for x in pieces])[None] for k in pieces[0]}
        returns = np.array([[x["rewards"].astype(np.float64).sum() for x in pieces]],
                           dtype=np.float32)
        meta["n_episodes"] = returns.shape[1]
        write_store(out, HistoryArrays(**d, task_ids=np.zeros(1, np.int32),
                                       tasks=np.zeros((1, 1)), seeds=np.zeros(1, np.int64),
                                       episode_returns=returns), meta)
    return out


def plot(report: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, points in report["curves"].items():
        x = [q["steps"] for q in points]
        y = np.array([q["normalised"] for q in points])
        ax.plot(x, y, marker="o", label=name)
    ax.set_xlabel("fine-tuning steps")
    ax.set_ylabel("normalised score")
    ax.set_title(f"{report['game']}: {report['fraction']:.0%} of its data")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
