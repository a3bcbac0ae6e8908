"""The in-context policy used by Algorithm Distillation and Expert Distillation.

One token per timestep: the sum of embeddings of the previous action, the previous reward, each
component of the observation (x and y separately — a per-cell embedding memorises goals instead of
learning to search) and the step within the episode. The transformer predicts the next action.
"""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from .transformer import CausalTransformer, KVCache, TransformerConfig


@dataclass
class PolicyConfig:
    obs_dims: tuple[int, ...]
    n_actions: int
    episode_len: int
    context: int = 80                     # timesteps the model attends to (training window)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)

    def __post_init__(self):
        def positive_int(x):  # numbers.Integral admits NumPy integers too
            return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 1

        t = self.transformer
        checks = [
            (isinstance(self.obs_dims, (tuple, list)) and len(self.obs_dims) > 0
             and all(positive_int(n) for n in self.obs_dims),
             f"obs_dims must be a non-empty tuple of positive integers, got {self.obs_dims!r}"),
            (positive_int(self.n_actions), f"n_actions must be an integer >= 1, got "
                                           f"{self.n_actions!r}"),
            (positive_int(self.episode_len), f"episode_len must be an integer >= 1, got "
                                             f"{self.episode_len!r}"),
            # a window of 1 slides to 1 (window_after_slide) and the cache then overflows
            (positive_int(self.context) and self.context >= 2,
             f"context must be an integer >= 2, got {self.context!r}"),
            (isinstance(t, TransformerConfig), f"transformer must be a TransformerConfig, got "
                                               f"{type(t).__name__}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        sizes = {"n_layer": t.n_layer, "n_head": t.n_head, "d_model": t.d_model, "d_ff": t.d_ff}
        for name, value in sizes.items():
            if not positive_int(value):
                raise ValueError(f"transformer.{name} must be an integer >= 1, got {value!r}")
        if t.d_model % t.n_head:
            raise ValueError(f"transformer.d_model ({t.d_model}) must be divisible by n_head "
                             f"({t.n_head})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PolicyConfig":
        d = dict(d)
        d["obs_dims"] = tuple(d["obs_dims"])
        d["transformer"] = TransformerConfig(**d["transformer"])
        return cls(**d)


class InContextPolicy(nn.Module):
    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.transformer.d_model
        self.obs_embed = nn.ModuleList(nn.Embedding(n, d) for n in cfg.obs_dims)
        self.action_embed = nn.Embedding(cfg.n_actions + 1, d)   # last index: no previous action
        self.reward_embed = nn.Linear(1, d)
        self.step_embed = nn.Embedding(cfg.episode_len, d)
        self.transformer = CausalTransformer(cfg.transformer)
        self.head = nn.Linear(d, cfg.n_actions)
        self.apply(_init_weights)

    def embed(self, obs, prev_action, prev_reward, step) -> torch.Tensor:
        x = self.action_embed(prev_action) + self.reward_embed(prev_reward[..., None])
        x = x + self.step_embed(step.clamp(max=self.cfg.episode_len - 1))
        for i, table in enumerate(self.obs_embed):
            x = x + table(obs[..., i])
        return x

    def forward(self, obs, prev_action, prev_reward, step) -> torch.Tensor:
        """Action logits (B, L, n_actions) for windows of L <= context tokens."""
        return self.head(self.transformer(self.embed(obs, prev_action, prev_reward, step)))

    def new_cache(self, batch: int) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.cfg.transformer, batch, self.cfg.context, p.device, p.dtype)

    def step(self, cache: KVCache, obs, prev_action, prev_reward, step) -> torch.Tensor:
        """Action logits (B, n_actions) for one new token per row, attending to the cached window."""
        return self.head(self.transformer.step(self.embed(obs, prev_action, prev_reward, step), cache))

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _init_weights(m: nn.Module):
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
