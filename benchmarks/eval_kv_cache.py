"""In-context evaluation speed: the KV cache vs recomputing the whole window at every step.

Same model, same tasks, same seed; both agents see exactly the same windows (see
icrl/models/transformer.py), so their returns agree and only the cost differs.

    python benchmarks/eval_kv_cache.py [--tasks 256] [--episodes 5] [--context 80]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from icrl.envs import make_family
from icrl.evaluate import rollout
from icrl.models.layout import LAYOUTS
from icrl.models.policy import ModelSpec, PolicyConfig, SequencePolicy


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=256)
    p.add_argument("--episodes", type=int, default=5)
    p.add_argument("--context", type=int, default=80, help="steps (Dark Room: 20 per episode)")
    p.add_argument("--layout", default="ad", choices=list(LAYOUTS),
                   help="token layout (ad: 1 token per step, dt: 4, bc: 3)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    family = make_family("darkroom")
    policy = SequencePolicy(PolicyConfig(family.obs_spec, family.n_actions, family.episode_len,
                                         ModelSpec(context=a.context, layout=a.layout))).eval()
    tasks = family.tasks()[np.resize(np.arange(81), a.tasks)]
    steps = a.tasks * a.episodes * family.episode_len
    rows, returns = [], {}
    for name, cache in (("cached", True), ("recompute", False)):
        start = time.perf_counter()
        returns[name] = rollout(policy, family, tasks, a.episodes, greedy=True, cache=cache)
        seconds = time.perf_counter() - start
        rows.append((name, seconds, steps / seconds))
    print(f"Dark Room, {a.tasks} tasks x {a.episodes} episodes, context {a.context} steps of "
          f"{policy.tokens_per_step} tokens ({a.layout}), "
          f"{policy.n_params():,} parameters, {a.threads} threads")
    print(f"{'method':<10} {'seconds':>8} {'steps/s':>10}")
    for name, seconds, rate in rows:
        print(f"{name:<10} {seconds:8.2f} {rate:10,.0f}")
    print(f"returns identical: {np.array_equal(returns['cached'], returns['recompute'])}")
    result = {"cached_steps_per_s": round(rows[0][2], 1), "recompute_steps_per_s": round(rows[1][2], 1),
              "speedup": round(rows[0][2] / rows[1][2], 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
