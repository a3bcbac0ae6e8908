"""A recurrent backbone (GRU) with the transformer's protocol: forward, new_state, step, reset.

Its state is the hidden vector of every layer, carried across episode boundaries until the caller
resets a row (RL²: reset between trials, never inside one). It has no window: `steps` and
`tokens_per_step` of `new_state` are accepted for the protocol's sake and ignored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class RecurrentState:
    h: torch.Tensor                     # (n_layer, B, d)

    def reset(self, mask: torch.Tensor | None = None):
        if mask is None:
            self.h.zero_()
        else:
            self.h[:, mask] = 0.0


class RecurrentBackbone(nn.Module):
    def __init__(self, d_model: int, n_layer: int):
        super().__init__()
        # Token embeddings start tiny (std 0.02, as the transformer's); normalising them gives
        # the GRU's gates inputs of unit scale from the first update on.
        self.ln_in = nn.LayerNorm(d_model)
        self.gru = nn.GRU(d_model, d_model, n_layer, batch_first=True)
        self.ln_f = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features (B, L, D) of the tokens x (B, L, D), from a zero state."""
        return self.ln_f(self.gru(self.ln_in(x))[0])

    def new_state(self, batch: int, steps: int = 0, tokens_per_step: int = 1) -> RecurrentState:
        p = next(self.parameters())
        return RecurrentState(torch.zeros(self.gru.num_layers, batch, self.gru.hidden_size,
                                          device=p.device, dtype=p.dtype))

    def step(self, x: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        """Features (B, n, D) of n new tokens per row, continuing from (and updating) `state`."""
        y, state.h = self.gru(self.ln_in(x), state.h)
        return self.ln_f(y)
