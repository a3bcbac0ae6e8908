"""Observation encoders: (B, T, *obs_shape) integer observations -> (B, T, n_tokens, d) tokens,
added onto an optional `base` embedding (B, T, d) shared by every token of the frame.

The family's ObsSpec picks the kind:
- `factored`: discrete components, one embedding table per component, summed into one token
  (x and y separately: a per-cell table memorises goals instead of learning to search);
- `conv`: an image through a small convolutional net, one token per frame;
- `patch`: an image cut into square patches, each linearly embedded with a learned position,
  several tokens per frame (the Decision Transformer's tokens).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..envs.spec import ObsSpec

ENCODERS = ("factored", "conv", "patch")
KIND_ENCODERS = {"discrete": ("factored",), "image": ("conv", "patch")}


def encoder_for(spec: ObsSpec, name: str = "auto") -> str:
    """The encoder name `name` resolves to for `spec` ("auto": the first that fits)."""
    fits = KIND_ENCODERS[spec.kind]
    if name == "auto":
        return fits[0]
    if name not in fits:
        raise ValueError(f"encoder {name!r} does not take {spec.kind} observations; "
                         f"choose from {', '.join(fits)} (or auto)")
    return name


class FactoredEmbedding(nn.Module):
    def __init__(self, spec: ObsSpec, d: int):
        super().__init__()
        self.n_tokens = 1
        self.tables = nn.ModuleList(nn.Embedding(n, d) for n in spec.high)

    def forward(self, obs: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        obs, x = obs.long(), base
        for i, table in enumerate(self.tables):  # in order onto the base: the first core's floats
            x = table(obs[..., i]) if x is None else x + table(obs[..., i])
        return x[..., None, :]


def _frames(obs: torch.Tensor) -> torch.Tensor:
    """(..., H, W, C) uint8 -> (N, C, H, W) floats in [0, 1]."""
    return obs.reshape(-1, *obs.shape[-3:]).permute(0, 3, 1, 2).float() / 255.0


class ConvEncoder(nn.Module):
    """Two strided 3x3 convolutions, then a linear map of the flattened features to one token.

    Large frames are first shrunk by a fixed factor p (`pooling_for`), as DQN shrinks Atari's
    frames (`downsample`): Watermaze's 72x96 frames become 18x24, where its wall colours and
    heights still show (docs/watermaze.md). Converting whole uint8 frames to floats and pooling
    them was most of a training step on pixels (0.34 of 0.40 s per batch of 16 x 200 frames)."""

    def __init__(self, spec: ObsSpec, d: int, channels: int = 16):
        super().__init__()
        h, w, c = spec.shape
        self.n_tokens = 1
        self.p = pooling_for(h, w)
        h, w = h // self.p, w // self.p
        self.net = nn.Sequential(nn.Conv2d(c, channels, 3, stride=2, padding=1), nn.GELU(),
                                 nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.GELU(),
                                 nn.Flatten())
        with torch.no_grad():
            n_features = self.net(torch.zeros(1, c, h, w)).shape[1]
        self.out = nn.Linear(n_features, d)

    def forward(self, obs: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        x = self.out(self.net(downsample(obs, self.p))).reshape(*obs.shape[:-3], 1, -1)
        return x if base is None else x + base[..., None, :]


def downsample(obs: torch.Tensor, p: int) -> torch.Tensor:
    """(..., H, W, C) uint8 -> (N, C, H/p, W/p) floats in [0, 1]. For an even p, each p x p block
    becomes the mean of (p/2)² evenly spaced pixels of it (for p = 4: its 4 pixels at odd rows and
    columns), so only a quarter of the frame is converted to floats."""
    if p == 1:
        return _frames(obs)
    obs = obs.reshape(-1, *obs.shape[-3:])
    if p % 2 == 0:
        s = p // 2
        obs, p = obs[:, s // 2::s, s // 2::s], 2
    x = obs.float().permute(0, 3, 1, 2)   # a channels-last view: no copy
    return F.avg_pool2d(x, p) * (1 / 255)


def pooling_for(height: int, width: int, smallest: int = 16) -> int:
    """The largest block side p <= 4 that divides both sides and leaves at least `smallest`
    pixels on the short one (1: small frames such as MinAtar's 10x10 are not pooled)."""
    return max(p for p in range(1, 5)
               if height % p == 0 and width % p == 0 and min(height, width) // p >= smallest
               or p == 1)


class PatchEmbedding(nn.Module):
    """Non-overlapping `patch` x `patch` squares (the frame must divide evenly), row by row."""

    def __init__(self, spec: ObsSpec, d: int, patch: int):
        super().__init__()
        h, w, c = spec.shape
        if patch < 1 or h % patch or w % patch:
            raise ValueError(f"patch size {patch} must divide the {h}x{w} frame")
        self.patch, self.n_tokens = patch, (h // patch) * (w // patch)
        self.proj = nn.Linear(patch * patch * c, d)
        self.position = nn.Parameter(torch.zeros(self.n_tokens, d))

    def forward(self, obs: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        p, lead = self.patch, obs.shape[:-3]
        x = _frames(obs)                                            # (N, C, H, W)
        x = x.unfold(2, p, p).unfold(3, p, p)                       # (N, C, H/p, W/p, p, p)
        x = x.permute(0, 2, 3, 4, 5, 1).reshape(x.shape[0], self.n_tokens, -1)
        x = (self.proj(x) + self.position).reshape(*lead, self.n_tokens, -1)
        return x if base is None else x + base[..., None, :]


def make_encoder(spec: ObsSpec, d: int, name: str = "auto", patch: int = 0) -> nn.Module:
    name = encoder_for(spec, name)
    if name == "factored":
        return FactoredEmbedding(spec, d)
    if name == "conv":
        return ConvEncoder(spec, d)
    return PatchEmbedding(spec, d, patch or _default_patch(spec))


def _default_patch(spec: ObsSpec) -> int:
    """The largest side that cuts the frame into at least 4 patches (2 per axis)."""
    h, w, _ = spec.shape
    return max(p for p in range(1, min(h, w) // 2 + 1) if h % p == 0 and w % p == 0)
