"""A small causal transformer with rotary positions and an incremental key/value cache.

In-context evaluation runs for hundreds of steps but the model was trained on windows of at most
`capacity` tokens, and in a deep transformer a cached key depends on everything its token saw: a
cache that merely drops its oldest entry no longer equals recomputing the window. So a full row
*slides* in one go: it keeps its last `keep` tokens and recomputes their keys and values from
scratch (one batched forward every `capacity - keep` steps). Every cached step then equals a full
recompute of the row's current window, which always holds between `keep` and `capacity` tokens.
Rows have their own lengths, so tasks in a batch may start and reset at different times.
"""
from __future__ import annotations

from dataclasses import dataclass

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


class KVCache:
    """Per-row keys, values and input embeddings of the current window, oldest first: the state
    of the transformer backbone. `steps` timesteps of `tokens_per_step` tokens each."""

    def __init__(self, cfg: TransformerConfig, batch: int, steps: int, tokens_per_step: int = 1,
                 device=None, dtype=torch.float32):
        capacity = steps * tokens_per_step
        head_dim = cfg.d_model // cfg.n_head
        shape = (cfg.n_layer, batch, cfg.n_head, capacity, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.x = torch.zeros(batch, capacity, cfg.d_model, device=device, dtype=dtype)
        self.length = torch.zeros(batch, dtype=torch.long, device=device)
        # A slide keeps whole timesteps, so a window always begins at a timestep's first token.
        self.capacity, self.keep = capacity, window_after_slide(steps) * tokens_per_step
        self.rows = torch.arange(batch, device=device)
        self.slots = torch.arange(capacity, device=device)

    def reset(self, mask: torch.Tensor | None = None):
        """Empty the window of the rows in `mask` (all rows if None)."""
        if mask is None:
            self.length.zero_()
        else:
            self.length[mask] = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new tokens' k, v (B, H, n, Dh) at each row's end; return keys, values and
        the causal mask (B, 1, n, capacity) of the new tokens."""
        n = k.shape[2]
        pos = self.length[:, None] + torch.arange(n, device=k.device)
        # rows and positions index dims 1 and 3: the indexed result is (B, n, H, Dh)
        self.k[layer, self.rows[:, None], :, pos] = k.transpose(1, 2)
        self.v[layer, self.rows[:, None], :, pos] = v.transpose(1, 2)
        mask = self.slots[None, None, :] <= pos[:, :, None]
        return self.k[layer], self.v[layer], mask[:, None]


def rope_tables(positions: torch.Tensor, head_dim: int, base: float):
    """cos, sin of shape (B or 1, 1, L, head_dim // 2) for integer positions (B or 1, L)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device,
                                      dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        assert cfg.d_model % cfg.n_head == 0, "d_model must be divisible by n_head"
        self.n_head, self.attn_dropout = cfg.n_head, cfg.attn_dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def _qkv(self, x, cos, sin):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def keys_values(self, x, cos, sin):
        """Rotated keys and values (B, H, L, Dh) of x, without attending."""
        _, k, v = self._qkv(x, cos, sin)
        return k, v

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, keys=None):
        B, L, D = x.shape
        q, k, v = self._qkv(x, cos, sin)
        if keys is not None:
            keys.append((k, v))
        dropout = self.attn_dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            k_all, v_all, mask = cache.write(layer, k, v)
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, dropout_p=dropout)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, L, D)))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(),
                                 nn.Linear(cfg.d_ff, cfg.d_model), nn.Dropout(cfg.dropout))

    def forward(self, x, cos, sin, cache=None, layer=0, keys=None):
        x = x + self.attn(self.ln1(x), cos, sin, cache, layer, keys)
        return x + self.mlp(self.ln2(x))


class CausalTransformer(nn.Module):
    """Token embeddings in, contextual features out. Knows nothing about RL."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Causal attention over x (B, L, D) at positions 0..L-1."""
        cos, sin = self._rope(torch.arange(x.shape[1], device=x.device)[None])
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.ln_f(x)

    def new_state(self, batch: int, steps: int, tokens_per_step: int = 1) -> KVCache:
        """An empty window of `steps` timesteps for each of `batch` rows."""
        p = next(self.parameters())
        return KVCache(self.cfg, batch, steps, tokens_per_step, p.device, p.dtype)

    def step(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """n new tokens per row, x (B, n, D): they attend to the row's window and causally to each
        other; returns features (B, n, D) equal to `forward` over the window followed by them.
        Callers feed a timestep's tokens in order, so a full row slides at a timestep boundary."""
        n = x.shape[1]
        full = cache.length + n > cache.capacity
        if full.any():
            self._slide(cache, full.nonzero()[:, 0])
        pos = cache.length[:, None] + torch.arange(n, device=x.device)
        cache.x[cache.rows[:, None], pos] = x
        cos, sin = self._rope(pos)
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h, cos, sin, cache, i)
        cache.length += n
        return self.ln_f(h)

    def _slide(self, cache: KVCache, rows: torch.Tensor):
        """Keep the last `keep` tokens (whole timesteps) of full rows and recompute their keys and
        values. The last block's output is not needed for that, only its keys and values."""
        if (cache.length[rows] != cache.capacity).any():
            raise RuntimeError("a window may only slide when full, at a timestep boundary: feed "
                               "each timestep's tokens in order")
        kept = cache.x[rows, cache.capacity - cache.keep:]
        cos, sin = self._rope(torch.arange(cache.keep, device=kept.device)[None])
        h = self.drop(kept)
        for layer, block in enumerate(self.blocks):
            if layer + 1 < len(self.blocks):
                keys: list = []
                h = block(h, cos, sin, keys=keys)
                k, v = keys[0]
            else:
                k, v = block.attn.keys_values(block.ln1(h), cos, sin)
            cache.k[layer, rows, :, :cache.keep] = k
            cache.v[layer, rows, :, :cache.keep] = v
        cache.x[rows, :cache.keep] = kept
        cache.length[rows] = cache.keep

    def _rope(self, positions):
        return rope_tables(positions, self.cfg.d_model // self.cfg.n_head, self.cfg.rope_base)
