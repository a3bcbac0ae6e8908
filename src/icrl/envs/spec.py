"""What a family's observations are: shape, dtype and bounds, declared once.

Two kinds cover every family here:
- **discrete**: a vector of k integer components, component i in [0, high[i]) — Dark Room's (x, y).
  Models embed each component separately.
- **image**: a uint8 frame of shape (H, W, C), values in [0, 255] — Watermaze, MinAtar, Atari.
  Models encode it with a small convolution (one token) or a patch embedding (several tokens).

Environments return observations of this shape, stores keep them in `store_dtype`, the agent
checks its inputs with `check`, and the Gymnasium spaces come from `gym_space`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("discrete", "image")


@dataclass(frozen=True)
class ObsSpec:
    kind: str
    shape: tuple[int, ...]
    high: tuple[int, ...]          # discrete: exclusive bound per component; image: (256,)

    @classmethod
    def discrete(cls, high) -> "ObsSpec":
        high = tuple(int(h) for h in high)
        return cls("discrete", (len(high),), high)

    @classmethod
    def image(cls, height: int, width: int, channels: int) -> "ObsSpec":
        return cls("image", (int(height), int(width), int(channels)), (256,))

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"observation kind must be one of {', '.join(KINDS)}, "
                             f"got {self.kind!r}")
        if not self.shape or any(not isinstance(s, int) or s < 1 for s in self.shape):
            raise ValueError(f"observation shape must be positive integers, got {self.shape!r}")
        if any(not isinstance(h, int) or h < 1 for h in self.high):
            raise ValueError(f"observation bounds must be integers >= 1, got {self.high!r}")
        if self.kind == "discrete" and (len(self.shape) != 1 or len(self.high) != self.shape[0]):
            raise ValueError(f"a discrete observation needs one bound per component, got shape "
                             f"{self.shape} and bounds {self.high}")
        if self.kind == "image" and (len(self.shape) != 3 or self.high != (256,)):
            raise ValueError(f"an image observation is (height, width, channels) uint8, got "
                             f"shape {self.shape} and bounds {self.high}")

    @property
    def store_dtype(self) -> np.dtype:
        """The smallest unsigned dtype that holds every value (uint8 for images and grids)."""
        top = max(self.high) - 1
        return np.dtype(next(t for t in (np.uint8, np.uint16, np.uint32) if top <= np.iinfo(t).max))

    @property
    def bounds(self) -> np.ndarray:
        """Exclusive upper bound of every value, broadcastable against a batch of observations."""
        return np.asarray(self.high) if self.kind == "discrete" else np.asarray(256)

    def check(self, obs, batch: int | None = None, what: str = "observations") -> np.ndarray:
        """`obs` as a validated array of shape (batch, *shape); ValueError naming the problem."""
        obs = np.asarray(obs)
        want = self.shape if batch is None else (batch, *self.shape)
        if obs.shape[-len(self.shape):] != self.shape or (batch is not None and obs.shape != want):
            raise ValueError(f"expected {what} of shape {want}, got {obs.shape}")
        if not np.issubdtype(obs.dtype, np.integer):
            raise ValueError(f"{what} must be integers, got dtype {obs.dtype}")
        if obs.size and (obs.min() < 0 or (obs >= self.bounds).any()):
            raise ValueError(f"{what} must lie in [0, {list(self.high)}) per component, got "
                             f"values from {obs.min()} to {obs.max()}")
        return obs

    def gym_space(self):
        from gymnasium import spaces

        if self.kind == "discrete":
            return spaces.MultiDiscrete(self.high, dtype=np.int64)
        return spaces.Box(0, 255, self.shape, dtype=np.uint8)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "shape": list(self.shape), "high": list(self.high)}

    @classmethod
    def from_dict(cls, d: dict) -> "ObsSpec":
        return cls(d["kind"], tuple(int(s) for s in d["shape"]), tuple(int(h) for h in d["high"]))
