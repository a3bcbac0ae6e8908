"""Training throughput: icrl's training step vs the same-size model in plain PyTorch.

icrl's step is the one `icrl.train` runs: `SequencePolicy.loss`, backward, gradient clipping and
an AdamW step, on windows of the Dark Room preset's model (context 80 steps, batch 128). The
plain side is an `nn.TransformerEncoder` (batch_first, pre-LayerNorm, GELU, the same depth,
width, heads and MLP width, a causal mask) over the same one-token-per-step embedding (previous
action + previous reward + step in the episode + x + y), with an action head and the same loss
and optimiser. Both train on the same batches, drawn beforehand, one step each in turn; the
ratio is the median over these pairs of steps (a pair runs under the same load, so it is robust
on a shared machine), the rates come from the median step times.

The data wait is measured on the real path: a `WindowSampler` over the Dark Room preset's
history store (1,300 histories of 600 steps, generated into a temporary directory in a few
seconds), one batch drawn before each icrl step as `icrl.train` does, for `--data-steps` steps
(enough to span the sampler's block reloads); it is the share of that loop spent in the sampler.

    python benchmarks/train_throughput.py [--batch 128] [--context 80] [--steps 8] [--repeats 5]
        [--device cuda]

Threads: torch's default. On a GPU (`--device cuda`) both sides and their batches live on it;
`loss.item()` ends every step, so the timings include the device's work, and the data wait
includes copying each batch to it. The last line of stdout is a JSON object: timesteps per second of both
sides, their ratio (icrl / plain), the data-wait fraction and the time of one block reload (the
sampler's read of 512 sorted random histories, median of 15).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from icrl.data.store import HistoryStore
from icrl.data.windows import WindowSampler
from icrl.envs import make_family
from icrl.experiments.presets import PRESETS
from icrl.generate import generate
from icrl.models.policy import PolicyConfig, SequencePolicy
from icrl.errors import UserError
from icrl.resources import check_device


class PlainPolicy(nn.Module):
    """One token per timestep, embedded as icrl's fused `ad` layout does, through a stock
    nn.TransformerEncoder."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        t, d = cfg.model.transformer, cfg.model.transformer.d_model
        self.n_actions, self.episode_len = cfg.n_actions, cfg.episode_len
        self.action = nn.Embedding(cfg.n_actions + 1, d)     # last: no previous action
        self.reward = nn.Linear(1, d)
        self.step = nn.Embedding(cfg.episode_len, d)
        self.cells = nn.ModuleList(nn.Embedding(n, d) for n in cfg.obs_spec.high)
        layer = nn.TransformerEncoderLayer(d, t.n_head, t.d_ff, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, t.n_layer, norm=nn.LayerNorm(d),
                                             enable_nested_tensor=False)
        self.head = nn.Linear(d, cfg.n_actions)

    def loss(self, batch: dict) -> torch.Tensor:
        prev = batch["prev_action"]
        x = self.action(torch.where(prev < 0, self.n_actions, prev))
        x = x + self.reward(batch["prev_reward"][..., None])
        x = x + self.step(batch["step"].clamp(max=self.episode_len - 1))
        for i, table in enumerate(self.cells):
            x = x + table(batch["obs"][..., i])
        L = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(L, device=x.device)
        h = self.encoder(x, mask=mask, is_causal=True)
        return F.cross_entropy(self.head(h).flatten(0, 1), batch["actions"].flatten())


def make_step(model: nn.Module, loss_fn, lr: float = 1e-3):
    """One training step as icrl.train takes it: loss, backward, clip, AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=1e-4)

    def step(batch):
        loss = loss_fn(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.item()
    return step


def on(device, batch: dict) -> dict:
    """A batch moved to the device, as icrl.train moves it."""
    return {k: v.to(device) for k, v in batch.items()}


def timed(step, batches) -> float:
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    return time.perf_counter() - start


def history_store(directory: Path) -> Path:
    """The Dark Room preset's training histories."""
    return generate(make_family("darkroom"), directory / "histories.h5",
                    PRESETS["darkroom"]["default"].histories, progress=False)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--context", type=int, default=80)
    p.add_argument("--steps", type=int, default=8, help="distinct batches")
    p.add_argument("--repeats", type=int, default=5, help="passes over them (steps per side: "
                   "steps x repeats)")
    p.add_argument("--data-steps", type=int, default=60, help="steps of the real loop (sampler "
                   "+ icrl step) that measure the data wait")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    a = p.parse_args()
    try:
        check_device(a.device)
    except UserError as e:
        p.error(str(e))

    preset = PRESETS["darkroom"]["default"]
    family = make_family("darkroom")
    spec = preset.model.__class__(**{**preset.model.__dict__, "context": a.context})
    cfg = PolicyConfig(family.obs_spec, family.n_actions, family.episode_len, spec)
    torch.manual_seed(0)
    icrl_policy = SequencePolicy(cfg).train().to(a.device)
    plain = PlainPolicy(cfg).train().to(a.device)
    sides = {"icrl": make_step(icrl_policy, lambda b: icrl_policy.loss(b)[0]),
             "plain": make_step(plain, plain.loss)}

    with tempfile.TemporaryDirectory() as tmp, HistoryStore(history_store(Path(tmp))) as store:
        sampler = WindowSampler(store, a.context, a.batch, seed=0)
        batches = [on(a.device, next(sampler)) for _ in range(a.steps)]
        for step in sides.values():        # warm-up: allocator, kernels, optimiser state
            timed(step, batches[:2])
        # Step by step, alternating which side goes first: the two steps of a pair run under
        # the same load, and the median over the pairs ignores the ones a stall hit.
        seconds = {name: [] for name in sides}
        for i in range(a.repeats * a.steps):
            batch = batches[i % a.steps]
            for name in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
                seconds[name].append(timed(sides[name], [batch]))
        # The real loop: draw a batch, then train on it, as icrl.train does. The wait is the
        # mean per batch (block reloads included); the step, the median (stalls left out).
        waits, steps = [], []
        for _ in range(a.data_steps):
            start = time.perf_counter()
            batch = on(a.device, next(sampler))
            waits.append(time.perf_counter() - start)
            steps.append(timed(sides["icrl"], [batch]))
        wait = statistics.mean(waits) / (statistics.mean(waits) + statistics.median(steps))
        # A block reload on its own: the sampler's read of a block of sorted random rows.
        rng, block, reads = np.random.default_rng(0), sampler.readers[0].block, []
        for _ in range(15):
            rows = np.sort(rng.choice(store.n_histories, size=block, replace=False))
            reads.append(timed(store.read, [rows]))

    rate = {name: a.batch * a.context / statistics.median(v) for name, v in seconds.items()}
    ratios = [p / i for i, p in zip(seconds["icrl"], seconds["plain"])]
    ratio = statistics.median(ratios)
    t = spec.transformer
    print(f"Dark Room preset model ({t.n_layer} layers x {t.d_model}, {t.n_head} heads, MLP "
          f"{t.d_ff}; {icrl_policy.n_params():,} parameters), batch {a.batch} x {a.context} "
          f"steps, {torch.get_num_threads()} threads, {a.device}, {a.repeats * a.steps} steps each")
    print(f"{'side':<8} {'timesteps/s':>12} {'ms per step (median)':>21}")
    for name in sides:
        print(f"{name:<8} {rate[name]:>12,.0f} {statistics.median(seconds[name]) * 1e3:>21.1f}")
    quartiles = statistics.quantiles(ratios, n=4)
    print(f"icrl / plain: {ratio:.3f} (median of the step pairs; quartiles {quartiles[0]:.3f}, "
          f"{quartiles[2]:.3f})")
    print(f"data wait: {wait:.2%} of a step ({statistics.mean(waits) * 1e3:.1f} ms per batch, "
          f"mean of {a.data_steps}; step {statistics.median(steps) * 1e3:.1f} ms, median)")
    print(f"block reload: {statistics.median(reads) * 1e3:.1f} ms (HistoryStore.read of {block} "
          f"sorted random rows, median of {len(reads)})")
    print(json.dumps({"icrl_steps_per_s": round(rate["icrl"]),
                      "plain_steps_per_s": round(rate["plain"]),
                      "ratio": round(ratio, 3),
                      "data_wait_fraction": round(wait, 4),
                      "block_read_ms": round(statistics.median(reads) * 1e3, 1)}))


if __name__ == "__main__":
    main()
