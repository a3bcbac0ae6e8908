"""A small causal transformer with rotary positions and a sliding key/value cache.

Rotary embeddings make attention depend only on the distance between tokens, so the cache can be a
ring buffer: keys keep the rotation of their absolute position, the oldest slot is overwritten when
the window is full, and a cached step gives the same result as recomputing the last `capacity`
tokens from scratch. Every row of the batch has its own position and can be reset on its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TransformerConfig:
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 64
    d_ff: int = 256
    dropout: float = 0.1
    attn_dropout: float = 0.1
    rope_base: float = 10000.0


class KVCache:
    """Keys and values of the last `capacity` tokens of each row, in a ring buffer."""

    def __init__(self, cfg: TransformerConfig, batch: int, capacity: int, device=None,
                 dtype=torch.float32):
        head_dim = cfg.d_model // cfg.n_head
        shape = (cfg.n_layer, batch, cfg.n_head, capacity, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.capacity = capacity
        self.rows = torch.arange(batch, device=device)
        self.slot = None

    def reset(self, mask: torch.Tensor | None = None):
        """Empty the context of the rows in `mask` (all rows if None)."""
        if mask is None:
            self.valid.zero_()
            self.pos.zero_()
        else:
            self.valid[mask] = False
            self.pos[mask] = 0

    def begin_step(self):
        self.slot = self.pos % self.capacity
        self.valid[self.rows, self.slot] = True

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's k, v (B, H, 1, Dh) and return all keys, values and the mask."""
        self.k[layer, self.rows, :, self.slot] = k[:, :, 0]
        self.v[layer, self.rows, :, self.slot] = v[:, :, 0]
        return self.k[layer], self.v[layer], self.valid[:, None, None, :]

    def end_step(self):
        self.pos += 1
        self.slot = None


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

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
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

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.attn(self.ln1(x), cos, sin, cache, layer)
        return x + self.mlp(self.ln2(x))


class CausalTransformer(nn.Module):
    """Token embeddings in, contextual features out. Knows nothing about RL."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x: (B, L, D). Without a cache: causal attention over the L tokens (positions 0..L-1).
        With a cache: L must be 1; the token attends to the row's cached window and itself."""
        head_dim = self.cfg.d_model // self.cfg.n_head
        if cache is None:
            positions = torch.arange(x.shape[1], device=x.device)[None]
        else:
            if x.shape[1] != 1:
                raise ValueError("a cached forward takes one token per row")
            positions = cache.pos[:, None]
            cache.begin_step()
        cos, sin = rope_tables(positions, head_dim, self.cfg.rope_base)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.end_step()
        return self.ln_f(x)
