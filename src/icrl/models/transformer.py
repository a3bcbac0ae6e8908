"""A small causal transformer with rotary positions and an incremental key/value cache.

In-context evaluation runs for hundreds of steps but the model was trained on windows of at most
`capacity` tokens, and in a deep transformer a cached key depends on everything its token saw: a
cache that merely drops its oldest entry no longer equals recomputing the window. So a full row
*slides* in one go: it keeps its last `keep` tokens and recomputes their keys and values from
scratch (one batched forward every `capacity - keep` steps). Every cached step then equals a full
recompute of the row's current window, which always holds between `keep` and `capacity` tokens.
Rows have their own lengths, so tasks in a batch may start and reset at different times.

Attention is causal, except within a timestep's first `group` tokens (of `period`), which all see
each other (the Multi-Game Decision Transformer's patches of one frame), and that a token at one
of the `private` offsets of a timestep is seen by no token but itself. As a window
always begins at a timestep's first token, positions within the window give the rule, in the
forward pass, the cached step and the slide alike; with group 1 and nothing private it is plain
causal attention.

A cached step is about a hundred small operations whatever the batch, so it is kept lean
(docs/benchmarks.md): RoPE is one complex multiplication by a table built once; the step's
positions, mask and key count are worked out once for all layers (`_Step`); the layers run as
plain functions of weights looked up once per state (`StepWeights`); and while every row has the
same length (tasks in lockstep, as in evaluation) keys are written and read through slices, with
no mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import param


@dataclass
class TransformerConfig:
    n_layer: int = param(4, low=1, flag="layers", help="transformer layers")
    n_head: int = param(4, low=1, flag="heads", help="attention heads (must divide --d-model)")
    d_model: int = param(64, low=1, help="width")
    d_ff: int = param(256, low=1, help="MLP width")
    # dropout costs ~40% of CPU training time (see docs)
    dropout: float = param(0.0, low=0, high=1, open_high=True)
    attn_dropout: float = param(0.0, low=0, high=1, open_high=True)
    rope_base: float = param(10000.0, low=0, open_low=True, help="RoPE frequency base")


def window_after_slide(capacity: int) -> int:
    """Timesteps a full window keeps when it slides (3/4 of it): it never drops below that."""
    return max(1, (3 * capacity) // 4)


def rope_table(n_positions: int, head_dim: int, base: float, scale: float) -> torch.Tensor:
    """RoPE as complex rotations, (n_positions, 2, 1, head_dim // 2): e^{i p theta_j} for the
    pair (x_2j, x_2j+1) of a head at position p, the first row for queries (times the attention
    `scale`, so that attention need not scale its scores), the second for keys. Worked out in
    float64, so a position's rotation does not depend on how long the table is."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * inv_freq
    turn = torch.polar(torch.ones_like(angles), angles)
    return torch.stack((turn * scale, turn), dim=1)[:, :, None].to(torch.complex64)


def rotate(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to x (..., head_dim): each pair (x_2j, x_2j+1), read as the complex number
    x_2j + i x_2j+1, is multiplied by its rotation (one kernel forward and backward). At least
    in float32, as the rotation tables are (there are no complex bfloat16 numbers)."""
    wide = x if x.dtype in (torch.float32, torch.float64) else x.float()
    z = torch.view_as_complex(wide.view(*x.shape[:-1], -1, 2))
    return torch.view_as_real(z * rope).flatten(-2).to(x.dtype)


class KVCache:
    """Per-row keys, values and input embeddings of the current window, oldest first: the state
    of the transformer backbone. `steps` timesteps of `tokens_per_step` tokens each."""

    def __init__(self, cfg: TransformerConfig, batch: int, steps: int, tokens_per_step: int = 1,
                 device=None, dtype=torch.float32):
        capacity = steps * tokens_per_step
        head_dim = cfg.d_model // cfg.n_head
        # Keys are kept transposed, (..., head_dim, capacity): a step's scores are then one
        # matrix product over a slice of them.
        self.k = torch.zeros(cfg.n_layer, batch, cfg.n_head, head_dim, capacity, device=device,
                             dtype=dtype)
        self.v = torch.zeros(cfg.n_layer, batch, cfg.n_head, capacity, head_dim, device=device,
                             dtype=dtype)
        # Each layer's keys and values, as views made once: (B, H, ...) and with B x H merged
        # (the batch of the step's matrix products).
        rows_heads = batch * cfg.n_head
        self.layers = [(k, v, k.view(rows_heads, head_dim, capacity),
                        v.view(rows_heads, capacity, head_dim)) for k, v in zip(self.k, self.v)]
        self.x = torch.zeros(batch, capacity, cfg.d_model, device=device, dtype=dtype)
        self.length = torch.zeros(batch, dtype=torch.long, device=device)
        # While every row has the same length it is also kept here, as a Python int (None once
        # the rows differ): a step then writes and reads plain slices, and needs no mask.
        self.common: int | None = 0
        # A slide keeps whole timesteps, so a window always begins at a timestep's first token.
        self.capacity, self.keep = capacity, window_after_slide(steps) * tokens_per_step
        self.rows = torch.arange(batch, device=device)
        self.slots = torch.arange(capacity, device=device)

    def reset(self, mask: torch.Tensor | None = None):
        """Empty the window of the rows in `mask` (all rows if None)."""
        if mask is None:
            self.length.zero_()
            self.common = 0
        else:
            self.length[mask] = 0
            self._realign()

    def _realign(self):
        """Find out whether the rows have the same length again (one sync: only at resets and
        slides)."""
        first = self.length[0]
        self.common = int(first) if bool((self.length == first).all()) else None


@dataclass
class _Step:
    """Where a step's n new tokens go and what they attend to, worked out once for all layers."""
    start: int | None              # their first slot, when every row has the same length
    pos: torch.Tensor | None       # else each row's slots, (B, n)
    keys: int                      # slots attended over: [0, keys)
    mask: torch.Tensor | None      # additive (B or 1, 1, n, keys); None: every slot is visible
    rope: torch.Tensor             # their rotations, (n or B x n, 2, 1, head_dim // 2)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        assert cfg.d_model % cfg.n_head == 0, "d_model must be divisible by n_head"
        self.n_head, self.attn_dropout = cfg.n_head, cfg.attn_dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def _qkv(self, x, rope):
        """q, k, v (B, L, H, Dh) of x (B, L, D); q (scaled) and k rotated by RoPE together."""
        B, L, D = x.shape
        H = self.n_head
        # split (not two slices): its backward is one concatenation
        qk, v = self.qkv(x).split_with_sizes([2 * D, D], dim=-1)
        q, k = rotate(qk.view(B, L, 2, H, D // H), rope).unbind(2)
        return q, k, v.view(B, L, H, D // H)

    def forward(self, x, rope, keys: list | None = None, mask: torch.Tensor | None = None):
        """Attention within x (B, L, D): causal, or where the bool `mask` (L, L) is True;
        appends its (k, v) to `keys` if given."""
        B, L, D = x.shape
        q, k, v = self._qkv(x, rope)
        if keys is not None:
            keys.append((k, v))
        # SDPA takes (B, H, L, Dh) views of them as they are; q carries the scale.
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            is_causal=mask is None, scale=1.0,
            dropout_p=self.attn_dropout if self.training else 0.0)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, L, D)))

    def keys_values(self, x, rope):
        """Rotated keys and values (B, L, H, Dh) of x, without attending."""
        _, k, v = self._qkv(x, rope)
        return k, v


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(),
                                 nn.Linear(cfg.d_ff, cfg.d_model), nn.Dropout(cfg.dropout))

    def forward(self, x, rope, keys=None, mask=None):
        x = x + self.attn(self.ln1(x), rope, keys, mask)
        return x + self.mlp(self.ln2(x))

    def step_weights(self) -> "StepWeights":
        fc1, _, fc2, _ = self.mlp
        ln1, ln2 = ((ln.normalized_shape, ln.weight, ln.bias, ln.eps)
                    for ln in (self.ln1, self.ln2))
        return StepWeights(ln1, (self.attn.qkv.weight, self.attn.qkv.bias),
                           (self.attn.proj.weight, self.attn.proj.bias), ln2,
                           (fc1.weight, fc1.bias), (fc2.weight, fc2.bias))


class StepWeights(NamedTuple):
    """A block's tensors for cached steps, looked up once per state: reading a module's
    parameters costs more than one of a step's small operations. LayerNorms as the arguments
    of torch.layer_norm after the input, linear maps as (weight, bias)."""
    ln1: tuple
    qkv: tuple
    proj: tuple
    ln2: tuple
    fc1: tuple
    fc2: tuple


def _block_step(x: torch.Tensor, w: StepWeights, layer: tuple, at: _Step, cache: KVCache,
                n_head: int) -> torch.Tensor:
    """`Block.forward` for n new tokens per row, x (B, n, D), against the cached window: writes
    their keys and values at the rows' ends and attends over the first `at.keys` slots. The
    same operations as the forward pass, called without modules (inference: no dropout)."""
    B, n, D = x.shape
    H, Dh = n_head, D // n_head
    k_cache, v_cache, k_rows, v_rows = layer
    qkv = F.linear(torch.layer_norm(x, *w.ln1), *w.qkv)
    q, k = rotate(qkv[..., :2 * D].view(B, n, 2, H, Dh), at.rope).unbind(2)   # (B, n, H, Dh)
    v = qkv[..., 2 * D:].view(B, n, H, Dh)
    if at.start is not None:
        k_cache.narrow(3, at.start, n).copy_(k.permute(0, 2, 3, 1))
        v_cache.narrow(2, at.start, n).copy_(v.transpose(1, 2))
    else:  # rows and slots are advanced indices: the indexed result is (B, n, H, Dh)
        k_cache[cache.rows[:, None], :, :, at.pos] = k
        v_cache[cache.rows[:, None], :, at.pos] = v
    scores = torch.bmm(q.transpose(1, 2).reshape(B * H, n, Dh), k_rows.narrow(2, 0, at.keys))
    if at.mask is not None:
        scores.view(B, H, n, at.keys).add_(at.mask)
    y = torch.bmm(scores.softmax(-1), v_rows.narrow(1, 0, at.keys))              # (B*H, n, Dh)
    x = x + F.linear(y.view(B, H, n, Dh).transpose(1, 2).reshape(B, n, D), *w.proj)
    return x + F.linear(F.gelu(F.linear(torch.layer_norm(x, *w.ln2), *w.fc1)), *w.fc2)


class CausalTransformer(nn.Module):
    """Token embeddings in, contextual features out. Knows nothing about RL: the tokens come in
    timesteps of `period`, whose first `group` tokens see each other (1: causal attention) and
    whose tokens at the `private` offsets are seen by no token but themselves."""

    def __init__(self, cfg: TransformerConfig, period: int = 1, group: int = 1,
                 private: tuple[int, ...] = ()):
        super().__init__()
        if not 1 <= group <= period:
            raise ValueError(f"group ({group}) must be in [1, period ({period})]")
        if any(not group <= i < period for i in private):
            raise ValueError(f"private offsets ({private}) must lie in [group ({group}), "
                             f"period ({period}))")
        self.cfg, self.period, self.group = cfg, period, group
        self.private = tuple(private)
        self.plain = group == 1 and not private      # plain causal attention: no mask
        self._mask = torch.empty(0, 0, dtype=torch.bool)   # forward's, grown on demand
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        # RoPE rotations by position, grown on demand: a plain attribute, not a buffer, so that
        # it stays complex64 and out of state dicts and DDP's buffer broadcasts.
        self._rope_table = torch.empty(0, dtype=torch.complex64)
        self._look_up_step_weights()

    def _look_up_step_weights(self):
        self._step_weights = [block.step_weights() for block in self.blocks]
        self._final_norm = (self.ln_f.normalized_shape, self.ln_f.weight, self.ln_f.bias,
                            self.ln_f.eps)

    def rope(self, n_positions: int, device) -> torch.Tensor:
        """The rotations of positions 0..n_positions-1 (see `rope_table`)."""
        table = self._rope_table
        if len(table) < n_positions or table.device != torch.device(device):
            head_dim = self.cfg.d_model // self.cfg.n_head
            with torch.inference_mode(False):  # as the frame mask: training may use it after
                table = rope_table(max(n_positions, len(table)), head_dim, self.cfg.rope_base,
                                   head_dim ** -0.5).to(device)
            self._rope_table = table
        return table[:n_positions]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention over x (B, L, D) at positions 0..L-1 (a window: it begins a timestep)."""
        rope = self.rope(x.shape[1], x.device)
        mask = self.frame_mask(x.shape[1], x.device)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, mask=mask)
        return self.ln_f(x)

    def visible(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Whether queries at window positions q see keys at positions k (broadcast): keys at or
        before the query, and those of its timestep when both are among its first `group`; but
        a key at a private offset only from itself."""
        seen = k <= q
        P, G = self.period, self.group
        if G > 1:
            seen = seen | ((q // P == k // P) & (q % P < G) & (k % P < G))
        for offset in self.private:
            seen = seen & ((k % P != offset) | (q == k))
        return seen

    def frame_mask(self, length: int, device) -> torch.Tensor | None:
        """forward's bool mask (length, length); None for plain causal attention. Every
        length's is a corner of the longest one's, which is kept."""
        if self.plain:
            return None
        mask = self._mask
        if len(mask) < length or mask.device != torch.device(device):
            # not an inference tensor, even when built in a slide: training may use it after
            with torch.inference_mode(False):
                at = torch.arange(max(length, len(mask)), device=device)
                self._mask = mask = self.visible(at[:, None], at)
        return mask[:length, :length]

    def new_state(self, batch: int, steps: int, tokens_per_step: int = 1) -> KVCache:
        """An empty window of `steps` timesteps for each of `batch` rows. Looks up the tensors
        that steps use (StepWeights) again: weights updated in place need nothing, modules or
        parameters replaced by new objects need a new state."""
        if not self.plain and tokens_per_step % self.period:
            raise ValueError(f"tokens_per_step ({tokens_per_step}) must be a multiple of the "
                             f"period ({self.period}): windows begin at a timestep")
        p = next(self.parameters())
        self.rope(steps * tokens_per_step, p.device)  # the table, built before the first step
        self._look_up_step_weights()
        return KVCache(self.cfg, batch, steps, tokens_per_step, p.device, p.dtype)

    def step(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """n new tokens per row, x (B, n, D): they attend to the row's window and to each other
        as in `forward`; returns features (B, n, D) equal to `forward` over the window followed by
        them. Callers feed a timestep's tokens in order, the first `group` in one call (they see
        each other), so a full row slides at a timestep boundary."""
        n = x.shape[1]
        at = self._place(n, cache)
        if at.start is not None:
            cache.x.narrow(1, at.start, n).copy_(x)
        else:
            cache.x[cache.rows[:, None], at.pos] = x
        h = x
        for weights, layer in zip(self._step_weights, cache.layers):
            h = _block_step(h, weights, layer, at, cache, self.cfg.n_head)
        cache.length += n
        if cache.common is not None:
            cache.common += n
        return torch.layer_norm(h, *self._final_norm)

    def _place(self, n: int, cache: KVCache) -> _Step:
        """Slide the rows that are full, then say where the n new tokens go."""
        table = self.rope(cache.capacity, cache.x.device)
        if cache.common is not None:                      # every row alike: slices
            if cache.common + n > cache.capacity:
                self._slide(cache, slice(None))
            start, end = cache.common, cache.common + n
            mask = None
            # needed unless the new tokens see every slot before them and one another: a
            # single token or one group, where nothing earlier is private
            if self.private or (n > 1 and not start % self.period + n <= self.group):
                # rows of the forward pass's mask, which is built once and kept
                mask = self._additive(self.frame_mask(end, cache.x.device)[start:end])
            return _Step(start, None, end, mask, table[start:end])
        full = cache.length + n > cache.capacity
        if full.any():
            self._slide(cache, full.nonzero()[:, 0])
            if cache.common is not None:  # the slide brought the rows back in line
                return self._place(n, cache)
        pos = cache.length[:, None] + cache.slots[:n]
        visible = self.visible(pos[:, :, None], cache.slots)
        if self.group > 1:  # not the stale slots past the new tokens, even within their group
            visible &= cache.slots <= pos[:, -1:, None]
        mask = self._additive(visible)[:, None]
        return _Step(None, pos, cache.capacity, mask, table[pos])

    @staticmethod
    def _additive(visible: torch.Tensor) -> torch.Tensor:
        """0 where visible, -inf elsewhere (float32: added to float32 scores)."""
        return torch.zeros(visible.shape, device=visible.device).masked_fill_(~visible,
                                                                           float("-inf"))

    def _slide(self, cache: KVCache, rows):
        """Keep the last `keep` tokens (whole timesteps) of full rows (indices, or a slice of
        all) and recompute their keys and values. The last block's output is not needed for
        that, only its keys and values."""
        if (cache.length[rows] != cache.capacity).any():
            raise RuntimeError("a window may only slide when full, at a timestep boundary: feed "
                               "each timestep's tokens in order")
        kept = cache.x[rows, cache.capacity - cache.keep:].clone()  # written back below
        rope = self.rope(cache.keep, kept.device)
        mask = self.frame_mask(cache.keep, kept.device)
        h = self.drop(kept)
        for layer, block in enumerate(self.blocks):
            if layer + 1 < len(self.blocks):
                keys: list = []
                h = block(h, rope, keys, mask)
                k, v = keys[0]
            else:
                k, v = block.attn.keys_values(block.ln1(h), rope)
            cache.k[layer, rows, :, :, :cache.keep] = k.permute(0, 2, 3, 1)
            cache.v[layer, rows, :, :cache.keep] = v.transpose(1, 2)
        cache.x[rows, :cache.keep] = kept
        cache.length[rows] = cache.keep
        cache._realign()
