"""Prompting with demonstrations (Dark Room): AD improves any prompt to near-optimal; ED does not.

    generate histories + expert data -> train AD and ED (the darkroom preset's settings) -> on the
    held-out goals, fill each empty context with episodes of a demonstrator, from random to
    optimal (InContextAgent.prefill) -> AD and ED go on in context on the same rows ->
    report.json + prompting.png

The AD paper (Fig. 5) prompts with episodes taken from different points of a held-out source
history. Here a demonstrator is the optimal Dark Room policy (walk to the goal, then stay) that
takes a uniformly random action with probability epsilon: epsilon = 1 is a random walk, 0 the
oracle, and the levels in between cover the range; each level's actual prompt return is measured
and reported.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..agent import InContextAgent
from ..checkpoint import load_policy
from ..envs import make_family
from ..envs.darkroom import ACTION_NAMES, DarkRoomEnv
from ..errors import UserError
from ..generate import generate
from ..report import save_figure, summarize, write_json
from ..resources import check_evaluate_size
from ..train import train
from .presets import Preset, get_preset

OUTPUTS = ("data", "ad", "ed", "report.json", "prompting.png")

UP, DOWN, LEFT, RIGHT, NOOP = (ACTION_NAMES.index(a) for a in ("up", "down", "left", "right",
                                                                 "noop"))


@dataclass
class Prompting:
    base: Preset                  # data, model, training (and the sampling temperature) of AD/ED
    epsilons: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25, 0.0)  # demonstrators, worst to best
    # Demonstrator episodes written into each context before the agent acts: 4 x 20 steps fill
    # the preset's 80-step window, the most a prompt can hold.
    prompt_episodes: int = 4
    # In-context episodes the agent plays after the prompt: from a random prompt AD needs about
    # as many as from an empty context (docs/prompting.md), so as many as `icrl run` evaluates.
    episodes: int = 40
    rollouts: int = 4             # per held-out goal, level and training seed
    temperature: float | None = None   # None: the base preset's
    demo_seed: int = 0            # the demonstrators' random actions: the same prompts for all


# The fields of the base preset this experiment uses (the report's config records only these).
USED = ("histories", "expert", "model", "train", "ed_steps", "train_seeds", "greedy")

# --preset NAME -> its settings (built on call: get_preset returns a fresh copy)
PRESETS: dict[str, Callable[[], Prompting]] = {
    # Temperature 0.7, as the "long" preset: steadier once the goal is found (docs/darkroom.md);
    # the default preset's 1.0 leaves AD at 88% of the oracle after a random prompt.
    "default": lambda: Prompting(get_preset("darkroom", "default"), temperature=0.7),
}


def optimal_actions(env: DarkRoomEnv) -> np.ndarray:
    """Dark Room's optimal policy on every row at once: close the x gap to the goal, then the
    y gap, then stay (no-op). From the centre it collects the oracle return 21 - distance."""
    dx, dy = (env.goals - env.pos).T
    return np.select([dx > 0, dx < 0, dy > 0, dy < 0], [RIGHT, LEFT, UP, DOWN], NOOP)


def demonstrator_actions(env, epsilon: np.ndarray, n_actions: int, rng: np.random.Generator,
                         optimal: Callable = optimal_actions) -> np.ndarray:
    """The `optimal(env)` action, replaced on each row with probability epsilon[row] by a
    uniformly random one."""
    random = rng.random(env.n) < epsilon
    return np.where(random, rng.integers(0, n_actions, env.n), optimal(env))


def prompted_rollouts(policy, family, tasks: np.ndarray, epsilons, prompt_episodes: int,
                      n_episodes: int, rollouts: int = 1, *, temperature: float = 1.0,
                      greedy: bool = False, seed: int = 0, demo_seed: int = 0,
                      optimal: Callable = optimal_actions):
    """For every demonstrator level x rollout x task, in one batch: an empty context is filled
    with `prompt_episodes` demonstrator episodes (prefill: the agent does not act), then the agent
    plays `n_episodes` on the same environment row. The demonstrator is `optimal(env)` (actions
    (n,) for the env's rows; Dark Room's optimal policy by default, e.g. Watermaze's
    `navigator_actions`) with random actions mixed in at each level's epsilon; the family's
    episodes must all last `episode_len` steps. Returns the prompt's returns (levels, rollouts,
    tasks, prompt_episodes) and the agent's (levels, rollouts, tasks, n_episodes)."""
    epsilons = np.asarray(epsilons, dtype=np.float64)
    shape = (len(epsilons), rollouts, len(tasks))
    batch = np.tile(tasks, (len(epsilons) * rollouts, 1))
    epsilon = np.repeat(epsilons, rollouts * len(tasks))
    check_evaluate_size(policy, len(batch))
    env = family.make(batch, seed=seed)
    agent = InContextAgent(policy, greedy=greedy, temperature=temperature, seed=seed)
    agent.start(len(batch))
    rng = np.random.default_rng(demo_seed)
    rows = np.arange(len(batch))

    obs = env.reset()
    prompt = np.zeros((len(batch), prompt_episodes))
    # Every episode lasts episode_len steps, so every row ends its prompt at once.
    for t in range(prompt_episodes * family.episode_len):
        actions = demonstrator_actions(env, epsilon, family.n_actions, rng, optimal)
        next_obs, reward, done = env.step(actions)
        agent.prefill(obs, actions, reward, done)
        prompt[:, t // family.episode_len] += reward
        obs = env.reset(done) if done.any() else next_obs

    returns = np.zeros((len(batch), n_episodes))
    episode = np.zeros(len(batch), dtype=np.int64)
    while (episode < n_episodes).any():   # as evaluate.rollout, from the prompted context
        obs, reward, done = env.step(agent.act(obs))
        agent.observe(reward, done)
        live = episode < n_episodes
        returns[rows[live], episode[live]] += reward[live]
        episode += done
        if done.any():
            obs = env.reset(done)
    return prompt.reshape(*shape, -1), returns.reshape(*shape, -1)


def run(out_dir, family: str | None = None, preset: str = "default", progress: bool = True,
        log=print) -> dict:
    if family not in (None, "darkroom"):
        raise UserError(f"the prompting experiment runs on darkroom only (its demonstrators "
                        f"are Dark Room's optimal policy), got --family {family}")
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r} for the prompting experiment; choose from "
                        f"{', '.join(PRESETS)}")
    settings = PRESETS[preset]()
    base = settings.base
    temperature = settings.temperature or base.temperature
    darkroom = make_family("darkroom")
    out = Path(out_dir)
    t0 = time.time()

    log("[1/3] generating darkroom learning histories and expert data")
    data = generate(darkroom, out / "data" / "histories.h5", base.histories, progress=progress)
    expert = generate(darkroom, out / "data" / "expert.h5", base.expert, progress=progress)
    test_ids = base.histories.split(darkroom)["test"]
    tasks = darkroom.tasks()[test_ids]

    prompts, results = [], {"AD": [], "ED": []}
    for seed in range(base.train_seeds):
        for method, path, steps in (("AD", data, base.train.steps), ("ED", expert, base.ed_steps)):
            log(f"[2/3] training {method} (seed {seed}, {steps} steps)")
            cfg = dataclasses.replace(base.train, steps=steps, seed=seed)
            policy, _ = load_policy(train(path, out / method.lower() / f"seed{seed}", base.model,
                                          cfg, progress=progress))
            log(f"[3/3] {method} (seed {seed}) after {settings.prompt_episodes} demonstrator "
                f"episodes, {len(settings.epsilons)} levels x {len(tasks)} held-out goals x "
                f"{settings.rollouts} rollouts")
            prompt, returns = prompted_rollouts(
                policy, darkroom, tasks, settings.epsilons, settings.prompt_episodes,
                settings.episodes, settings.rollouts, temperature=temperature,
                greedy=base.greedy, seed=seed, demo_seed=settings.demo_seed)
            prompts.append(prompt)
            results[method].append(returns)
    # The demonstrators' random numbers come from demo_seed alone: every method saw these prompts.
    assert all((p == prompts[0]).all() for p in prompts)

    n = len(tasks)
    levels = [{"epsilon": float(eps),
               "prompt_return_mean": float(prompts[0][i].mean()),
               **{m: summarize(np.stack(r)[:, i], n, base.train_seeds) for m, r in results.items()}}
              for i, eps in enumerate(settings.epsilons)]
    report = {
        "family": "darkroom",
        "oracle_return_mean": float(darkroom.oracle_returns(tasks).mean()),
        "levels": levels,
        "prompt_episodes": settings.prompt_episodes,
        "continued_episodes": settings.episodes,
        "temperature": temperature,
        "test_tasks": test_ids.tolist(),
        "config": {"preset": preset, **dataclasses.asdict(settings),
                   "base": {k: v for k, v in dataclasses.asdict(base).items() if k in USED}},
        "wall_seconds": round(time.time() - t0, 1),
    }
    write_json(out / "report.json", report)
    plot_prompting(report, out / "prompting.png")
    for line in report_lines(report):
        log(line)
    return report


def report_lines(report: dict) -> list[str]:
    lines = [f"prompt -> last in-context episode ({report['continued_episodes']} after "
             f"{report['prompt_episodes']} demonstrator episodes); oracle "
             f"{report['oracle_return_mean']:.2f}"]
    for level in report["levels"]:
        lines.append(f"  epsilon {level['epsilon']:.2f}: prompt {level['prompt_return_mean']:6.2f}"
                     f"   AD {level['AD']['last_return_mean']:6.2f}"
                     f"   ED {level['ED']['last_return_mean']:6.2f}")
    return lines + [f"({report['wall_seconds']:.0f} s)"]


def plot_prompting(report: dict, path) -> Path:
    """AD and ED side by side: one curve per demonstrator level (colour), its prompt's return as
    a dotted line of the same colour and a marker at episode 0, and the oracle."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    levels = report["levels"]
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(levels)))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, method in zip(axes, ("AD", "ED")):
        for level, colour in zip(levels, colours):
            m = level[method]
            mean, std = np.array(m["episode_returns_mean"]), np.array(m["episode_returns_std"])
            sem = std / np.sqrt(m["n_rollouts"])
            x = np.arange(1, len(mean) + 1)
            prompt = level["prompt_return_mean"]
            ax.plot(x, mean, color=colour, lw=2,
                    label=f"ε = {level['epsilon']:.2f} (prompt {prompt:.1f})")
            ax.fill_between(x, mean - sem, mean + sem, color=colour, alpha=0.2)
            ax.axhline(prompt, color=colour, ls=":", lw=1)
            ax.plot([0], [prompt], "o", color=colour)
        ax.axhline(report["oracle_return_mean"], color="k", ls="--", lw=1, label="oracle")
        ax.set_title(f"{method} after {report['prompt_episodes']} demonstrator episodes",
                     fontsize=10)
        ax.set_xlabel("in-context episode after the prompt (0: the prompt's mean return)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("return")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    n = levels[0]["AD"]["n_rollouts"]
    fig.suptitle(f"darkroom: prompting with demonstrations ({levels[0]['AD']['n_tasks']} "
                 f"held-out goals, {n} runs per level; band: ±1 s.e.; dotted: prompt level)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))   # room for the legend below the panels
    return save_figure(fig, path)
