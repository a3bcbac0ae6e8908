"""How much faster is drawing Watermaze views for a batch of agents in one call than one by one?

Both sides call the same renderer (icrl.envs.watermaze.render) on the same positions and headings:
once with every agent in one call, once as a Python loop of one-agent calls. They alternate for
`--repeats` rounds; the table gives each one's median, and the speedup is the median of the
rounds' ratios (robust on a shared, noisy machine). The frames are checked to be identical.

    python benchmarks/render.py [--agents 256] [--repeats 5] [--breakdown]

The last line of stdout is a JSON object with both throughputs and their ratio. `--breakdown`
first prints the batched call's cost per frame in its two stages (the rays and their bins, then
the frames from the column table) and with the batch split over two threads.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from icrl.envs.watermaze import CAMERA, render, uniform_disk


def batched(pos: np.ndarray, heading: np.ndarray) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    frames = render(pos, heading)
    return time.perf_counter() - start, frames


def looped(pos: np.ndarray, heading: np.ndarray) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    frames = [render(pos[i:i + 1], heading[i:i + 1]) for i in range(len(pos))]
    return time.perf_counter() - start, np.concatenate(frames)


def microseconds_per_frame(call, n: int, repeats: int) -> float:
    call()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) / n * 1e6


def breakdown(pos: np.ndarray, heading: np.ndarray, repeats: int) -> None:
    """Per frame: each stage of the batched call, and the whole call on two threads, each
    drawing half of the batch (NumPy releases the GIL in its loops)."""
    n, half = len(pos), len(pos) // 2
    index = CAMERA.column_index(pos, heading)
    with ThreadPoolExecutor(2) as pool:
        def two_threads():
            halves = [pool.submit(render, pos[s], heading[s])
                      for s in (slice(0, half), slice(half, n))]
            return [h.result() for h in halves]
        rows = [("rays and bins", lambda: CAMERA.column_index(pos, heading)),
                ("frames from the columns", lambda: CAMERA.frames(index)),
                ("whole call, 1 thread", lambda: render(pos, heading)),
                ("whole call, 2 threads", two_threads)]
        print(f"{'stage (batched, ' + str(n) + ' agents)':<32} {'us/frame':>9}")
        for name, call in rows:
            print(f"{name:<32} {microseconds_per_frame(call, n, 10 * repeats):>9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of each method")
    parser.add_argument("--breakdown", action="store_true",
                        help="first time the batched call's stages and a two-thread split")
    args = parser.parse_args()
    if args.agents < 1 or args.repeats < 1:
        parser.error("--agents and --repeats must be >= 1")
    rng = np.random.default_rng(0)
    pos = uniform_disk(rng, args.agents, 1.0)
    heading = rng.uniform(0, 2 * math.pi, args.agents)

    batched(pos, heading), looped(pos[:8], heading[:8])              # warm-up (column tables)
    if args.breakdown:
        breakdown(pos, heading, args.repeats)
    times = {"batched": [], "looped": []}
    for _ in range(args.repeats):
        for name, method in [("batched", batched), ("looped", looped)]:
            seconds, frames = method(pos, heading)
            times[name].append(seconds)
            if name == "batched":
                reference = frames
            elif not np.array_equal(frames, reference):
                raise SystemExit("the looped frames differ from the batched ones")
    ratios = [slow / fast for fast, slow in zip(times["batched"], times["looped"])]

    print(f"Watermaze rendering, {args.agents} agents, 72x96x3 frames, median of "
          f"{args.repeats} rounds")
    print(f"{'method':<8} {'calls':>6} {'seconds':>8} {'frames/s':>10}")
    rates = {}
    for name, calls in [("batched", 1), ("looped", args.agents)]:
        seconds = statistics.median(times[name])
        rates[name] = args.agents / seconds
        print(f"{name:<8} {calls:>6} {seconds:>8.4f} {rates[name]:>10,.0f}")
    print(json.dumps({"frames_per_s_batched": round(rates["batched"]),
                      "frames_per_s_looped": round(rates["looped"]),
                      "speedup": round(statistics.median(ratios), 2), "agents": args.agents}))


if __name__ == "__main__":
    main()
