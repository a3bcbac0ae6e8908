"""How fast is the batched DQN source, and which way of batching its convolutions is fastest?

1. **Batching methods.** The same stacked parameters (one network per task) run five ways, on one
   minibatch of 32 frames per task: the source as it is (`auto`: grouped convolutions over as
   many tasks as fit in 4 MiB of input per call), one grouped convolution over all tasks
   (`grouped`: tasks stacked along the channels, channels-last), `torch.func.vmap` over a one-task
   network, im2col (`F.unfold`) + `bmm`, and a Python loop over tasks (`unbind`, so the backward
   stays O(n)). The MLP head is the source's `baddbmm` except in the loop and vmap versions.
   Timed (fastest of --reps): one update (target forward, forward, backward, per-task clip, fused Adam) and one acting
   forward (one frame per task). All give the same Q-values (checked).
2. **Throughput.** Environment steps per second of one batched learner over n tasks against a
   Python loop of n=1 learners (each with its own fake environment), with the source's default
   hyperparameters on random frames (72x96x3 is the Watermaze size, 10x10x4 MinAtar's): acting,
   replay writes, sampling and an update every `learn_every` steps, as `collect` runs them.
3. **The MinAtar data stage.** The mgdt preset's replay generation as `icrl run mgdt-minatar`
   runs it (`collect_run`, the preset's DQN settings, 2 runs of each of the 5 games batched: 10
   rows), timed over --minatar-steps steps after --minatar-warm steps, when the learner updates
   and Adam's state has had time to decay (the cost per step grows until then). Variants, run in
   turn --minatar-reps times (the median counts): `as-is`; `unflushed`, denormal floats not
   flushed during updates; `slot-count`, sampling through a running count over every replay slot
   instead of per-block counts (both as the source was before).

    OMP_NUM_THREADS=1 python benchmarks/dqn.py [--sizes 72x96x3,10x10x4,6x6x1]
        [--tasks 16,64,256] [--methods auto,grouped,vmap,unfold,loop] [--throughput-tasks 64]
        [--throughput-frames 72x96x3,10x10x4] [--minatar-steps 2000] [--minatar-warm 10000]
        [--minatar-variants as-is,unflushed,slot-count] [--minatar-reps 1]

The last line of stdout is a JSON object with every measurement.
"""
from __future__ import annotations

import argparse
import json
import time
import types

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import vmap

from icrl.envs.minatar import MinAtar
from icrl.experiments.mgdt import DQN_MINATAR, MGDTPreset
from icrl.sources import make_source
from icrl.sources.base import collect_run
from icrl.sources.dqn import DQN, DQNConfig, torso


# --- the same network, batched other ways ------------------------------------------------------

def q_vmap(source: DQN):
    def one(params, frames):                      # one task: frames (B, H, W, C)
        x = frames.permute(0, 3, 1, 2).float() / 255
        for i, (_, s) in enumerate(source.layers):
            x = F.relu(F.conv2d(x, params[2 * i], params[2 * i + 1], stride=s))
        x = F.relu(x.permute(0, 2, 3, 1).flatten(1) @ params[-4] + params[-3])
        return x @ params[-2] + params[-1]
    return lambda params, frames: vmap(one)(list(params), frames)


def q_unfold(source: DQN):
    def q(params, frames):
        n, batch = frames.shape[:2]
        x = frames.flatten(0, 1).permute(0, 3, 1, 2).float() / 255   # (n*B, C, H, W)
        for i, (k, s) in enumerate(source.layers):
            w, b = params[2 * i], params[2 * i + 1]
            h, wd = (x.shape[2] - k) // s + 1, (x.shape[3] - k) // s + 1
            cols = F.unfold(x, k, stride=s)                            # (n*B, C*k*k, L)
            cols = cols.reshape(n, batch, cols.shape[1], -1).transpose(2, 3).reshape(
                n, -1, cols.shape[1])
            y = torch.baddbmm(b[:, None], cols, w.flatten(2).transpose(1, 2))  # (n, B*L, out)
            x = F.relu(y).reshape(n * batch, h, wd, -1).permute(0, 3, 1, 2)
        x = x.permute(0, 2, 3, 1).reshape(n, batch, -1)            # (row, column, channel)
        x = F.relu(torch.baddbmm(params[-3][:, None], x, params[-4]))
        return torch.baddbmm(params[-1][:, None], x, params[-2])
    return q


def q_loop(source: DQN):
    def q(params, frames):
        per_task = [p.unbind(0) for p in params]
        out = []
        for t in range(frames.shape[0]):
            x = frames[t].permute(0, 3, 1, 2).float() / 255
            for i, (_, s) in enumerate(source.layers):
                x = F.relu(F.conv2d(x, per_task[2 * i][t], per_task[2 * i + 1][t], stride=s))
            x = F.relu(x.permute(0, 2, 3, 1).flatten(1) @ per_task[-4][t] + per_task[-3][t])
            out.append(x @ per_task[-2][t] + per_task[-1][t])
        return torch.stack(out)
    return q


METHODS = {"auto": lambda source: source.q_values, "grouped": lambda source: source.q_values,
           "vmap": q_vmap, "unfold": q_unfold, "loop": q_loop}


def best_ms(fn, reps: int) -> float:
    """The fastest of `reps` timed calls, as timeit: other work on the machine only ever adds."""
    fn()                                           # warm-up: oneDNN builds its kernels
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def time_method(method: str, shape, n: int, reps: int) -> dict:
    config = DQNConfig(capacity=32, tasks_per_conv=n if method == "grouped" else 0)
    source = DQN(shape, 8, n, config, seed=0)
    source.q_values = METHODS[method](source)     # the source's update, through this forward
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(256, (n, 32, *shape), generator=gen, dtype=torch.uint8)
    batch = (frames, torch.randint(8, (n, 32), generator=gen), torch.rand(n, 32, generator=gen),
             frames.roll(1, dims=1))
    one_frame = np.ascontiguousarray(frames[:, 0].numpy())
    return {"update_ms": best_ms(lambda: source.learn(*batch), reps),
            "act_ms": best_ms(lambda: source.act(one_frame, greedy=True), reps)}


def check_methods_agree(shape, n=3) -> None:
    source = DQN(shape, 8, n, DQNConfig(tasks_per_conv=1), seed=0)
    frames = torch.randint(256, (n, 4, *shape), dtype=torch.uint8)
    with torch.no_grad():
        ref = source.q_values(source.params, frames)
        for method in ("vmap", "unfold", "loop"):
            torch.testing.assert_close(METHODS[method](source)(source.params, frames), ref,
                                       rtol=1e-4, atol=1e-5)


# --- throughput: batched vs a loop of single-task learners --------------------------------------

class FakeEnv:
    """n tasks of random frames from a fixed pool, random rewards, episodes of 50 steps."""

    def __init__(self, n: int, shape, seed: int):
        rng = np.random.default_rng(seed)
        self.pool = rng.integers(256, size=(64, n, *shape), dtype=np.uint8)
        self.n, self.t = n, 0

    def reset(self):
        return self.pool[self.t % 64]

    def step(self, actions):
        self.t += 1
        done = np.full(self.n, self.t % 50 == 0)
        return self.pool[self.t % 64], (actions == 0).astype(np.float32), done


def run_steps(source: DQN, env: FakeEnv, obs, steps: int):
    for _ in range(steps):
        actions = source.act(obs)
        next_obs, rewards, done = env.step(actions)
        source.update(obs, actions, rewards, next_obs, done)
        obs = env.reset() if done.all() else next_obs
    return obs


def throughput(n: int, shape, rounds: int, looped_tasks: int, config: DQNConfig) -> dict:
    """Environment steps per second, one per task and step, from the fastest of `rounds` rounds
    of `learn_every` steps (each round: that many acting steps and one update). Both sides first
    run `learning_starts` steps so that every timed round updates."""
    warm, k = config.learning_starts + config.learn_every, config.learn_every

    def fastest_round(step_all, obs):
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            obs = step_all(obs)
            times.append(time.perf_counter() - start)
        return min(times)

    source, env = DQN(shape, 8, n, config, seed=0), FakeEnv(n, shape, 0)
    obs = run_steps(source, env, env.reset(), warm)
    batched = n * k / fastest_round(lambda o: run_steps(source, env, o, k), obs)

    learners = [(DQN(shape, 8, 1, config, seed=i), FakeEnv(1, shape, i))
                for i in range(looped_tasks)]
    obs = [run_steps(s, e, e.reset(), warm) for s, e in learners]

    def loop_round(obs):                           # the loop over tasks, inside each step
        for _ in range(k):
            obs = [run_steps(s, e, o, 1) for (s, e), o in zip(learners, obs)]
        return obs
    looped = looped_tasks * k / fastest_round(loop_round, obs)
    return {"tasks": n, "frame": "x".join(map(str, shape)), "batched_steps_per_s": batched,
            "looped_steps_per_s": looped, "speedup": batched / looped}


# --- the MinAtar data stage ---------------------------------------------------------------------

def slot_count_sampler(source: DQN):
    """The source's sampling as it was: the k-th stored transition through a running count over
    every slot of the ring (O(capacity) per update). Same draws, same slots."""
    def sample_slots():
        counts = source.starts.sum(axis=1)
        ranks = (source.rng.random((source.n, source.config.batch_size)) * counts[:, None]
                 ).astype(np.int64)
        running = torch.from_numpy(np.cumsum(source.starts, axis=1))
        return torch.searchsorted(running, torch.from_numpy(ranks + 1)).numpy()
    return sample_slots


def minatar_stage(warm: int, steps: int, variant: str, seed: int = 0) -> dict:
    """Steps per second (one step: every row's transition) of steps warm..warm+steps of the
    mgdt preset's replay generation, in one variant of the source."""
    suite = MinAtar(games=MGDTPreset().games, max_steps=MGDTPreset().max_steps)
    tasks = np.repeat(suite.tasks(), MGDTPreset().data.seeds_per_task, axis=0)
    source = make_source("dqn", suite, len(tasks), DQN_MINATAR, seed=seed)
    if variant == "slot-count":
        source.sample_slots = slot_count_sampler(source)
    if variant == "unflushed":          # learn without its flushing_denormals decorator
        source.learn = types.MethodType(DQN.learn.__wrapped__, source)
    started = []
    source.track = lambda rewards, done: (started.append(time.perf_counter())
                                          if source.steps == warm else None)
    collect_run(suite, tasks, source, warm + steps, seed=seed)
    seconds = time.perf_counter() - started[0]
    return {"variant": variant, "rows": len(tasks), "warm": warm, "steps": steps,
            "steps_per_s": steps / seconds, "ms_per_step": 1000 * seconds / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="72x96x3,10x10x4,6x6x1",
                        help="frame sizes HxWxC for the method comparison ('' skips it)")
    parser.add_argument("--tasks", default="16,64,256", help="numbers of tasks to compare at")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (the fastest "
                        "counts)")
    parser.add_argument("--max-unfold-gib", type=float, default=2.0,
                        help="skip im2col where its columns would need more than this")
    parser.add_argument("--throughput-tasks", type=int, default=64, help="0 skips it")
    parser.add_argument("--throughput-frames", default="72x96x3,10x10x4")
    parser.add_argument("--throughput-rounds", type=int, default=8,
                        help="timed rounds of learn_every steps (the fastest counts)")
    parser.add_argument("--looped-tasks", type=int, default=16,
                        help="n=1 learners in the loop (timed per step; fewer is faster)")
    parser.add_argument("--minatar-steps", type=int, default=2000,
                        help="timed steps of the MinAtar data stage (0 skips it)")
    parser.add_argument("--minatar-warm", type=int, default=10_000,
                        help="untimed steps first (the preset learns from step 5,000)")
    parser.add_argument("--minatar-variants", default="as-is,unflushed,slot-count")
    parser.add_argument("--minatar-reps", type=int, default=1,
                        help="runs of each variant, in turn (the median counts)")
    args = parser.parse_args()
    results = {"methods": [], "throughput": [], "minatar": [],
               "threads": torch.get_num_threads()}

    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",") if s]
    for shape in sizes:
        check_methods_agree(shape)
        print(f"\nframes {'x'.join(map(str, shape))}: ms per update (32 frames per task) "
              f"/ per acting step")
        print(f"{'tasks':>6} " + " ".join(f"{m:>17}" for m in args.methods.split(",")))
        for n in (int(v) for v in args.tasks.split(",")):
            cells = []
            for method in args.methods.split(","):
                k, s = torso(*shape[:2])[0]
                h, w = (shape[0] - k) // s + 1, (shape[1] - k) // s + 1
                cols_gib = 2 * n * 32 * h * w * k * k * shape[2] * 4 / 2 ** 30
                if method == "unfold" and cols_gib > args.max_unfold_gib:
                    cells.append(f"{'skipped':>17}")
                    continue
                r = time_method(method, shape, n, args.reps)
                results["methods"].append({"frame": "x".join(map(str, shape)), "tasks": n,
                                           "method": method, **r})
                cells.append(f"{r['update_ms']:9.1f} /{r['act_ms']:6.1f}")
            print(f"{n:>6} " + " ".join(cells), flush=True)

    if args.throughput_tasks:
        config = DQNConfig(capacity=1000, learning_starts=100)
        print(f"\nenv steps/s, learn_every={config.learn_every}, batch {config.batch_size}")
        for frame in args.throughput_frames.split(","):
            shape = tuple(int(v) for v in frame.split("x"))
            r = throughput(args.throughput_tasks, shape, args.throughput_rounds,
                           args.looped_tasks, config)
            results["throughput"].append(r)
            print(f"{frame:>9}: batched n={r['tasks']}: {r['batched_steps_per_s']:7.0f}; loop "
                  f"of n=1 learners: {r['looped_steps_per_s']:7.0f}; speed-up "
                  f"x{r['speedup']:.2f}", flush=True)

    if args.minatar_steps:
        variants = args.minatar_variants.split(",")
        print(f"\nMinAtar data stage (the mgdt preset's runs): ms per step over steps "
              f"{args.minatar_warm}..{args.minatar_warm + args.minatar_steps}")
        runs = {v: [] for v in variants}
        for _ in range(args.minatar_reps):
            for v in variants:
                r = minatar_stage(args.minatar_warm, args.minatar_steps, v)
                results["minatar"].append(r)
                runs[v].append(r["ms_per_step"])
                print(f"{v:>11}: {r['ms_per_step']:6.2f} ms ({r['steps_per_s']:5.0f} steps/s)",
                      flush=True)
        medians = {v: float(np.median(ms)) for v, ms in runs.items()}
        base = medians.get("as-is")
        for v, ms in medians.items():
            ratio = f" = x{ms / base:.2f} as-is" if base and v != "as-is" else ""
            print(f"{v:>11}: median {ms:6.2f} ms per step{ratio}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
