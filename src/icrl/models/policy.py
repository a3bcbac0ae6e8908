"""One sequence policy for every method: observation encoder x token layout x backbone x heads.

AD and ED use the fused one-token layout on a transformer; a Decision Transformer uses the `dt`
layout with a patch encoder; RL² puts the fused layout on a recurrent backbone. Nothing here is
specific to one method: the layout (models/layout.py) names the slots, the family's ObsSpec picks
the encoder (models/encoders.py), and the backbone is a transformer with an exact sliding KV cache
or a GRU, both behind `forward` / `new_state` / `step`.

Inputs are dicts of per-timestep fields, (B, L, ...): "obs"; for the fused layout "prev_action"
(-1 before a history's first step), "prev_reward" and "step" (within the episode); for the others
"returns_to_go", "actions" and "rewards".
"""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import check, param
from ..errors import UserError
from ..envs.spec import ObsSpec
from .encoders import encoder_for, make_encoder
from .layout import FUSED, LAYOUTS, Slot, return_bins, reward_sign
from .recurrent import RecurrentBackbone
from .transformer import CausalTransformer, TransformerConfig

BACKBONES = ("transformer", "gru")


@dataclass
class ModelSpec:
    """What the user chooses about the model; the family fills in the rest of PolicyConfig."""
    context: int = param(80, low=2, help="timesteps the model attends to (training window)")
    layout: str = param("ad", choices=tuple(LAYOUTS), help="token layout (models/layout.py)")
    encoder: str = param("auto", choices=("auto", "factored", "conv", "patch"),
                         help="observation encoder; auto: by the observation kind")
    patch: int = param(0, low=0, help="patch side of the patch encoder (0: the largest giving "
                       ">= 2x2 patches)")
    backbone: str = param("transformer", choices=BACKBONES,
                          help="transformer (exact sliding KV cache) or gru")
    # returns-to-go are clipped to [return_low, return_high]
    return_low: int = param(-20, help="lowest return-to-go (lower ones are clipped)")
    return_high: int = param(100, help="highest return-to-go (higher ones are clipped)")
    transformer: TransformerConfig = param(TransformerConfig)


@dataclass
class PolicyConfig:
    obs_spec: ObsSpec
    n_actions: int
    episode_len: int                  # the longest episode (step embeddings)
    model: ModelSpec = field(default_factory=ModelSpec)

    def __post_init__(self):
        def positive_int(x):  # numbers.Integral admits NumPy integers too
            return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 1

        m = self.model
        checks = [
            (isinstance(self.obs_spec, ObsSpec),
             f"obs_spec must be an ObsSpec, got {type(self.obs_spec).__name__}"),
            (positive_int(self.n_actions), f"n_actions must be an integer >= 1, got "
                                           f"{self.n_actions!r}"),
            (positive_int(self.episode_len), f"episode_len must be an integer >= 1, got "
                                             f"{self.episode_len!r}"),
            (isinstance(m, ModelSpec), f"model must be a ModelSpec, got {type(m).__name__}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        check_model_spec(m)
        encoder_for(self.obs_spec, m.encoder)  # ValueError if it does not take these observations

    def misfit(self, family) -> str | None:
        """None if this model takes `family`'s observations, actions and episodes; else the two
        (observations, actions, episode length), for an error message."""
        have = (self.obs_spec, self.n_actions, self.episode_len)
        want = (family.obs_spec, family.n_actions, family.episode_len)
        return None if have == want else f"(observations, actions, episode length {have}) vs " \
                                         f"{family.name} {want}"

    @property
    def context(self) -> int:
        return self.model.context

    def to_dict(self) -> dict:
        return {"obs_spec": self.obs_spec.to_dict(), "n_actions": self.n_actions,
                "episode_len": self.episode_len, "model": asdict(self.model)}

    @classmethod
    def from_dict(cls, d: dict) -> "PolicyConfig":
        model = dict(d["model"])
        model["transformer"] = TransformerConfig(**model["transformer"])
        return cls(ObsSpec.from_dict(d["obs_spec"]), d["n_actions"], d["episode_len"],
                   ModelSpec(**model))


def check_model_spec(m: ModelSpec):
    """ValueError in one line for choices no model can be built from: the declared types and
    ranges of every field (icrl.config), then what relates two fields."""
    try:
        check(m)
    except (UserError, TypeError) as e:
        raise ValueError(str(e)) from None
    t = m.transformer
    if t.d_model % t.n_head:
        raise ValueError(f"transformer.d_model ({t.d_model}) must be divisible by n_head "
                         f"({t.n_head})")
    if m.backbone != "transformer" and any(s.private for s in LAYOUTS[m.layout]):
        raise ValueError(f"the {m.layout} layout hides tokens from later timesteps, which only "
                         f"the transformer backbone can do")
    if not m.return_low < m.return_high:
        raise ValueError(f"return_low ({m.return_low}) must be below return_high "
                         f"({m.return_high})")


class SequencePolicy(nn.Module):
    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.cfg, m = cfg, cfg.model
        d = m.transformer.d_model
        self.slots: tuple[Slot, ...] = LAYOUTS[m.layout]
        self.fused = m.layout in FUSED
        self.n_classes = {"action": cfg.n_actions, "return": m.return_high - m.return_low + 1,
                          "reward": 3}
        self.encoder = make_encoder(cfg.obs_spec, d, m.encoder, m.patch)
        if self.fused:
            self.action_embed = nn.Embedding(cfg.n_actions + 1, d)  # last: no previous action
            self.reward_embed = nn.Linear(1, d)
            self.step_embed = nn.Embedding(cfg.episode_len, d)
        else:
            self.field_embed = nn.ModuleDict({s.field: nn.Embedding(self.n_classes[s.field], d)
                                              for s in self.slots if s.field != "obs"})
        slot_tokens = [self.encoder.n_tokens if s.field == "obs" else 1 for s in self.slots]
        self.tokens_per_step = sum(slot_tokens)
        self.slot_ends = [sum(slot_tokens[:i + 1]) - 1 for i in range(len(self.slots))]
        # The observation slot comes first: the tokens of one frame (patches) see each other.
        private = tuple(end for s, end in zip(self.slots, self.slot_ends) if s.private)
        self.backbone = CausalTransformer(m.transformer, period=self.tokens_per_step,
                                          group=self.encoder.n_tokens, private=private) \
            if m.backbone == "transformer" else RecurrentBackbone(d, m.transformer.n_layer)
        self.heads = nn.ModuleDict({s.predicts: nn.Linear(d, self.n_classes[s.predicts])
                                    for s in self.slots if s.predicts})
        self.apply(_init_weights)

    # -- tokens -------------------------------------------------------------------------------

    def embed_slot(self, slot: Slot, inputs: dict) -> torch.Tensor:
        """The slot's tokens (*lead, n, d) for per-timestep inputs of shape (*lead, ...): (B, L)
        timesteps for training, (B,) for one step."""
        if slot.field == "obs":
            if not self.fused:
                return self.encoder(inputs["obs"])
            prev = inputs["prev_action"]
            prev = torch.where(prev < 0, self.cfg.n_actions, prev)
            x = self.action_embed(prev) + self.reward_embed(inputs["prev_reward"][..., None])
            x = x + self.step_embed(inputs["step"].clamp(max=self.cfg.episode_len - 1))
            return self.encoder(inputs["obs"], base=x)
        return self.field_embed[slot.field](self.target(slot.field, inputs))[..., None, :]

    def target(self, name: str, inputs: dict) -> torch.Tensor:
        """The class index of a field: the action, the return bin or the reward sign."""
        if name == "action":
            return inputs["actions"]
        if name == "return":
            return return_bins(inputs["returns_to_go"], self.cfg.model.return_low,
                               self.cfg.model.return_high)
        return reward_sign(inputs["rewards"])

    def tokens(self, inputs: dict) -> torch.Tensor:
        """Every slot's tokens, timestep after timestep: (B, L * tokens_per_step, d)."""
        parts = [self.embed_slot(s, inputs) for s in self.slots]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)).flatten(1, 2)

    # -- training -----------------------------------------------------------------------------

    def forward(self, inputs: dict) -> dict[str, torch.Tensor]:
        """Logits (B, L, classes) of every predicted target, for windows of L <= context steps."""
        h = self.backbone(self.tokens(inputs))
        h = h.view(h.shape[0], -1, self.tokens_per_step, h.shape[-1])
        return {s.predicts: self.heads[s.predicts](h[:, :, end])
                for s, end in zip(self.slots, self.slot_ends) if s.predicts}

    def loss(self, inputs: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """The sum of the predicted targets' mean cross-entropies, and each one's value."""
        logits = self.forward(inputs)
        parts = {name: F.cross_entropy(z.flatten(0, 1), self.target(name, inputs).flatten())
                 for name, z in logits.items()}
        return sum(parts.values()), {k: v.item() for k, v in parts.items()}

    # -- incremental inference ----------------------------------------------------------------

    def new_state(self, batch: int):
        """Empty contexts for `batch` rows: the backbone's state (a KV cache or a hidden vector)."""
        return self.backbone.new_state(batch, self.cfg.context, self.tokens_per_step)

    def step_slot(self, state, slot: Slot, inputs: dict) -> torch.Tensor | None:
        """Feed one slot of the current timestep (inputs (B, ...), no time axis); returns the
        logits (B, classes) of the target it predicts, or None."""
        h = self.backbone.step(self.embed_slot(slot, inputs), state)
        return self.heads[slot.predicts](h[:, -1]) if slot.predicts else None

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _init_weights(m: nn.Module):
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
