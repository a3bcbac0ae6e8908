"""Drive a trained in-context agent step by step, batched, from your own environment loop.

    agent = InContextAgent.load("runs/darkroom/ad/model.pt")
    agent.start(n=32)                       # 32 empty contexts
    obs = env.reset()
    for t in range(800):
        actions = agent.act(obs)            # (32,) ints
        obs, rewards, done = env.step(actions)
        agent.observe(rewards, done)        # done rows begin a new episode (context kept)
        obs = env.reset(done) if done.any() else obs

The weights stay frozen; everything the agent learns lives in its context (the backbone's state:
an exact sliding KV cache over the last `context` timesteps, or a recurrent hidden vector).

`act` walks the slots of the policy's token layout: it feeds the observation, and for every
target the model chooses (the return-to-go, then the action) it decodes one from the predicted
distribution and feeds it back. `observe` feeds the reward when the layout has a reward slot.
"""
from __future__ import annotations

import numbers

import numpy as np
import torch

from .checkpoint import load_policy
from .models.policy import SequencePolicy
from .models.transformer import window_after_slide


def sample(logits: torch.Tensor, temperature: float, greedy: bool,
           generator: torch.Generator) -> torch.Tensor:
    """One class per row: the most likely if greedy, else sampled at `temperature`. Finite for
    any temperature > 0: the largest logit is subtracted before dividing, so a tiny temperature
    tends to the argmax instead of overflowing."""
    if greedy:
        return logits.argmax(-1)
    z = (logits - logits.amax(-1, keepdim=True)) / temperature
    return torch.multinomial(z.softmax(-1), 1, generator=generator)[:, 0]


class InContextAgent:
    def __init__(self, policy: SequencePolicy, greedy: bool = False, temperature: float = 1.0,
                 seed: int = 0):
        if not isinstance(policy, SequencePolicy):
            raise TypeError(f"policy must be a SequencePolicy, got {type(policy).__name__}")
        _check_temperature(temperature)
        if not _is_int(seed) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        self.policy = policy.eval()
        self.greedy, self.temperature = greedy, temperature
        self.device = next(policy.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.state = None
        self.n = 0

    @classmethod
    def load(cls, checkpoint, device="cpu", greedy: bool = False, temperature: float = 1.0,
             seed: int = 0):
        policy, _ = load_policy(checkpoint, device)
        return cls(policy, greedy=greedy, temperature=temperature, seed=seed)

    def start(self, n: int):
        """Begin `n` empty contexts (one per task / environment copy)."""
        if not _is_int(n) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        self.n = int(n)
        self.state = self.policy.new_state(self.n)
        self.prev_action = torch.full((self.n,), -1, device=self.device)
        self.prev_reward = torch.zeros(self.n, device=self.device)
        self.step_in_episode = torch.zeros(self.n, dtype=torch.long, device=self.device)
        self.pending = None

    def reset(self, rows):
        """Empty the context of some rows (indices or a bool mask), e.g. they now face a new task.
        Call it between observe() and the next act()."""
        self._check_started()
        if self.pending is not None:
            raise RuntimeError("reset() between act() and observe(): call observe() first")
        mask = self._mask(rows)
        self.state.reset(mask)
        self.prev_action[mask] = -1
        self.prev_reward[mask] = 0.0
        self.step_in_episode[mask] = 0

    def logits(self, obs) -> torch.Tensor:
        """The action logits (n, n_actions) for observations (n, *obs_spec.shape); adds the
        step to the context like act() (and chooses the action, pending until observe())."""
        return self._walk(obs)["action"]

    @torch.no_grad()
    def _walk(self, obs) -> dict[str, torch.Tensor]:
        """Feed this timestep's observation and walk the slots up to the action: returns the
        logits (n, classes) of every target decoded on the way ("action", and for a
        return-conditioned layout "return"). The choices stay pending until observe()."""
        self._check_started()
        if self.pending is not None:
            raise RuntimeError("call observe(rewards, done) after each act()")
        inputs = {"obs": self._observations(obs), "prev_action": self.prev_action,
                  "prev_reward": self.prev_reward, "step": self.step_in_episode}
        chosen, logits = {}, {}
        for slot in self.policy.slots:
            if slot.field == "reward":
                break  # fed by observe(), once the environment has answered
            if slot.field == "return":
                inputs["returns_to_go"] = chosen["return"] + self.policy.cfg.model.return_low
            elif slot.field == "action":
                inputs["actions"] = chosen["action"]
            z = self._feed(slot, inputs)
            if slot.predicts in ("return", "action"):
                logits[slot.predicts] = z
                chosen[slot.predicts] = sample(z, self.temperature, self.greedy, self.generator)
        self.pending = chosen["action"]
        return logits

    def act(self, obs) -> np.ndarray:
        """Actions (n,) for observations (n, *obs_spec.shape): sampled at `temperature`, or the
        most likely if greedy."""
        self._walk(obs)
        return self.pending.cpu().numpy()

    def observe(self, rewards, done):
        """Feed back each row's reward and whether its episode ended with that step."""
        self._check_started()
        if self.pending is None:
            raise RuntimeError("observe() must follow act()")
        rewards, done = np.asarray(rewards), np.asarray(done)
        if rewards.shape != (self.n,) or done.shape != (self.n,) or done.dtype != bool:
            raise ValueError(f"expected rewards of shape ({self.n},) and a bool done of shape "
                             f"({self.n},), got {rewards.shape} and {done.dtype} {done.shape}")
        if not np.issubdtype(rewards.dtype, np.number) or not np.isfinite(rewards).all():
            raise ValueError("rewards must be finite numbers")
        rewards = torch.as_tensor(rewards.astype(np.float32), device=self.device)
        slot = self.policy.slots[-1]
        if slot.field == "reward":
            with torch.no_grad():
                self._feed(slot, {"rewards": rewards})
        self.prev_action, self.prev_reward = self.pending, rewards
        done = torch.as_tensor(done, device=self.device)
        self.step_in_episode = torch.where(done, 0, self.step_in_episode + 1)
        self.pending = None

    def _feed(self, slot, inputs: dict) -> torch.Tensor | None:
        return self.policy.step_slot(self.state, slot, inputs)

    def _check_started(self):
        if self.state is None:
            raise RuntimeError("call start(n) first")

    def _observations(self, obs) -> torch.Tensor:
        spec = self.policy.cfg.obs_spec
        obs = spec.check(obs, self.n)
        return torch.as_tensor(obs.astype(np.int64 if spec.kind == "discrete" else np.uint8),
                               device=self.device)

    def _mask(self, rows) -> torch.Tensor:
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if rows.shape != (self.n,):
                raise ValueError(f"a bool mask of rows must have shape ({self.n},), "
                                 f"got {rows.shape}")
            return torch.as_tensor(rows, device=self.device)
        if rows.size and (not np.issubdtype(rows.dtype, np.integer) or rows.min() < 0
                          or rows.max() >= self.n):
            raise ValueError(f"rows must be a bool mask or indices in [0, {self.n}), got {rows}")
        mask = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        mask[torch.as_tensor(rows.reshape(-1), dtype=torch.long, device=self.device)] = True
        return mask


class RecomputingAgent(InContextAgent):
    """The same agent with no cache: every slot re-runs the backbone over the whole window, which
    slides as the cache does (a full window keeps its last 3/4 of timesteps when a new one
    begins). The reference that checks and benchmarks the cache. Rows move in lockstep (no
    per-row reset)."""

    def start(self, n):
        super().start(n)
        self.window = []       # token blocks (n, k, d), one per slot fed, oldest first

    def reset(self, rows):
        raise NotImplementedError("the recomputing agent keeps one shared window; use start()")

    def _feed(self, slot, inputs):
        policy = self.policy
        if slot is policy.slots[0] and len(self.window) == policy.cfg.context * len(policy.slots):
            self.window = self.window[-window_after_slide(policy.cfg.context) * len(policy.slots):]
        self.window.append(policy.embed_slot(slot, {k: v[:, None] for k, v in inputs.items()})[:, 0])
        h = policy.backbone(torch.cat(self.window, dim=1))
        return policy.heads[slot.predicts](h[:, -1]) if slot.predicts else None


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_temperature(temperature):
    """A finite number > 0 (inf would flatten every policy to uniform, nan poisons sampling)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not np.isfinite(temperature) or not temperature > 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
