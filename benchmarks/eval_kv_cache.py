"""In-context evaluation speed: the KV cache vs recomputing the whole window at every step.

Same model, same tasks, same seed; both agents see exactly the same windows (see
icrl/models/transformer.py), so their returns agree and only the cost differs. After a short
warm-up, the two alternate for `--repeats` rollouts each; the table gives each one's median and
the speedup is the median of the repeats' ratios (robust on a shared, noisy machine).

    python benchmarks/eval_kv_cache.py [--tasks 256] [--episodes 5] [--context 80] [--repeats 3]
        [--device cuda]

On a GPU the policy lives there and every step's actions come back to the CPU for the
environment, so a rollout's time includes the device's work.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from icrl.envs import make_family
from icrl.errors import UserError
from icrl.evaluate import rollout
from icrl.models.layout import LAYOUTS
from icrl.models.policy import ModelSpec, PolicyConfig, SequencePolicy
from icrl.resources import check_device


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=256)
    p.add_argument("--episodes", type=int, default=5)
    p.add_argument("--context", type=int, default=80, help="steps (Dark Room: 20 per episode)")
    p.add_argument("--layout", default="ad", choices=list(LAYOUTS),
                   help="token layout (ad: 1 token per step, dt: 4, bc: 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed rollouts of each agent")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    a = p.parse_args()
    try:
        check_device(a.device)
    except UserError as e:
        p.error(str(e))
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    family = make_family("darkroom")
    policy = SequencePolicy(PolicyConfig(family.obs_spec, family.n_actions, family.episode_len,
                                         ModelSpec(context=a.context, layout=a.layout))).eval().to(a.device)
    tasks = family.tasks()[np.resize(np.arange(81), a.tasks)]
    steps = a.tasks * a.episodes * family.episode_len
    methods = {"cached": True, "recompute": False}
    for cache in methods.values():  # warm-up: first calls, allocator
        rollout(policy, family, tasks, 1, greedy=True, cache=cache)
    seconds, returns = {name: [] for name in methods}, []
    for r in range(a.repeats):
        for name in (list(methods) if r % 2 == 0 else list(methods)[::-1]):
            start = time.perf_counter()
            returns.append(rollout(policy, family, tasks, a.episodes, greedy=True,
                                   cache=methods[name]))
            seconds[name].append(time.perf_counter() - start)
    rows = [(name, statistics.median(s), steps / statistics.median(s))
            for name, s in seconds.items()]
    speedup = statistics.median(r / c for c, r in zip(seconds["cached"], seconds["recompute"]))
    print(f"Dark Room, {a.tasks} tasks x {a.episodes} episodes, context {a.context} steps of "
          f"{policy.tokens_per_step} tokens ({a.layout}), "
          f"{policy.n_params():,} parameters, {a.threads} threads, {a.device}, "
          f"medians of {a.repeats}")
    print(f"{'method':<10} {'seconds':>8} {'steps/s':>10}")
    for name, seconds, rate in rows:
        print(f"{name:<10} {seconds:8.2f} {rate:10,.0f}")
    print(f"returns identical: {all(np.array_equal(r, returns[0]) for r in returns)}")
    result = {"cached_steps_per_s": round(rows[0][2], 1),
              "recompute_steps_per_s": round(rows[1][2], 1), "speedup": round(speedup, 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
