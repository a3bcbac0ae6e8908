"""The in-context policy used by Algorithm Distillation and Expert Distillation.

One token per timestep: the sum of embeddings of the previous action, the previous reward, each
component of the observation (x and y separately — a per-cell embedding memorises goals instead of
learning to search) and the step within the episode. The transformer predicts the next action.
"""
from __future__ import annotations

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
