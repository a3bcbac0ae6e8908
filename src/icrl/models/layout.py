"""Token layouts: the slots of one timestep, named once.

A slot embeds one field of the timestep into one or more tokens; the features of its last token
predict a target (or nothing). Training sums the cross-entropies of the predicted targets; the
agent walks the slots in order and decodes the targets the model chooses (the return, then the
action) before feeding them back in.

- `ad`: Algorithm Distillation's fused layout. The observation's tokens also carry the previous
  action, the previous reward and the step within the episode; the last one predicts the action.
  With a one-token encoder this is one token per timestep.
- `dt`: the Decision Transformer's ⟨observation tokens…, return-to-go, action, reward⟩; the last
  observation token predicts the return, the return token the action, the action token the reward.
- `mgdt`: `dt` with the Multi-Game Decision Transformer's return: a step's return token is seen
  by no other token, so it acts only through its own features, which predict that step's action.
  In `dt` a step's return-to-go can be read off the previous one (minus the reward), so after an
  episode's first step the model is sure of it and expert action inference has nothing to
  reweight; here it is predicted from the frames, actions and rewards alone, and stays a
  distribution over what the data's policies went on to get.
- `bc`: the same without the return: behaviour cloning on the same data.

Every layout begins with the observation slot, whose tokens (a frame's patches) see each other, as
in the Multi-Game Decision Transformer; every other token attends causally, except that a
`private` slot's token is seen by no token but itself.

Codings: returns-to-go are rounded and clipped to [return_low, return_high], one class per
integer; rewards are reduced to their sign (3 classes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Slot:
    field: str                 # "obs", "return", "action" or "reward"
    predicts: str | None       # the target its last token predicts
    private: bool = False      # seen by no token but itself


LAYOUTS: dict[str, tuple[Slot, ...]] = {
    "ad": (Slot("obs", "action"),),
    "dt": (Slot("obs", "return"), Slot("return", "action"), Slot("action", "reward"),
           Slot("reward", None)),
    "mgdt": (Slot("obs", "return"), Slot("return", "action", private=True),
             Slot("action", "reward"), Slot("reward", None)),
    "bc": (Slot("obs", "action"), Slot("action", "reward"), Slot("reward", None)),
}
assert all(slots[0].field == "obs" for slots in LAYOUTS.values())  # the backbone relies on it
FUSED = ("ad",)                # layouts whose observation tokens carry the previous step


def return_bins(returns: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Return-to-go class: round, clip to [low, high], shift to 0..high-low."""
    return returns.round().clamp(low, high).long() - low


def reward_sign(rewards: torch.Tensor) -> torch.Tensor:
    """Reward class: 0, 1, 2 for negative, zero, positive."""
    return torch.sign(rewards).long() + 1
