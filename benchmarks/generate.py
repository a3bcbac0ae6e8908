"""How much faster is generating learning histories batched over tasks than one task at a time?

Both sides run the same tabular Q-learning through the same `collect` loop on Dark Room: once with
every task in one batch (one (n, S, A) Q-array, one environment stepping n tasks), once as a Python
for-loop over tasks, each with its own n=1 learner and environment. The loop is timed on a subset
of the tasks and compared per transition. The two alternate for `--repeats` runs each; the
table gives medians and the speedup is the median of the runs' ratios.

    python benchmarks/generate.py [--episodes 60] [--tasks-per-goal 8] [--looped-tasks 32]

The last line of stdout is a JSON object with the two throughputs and their ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from icrl.envs import make_family
from icrl.sources import QLearning, QLearningConfig, collect


def batched(family, tasks: np.ndarray, episodes: int, config: QLearningConfig) -> float:
    """Seconds to generate every task's history in one batch."""
    start = time.perf_counter()
    source = QLearning(family.obs_spec.high, family.n_actions, len(tasks), config, seed=0)
    collect(family, tasks, source, episodes)
    return time.perf_counter() - start


def looped(family, tasks: np.ndarray, episodes: int, config: QLearningConfig) -> float:
    """Seconds to generate the same histories one task at a time."""
    start = time.perf_counter()
    for i, task in enumerate(tasks):
        source = QLearning(family.obs_spec.high, family.n_actions, 1, config, seed=i)
        collect(family, task[None], source, episodes, seed=i)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=60, help="episodes per task")
    parser.add_argument("--tasks-per-goal", type=int, default=8,
                        help="learners per Dark Room goal (81 goals) in the batched run")
    parser.add_argument("--looped-tasks", type=int, default=32,
                        help="how many of those tasks the (slow) one-at-a-time loop runs")
    parser.add_argument("--planning-sweeps", type=int, default=30,
                        help="Dyna sweeps per episode (30 in the Dark Room preset; 0: plain)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side")
    args = parser.parse_args()
    config = QLearningConfig(lr=1.0, init_value=5.0, eps_start=0.0,
                             planning_sweeps=args.planning_sweeps)

    family = make_family("darkroom")
    tasks = np.repeat(family.tasks(), args.tasks_per_goal, axis=0)
    subset = tasks[np.random.default_rng(0).permutation(len(tasks))[:args.looped_tasks]]
    per_task = args.episodes * family.episode_len

    sides = {"batched": (tasks, batched), "looped": (subset, looped)}
    seconds = {name: [] for name in sides}
    for r in range(args.repeats):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            run_tasks, fn = sides[name]
            seconds[name].append(fn(family, run_tasks, args.episodes, config))
    rows = []
    for name, (run_tasks, _) in sides.items():
        transitions = len(run_tasks) * per_task
        median = statistics.median(seconds[name])
        rows.append((name, len(run_tasks), transitions, median, transitions / median))
    # per-transition throughputs of the same repeat, compared
    speedup = statistics.median((len(tasks) / b) / (len(subset) / lo)
                                for b, lo in zip(seconds["batched"], seconds["looped"]))

    print(f"Q-learning (planning sweeps {args.planning_sweeps}) on Dark Room, "
          f"{args.episodes} episodes per task, medians of {args.repeats} runs")
    print(f"{'method':<8} {'tasks':>6} {'transitions':>12} {'seconds':>8} {'transitions/s':>14}")
    for method, n, transitions, median, rate in rows:
        print(f"{method:<8} {n:>6} {transitions:>12,} {median:>8.2f} {rate:>14,.0f}")
    batched_rate, looped_rate = rows[0][4], rows[1][4]
    print(json.dumps({"batched_transitions_per_s": round(batched_rate),
                      "looped_transitions_per_s": round(looped_rate),
                      "speedup": round(speedup, 1)}))


if __name__ == "__main__":
    main()
