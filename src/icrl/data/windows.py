"""Training windows: c consecutive steps of one history, sampled from a weighted mixture of stores.

A window never straddles two histories. Besides the window's own steps, a sample needs what lies
around it: the step before (previous action and reward), the start of the episode under way
(steps since it began) and its end (returns-to-go). So every sample is cut from a *span* of
c + 2 * episode_len steps: episode_len before the window and after it, padded beyond the
history's ends as if an episode ended there (done, action -1, reward 0). Whether the span comes
from a block of histories held in memory or straight from disk, the windows are the same.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from .store import HistoryStore, episode_steps

MEMORY = 256 << 20        # bytes of histories held in memory, over all stores
SPAN_KEYS = ("actions", "rewards", "dones")
PAD = {"actions": -1, "rewards": 0.0, "dones": True}
SPAN_DTYPES = {"actions": np.int64, "rewards": np.float32, "dones": np.bool_}


class _Reader:
    """One store's side of the sampler: the block of histories that windows come from (random
    rows, held in memory when they fit in the budget, else read window by window from disk),
    and how many more windows to draw from it before moving to another block."""

    def __init__(self, store: HistoryStore, context: int, batch_size: int, block: int,
                 memory: float):
        self.store, self.c, self.L = store, context, store.episode_len
        T, H = store.n_steps, store.n_histories
        if context > T:
            raise UserError(f"context {context} is longer than the histories in {store.path} "
                            f"({T} steps)")
        step_bytes = store.obs_spec.store_dtype.itemsize * int(np.prod(store.obs_spec.shape)) + 4
        fits = int(memory // (step_bytes * T))      # whole histories that fit in the budget
        self.in_memory = fits >= 1
        self.block = min(block, H, fits) if self.in_memory else min(block, H)
        # Windows per block ~ the block's share of all distinct windows, and at least enough
        # batches to use each history of the block about once (a block read is slow).
        B, c = batch_size, context
        self.windows_per_block = B * max(1, self.block // B,
                                         round(self.block * (T - c + 1) / (B * c)))
        self.rows, self.data, self.left = None, None, 0

    def draw(self, rng: np.random.Generator, n: int, keep: np.ndarray | None = None):
        """n windows: obs (n, c, *shape) and padded spans (n, c + 2L) of SPAN_KEYS; with `keep`
        (a mask over the n), only those windows are read, but all n are drawn."""
        if self.left <= 0:
            self.load(np.sort(rng.choice(self.store.n_histories, size=self.block, replace=False)))
            self.left = self.windows_per_block
        self.left -= n
        pick = rng.integers(self.block, size=n)
        start = rng.integers(0, self.store.n_steps - self.c + 1, size=n)
        if keep is not None:
            pick, start = pick[keep], start[keep]
        return self._from_memory(pick, start) if self.in_memory else self._from_disk(pick, start)

    def load(self, rows: np.ndarray):
        self.rows = rows
        if self.in_memory:
            self.data = self.store.read(rows)

    def _from_memory(self, pick, start):
        c, L, T, d = self.c, self.L, self.store.n_steps, self.data
        obs = d["obs"][pick[:, None], start[:, None] + np.arange(c)]
        t = start[:, None] + np.arange(-L, c + L)
        inside = (t >= 0) & (t < T)
        t = np.clip(t, 0, T - 1)
        span = {k: np.where(inside, d[k][pick[:, None], t].astype(SPAN_DTYPES[k]), PAD[k])
                for k in SPAN_KEYS}
        return obs, span

    def _from_disk(self, pick, start):
        c, L, T, spec = self.c, self.L, self.store.n_steps, self.store.obs_spec
        obs = np.empty((len(pick), c, *spec.shape), spec.store_dtype)
        span = {k: np.full((len(pick), c + 2 * L), PAD[k], SPAN_DTYPES[k]) for k in SPAN_KEYS}
        for i, (row, s) in enumerate(zip(self.rows[pick], start)):
            obs[i] = self.store.read(row, slice(s, s + c), keys=("obs",))["obs"]
            lo, hi = max(0, s - L), min(T, s + c + L)
            for k, v in self.store.read(row, slice(lo, hi), keys=SPAN_KEYS).items():
                span[k][i, lo - (s - L): hi - (s - L)] = v
        return obs, span

    def state_dict(self) -> dict:
        return {"rows": None if self.rows is None else self.rows.tolist(), "left": self.left}

    def load_state_dict(self, state: dict):
        self.left = state["left"]
        if state["rows"] is not None:  # re-read the block the saved sampler was drawing from
            self.load(np.asarray(state["rows"], dtype=np.int64))


def window_tokens(obs: np.ndarray, span: dict, context: int, episode_len: int,
                  image: bool) -> dict[str, torch.Tensor]:
    """A batch's tensors from its windows' obs and padded spans (see the module docstring)."""
    c, L = context, episode_len
    window = slice(L, L + c)
    prev = slice(L - 1, L + c - 1)
    rewards, dones = span["rewards"], span["dones"]
    rtg = returns_to_go(rewards[:, L:], dones[:, L:])[:, :c].astype(np.float32)
    return {
        "obs": torch.from_numpy(obs if image else obs.astype(np.int64)),
        "actions": torch.from_numpy(span["actions"][:, window].copy()),
        "rewards": torch.from_numpy(rewards[:, window].copy()),
        "dones": torch.from_numpy(dones[:, window].copy()),
        "prev_action": torch.from_numpy(span["actions"][:, prev].copy()),
        "prev_reward": torch.from_numpy(rewards[:, prev].copy()),
        "step": torch.from_numpy(episode_steps(dones)[:, window].astype(np.int64)),
        "returns_to_go": torch.from_numpy(rtg),
    }


def returns_to_go(rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
    """Each step's return to the end of its episode (the first done at or after it; steps after
    the last done count to the end), along the last axis, in float64. Suffix sums: every partial
    sum of float16 rewards (the store's dtype) over fewer than ~8,000 steps is exact in float64,
    so the result does not depend on the order of the additions or on how far the rows reach."""
    n = rewards.shape[-1]
    suffix = np.zeros(rewards.shape[:-1] + (n + 1,))
    suffix[..., :n] = np.cumsum(rewards[..., ::-1], axis=-1, dtype=np.float64)[..., ::-1]
    ends = np.where(dones, np.arange(n), n - 1)     # the last step closes the last episode
    end = np.minimum.accumulate(ends[..., ::-1], axis=-1)[..., ::-1]
    return suffix[..., :n] - np.take_along_axis(suffix, end + 1, axis=-1)


class WindowSampler:
    """Endless random batches of windows from one store or a weighted mixture of stores.

    `sources` is a HistoryStore or a list of (HistoryStore, weight); the stores must share their
    observation spec and number of actions. Each window comes from a store drawn by weight, then
    from a random history of that store's current block and a random start. With one store the
    generator is used exactly as by the original single-store stream (no store draw), so the
    batches of a given seed do not depend on this generalisation.

    An iterator whose position can be saved (`state_dict`) and restored (`load_state_dict`): a
    restored sampler yields exactly the batches the saved one would have yielded next, which is
    what lets an interrupted training run continue as if it had never stopped.

    Data-parallel training: every process draws the same global batch of `batch_size` windows
    and reads only its own slice, rows [rank * b, (rank + 1) * b) with b = batch_size / world.
    Together the processes see exactly the batches of a single process, which is what lets a
    run on several follow the run on one."""

    def __init__(self, sources, context: int, batch_size: int, seed: int = 0, block: int = 512,
                 memory: float = MEMORY, rank: int = 0, world: int = 1):
        if batch_size % world:
            raise UserError(f"the batch size ({batch_size}) must be a multiple of the number of "
                            f"processes ({world})")
        pairs = [(sources, 1.0)] if isinstance(sources, HistoryStore) else list(sources)
        if not pairs:
            raise UserError("no history stores to sample from")
        weights = np.array([w for _, w in pairs], dtype=np.float64)
        if not (np.isfinite(weights).all() and (weights > 0).all()):
            raise UserError(f"store weights must be finite and > 0, got {weights.tolist()}")
        first = pairs[0][0]
        for store, _ in pairs[1:]:
            if (store.obs_spec, store.n_actions) != (first.obs_spec, first.n_actions):
                raise UserError(f"{store.path} holds other observations or actions than "
                                f"{first.path} ({store.obs_spec}, {store.n_actions} actions vs "
                                f"{first.obs_spec}, {first.n_actions}); they cannot be mixed")
        self.stores = [store for store, _ in pairs]
        self.p = weights / weights.sum()
        self.context, self.batch_size = context, batch_size
        self.image = first.obs_spec.kind == "image"
        self.readers = [_Reader(store, context, batch_size, block, memory / len(pairs))
                        for store in self.stores]
        self.rng = np.random.default_rng(seed)
        share = batch_size // world
        self.mine = (rank * share, (rank + 1) * share)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        B, (lo, hi) = self.batch_size, self.mine
        which = (np.zeros(B, np.int64) if len(self.readers) == 1
                 else self.rng.choice(len(self.readers), size=B, p=self.p))
        parts = []
        for k, reader in enumerate(self.readers):
            at = np.flatnonzero(which == k)
            if len(at):  # drawn in every process alike, read only for this one's rows
                keep = (at >= lo) & (at < hi)
                windows = reader.draw(self.rng, len(at), keep)
                if keep.any():
                    parts.append((at[keep] - lo, window_tokens(*windows, self.context, reader.L,
                                                               self.image)))
        if len(parts) == 1:
            batch = parts[0][1]
        else:  # put each store's windows back where the draw placed them
            batch = {key: torch.empty((hi - lo, *v.shape[1:]), dtype=v.dtype)
                     for key, v in parts[0][1].items()}
            for at, tokens in parts:
                for key, v in tokens.items():
                    batch[key][torch.from_numpy(at)] = v
        batch["store"] = torch.from_numpy(which[lo:hi])
        return batch

    def state_dict(self) -> dict:
        """The position: generator state, and each store's block rows and windows left. Plain
        Python values only, so it loads with torch.load(weights_only=True)."""
        return {"rng": self.rng.bit_generator.state,
                "stores": [reader.state_dict() for reader in self.readers]}

    def load_state_dict(self, state: dict):
        if len(state["stores"]) != len(self.readers):
            raise ValueError(f"a state of {len(state['stores'])} stores, this sampler has "
                             f"{len(self.readers)}")
        self.rng.bit_generator.state = state["rng"]
        for reader, s in zip(self.readers, state["stores"]):
            reader.load_state_dict(s)

