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
`prefill` walks the same slots with recorded values (a demonstration), so they enter the context
as if the agent had chosen them.
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

    @torch.inference_mode()
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

    # Inference mode, not just no_grad: a step is many small operations, and it spares each one
    # the version and view bookkeeping. reset() and _observe() run in it too: the tensors they
    # update in place (the pending action, the step counters) are inference tensors.
    @torch.inference_mode()
    def _walk(self, obs, given: dict | None = None) -> dict[str, torch.Tensor]:
        """Feed this timestep's observation and walk the slots up to the action: returns the
        logits (n, classes) of every target decoded on the way ("action", and for a
        return-conditioned layout "return"). Targets in `given` (recorded "action" and
        "return" tensors, already checked) are fed as they are instead of being decoded. The
        choices stay pending until observe()."""
        self._check_started()
        if self.pending is not None:
            raise RuntimeError("call observe(rewards, done) after each act()")
        inputs = {"obs": self._observations(obs), "prev_action": self.prev_action,
                  "prev_reward": self.prev_reward, "step": self.step_in_episode}
        chosen, logits = dict(given or {}), {}
        for slot in self.policy.slots:
            if slot.field == "reward":
                break  # fed by observe(), once the environment has answered
            if slot.field == "return":
                inputs["returns_to_go"] = chosen["return"]
            elif slot.field == "action":
                inputs["actions"] = chosen["action"]
            z = self._feed(slot, inputs)
            if slot.predicts in ("return", "action"):
                logits[slot.predicts] = z
                if slot.predicts not in chosen:  # a recorded value draws no random numbers
                    choice = sample(z, self.temperature, self.greedy, self.generator)
                    chosen[slot.predicts] = (choice + self.policy.cfg.model.return_low
                                             if slot.predicts == "return" else choice)
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
        self._observe(*self._feedback(rewards, done))

    def prefill(self, obs, actions, rewards, done, returns_to_go=None):
        """Write one recorded timestep into every row's context without acting: the
        observations (n, *obs_spec.shape), the actions (n,) taken there, the rewards (n,) and
        whether each episode ended with that step (bool, (n,)); for a layout with a return slot
        (`dt`) also the returns-to-go (n,) that conditioned the actions. Every slot is fed the
        given value instead of a decoded one, so the agent ends in the state it would be in had
        it chosen those actions itself (context, previous action and reward, step in the
        episode). Draws no random numbers. Call it where act() could be called; ValueError for
        bad input, before anything is fed."""
        self._check_started()
        if self.pending is not None:
            raise RuntimeError("prefill() between act() and observe(): call observe() first")
        given = {"action": self._recorded_actions(actions)}
        if any(slot.field == "return" for slot in self.policy.slots):
            if returns_to_go is None:
                raise ValueError(f"the {self.policy.cfg.model.layout!r} layout conditions on "
                                 f"returns: prefill() needs returns_to_go")
            given["return"] = torch.as_tensor(self._finite("returns_to_go", returns_to_go),
                                              device=self.device)
        elif returns_to_go is not None:
            raise ValueError(f"the {self.policy.cfg.model.layout!r} layout has no return slot: "
                             f"leave returns_to_go out")
        feedback = self._feedback(rewards, done)
        self._walk(obs, given)  # checks the observations before feeding anything
        self._observe(*feedback)

    def _feedback(self, rewards, done) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked rewards (float32) and done (bool) tensors for the n rows."""
        rewards, done = np.asarray(rewards), np.asarray(done)
        if rewards.shape != (self.n,) or done.shape != (self.n,) or done.dtype != bool:
            raise ValueError(f"expected rewards of shape ({self.n},) and a bool done of shape "
                             f"({self.n},), got {rewards.shape} and {done.dtype} {done.shape}")
        if not np.issubdtype(rewards.dtype, np.number) or not np.isfinite(rewards).all():
            raise ValueError("rewards must be finite numbers")
        return (torch.as_tensor(rewards.astype(np.float32), device=self.device),
                torch.as_tensor(done, device=self.device))

    def _recorded_actions(self, actions) -> torch.Tensor:
        actions = np.asarray(actions)
        n_actions = self.policy.cfg.n_actions
        if actions.shape != (self.n,) or not np.issubdtype(actions.dtype, np.integer):
            raise ValueError(f"actions must be an integer array of shape ({self.n},), got "
                             f"{actions.dtype} {actions.shape}")
        if actions.size and (actions.min() < 0 or actions.max() >= n_actions):
            raise ValueError(f"actions must be in [0, {n_actions}), got values from "
                             f"{actions.min()} to {actions.max()}")
        return torch.as_tensor(actions.astype(np.int64), device=self.device)

    def _finite(self, name: str, values) -> np.ndarray:
        values = np.asarray(values)
        if values.shape != (self.n,) or values.dtype == bool \
                or not np.issubdtype(values.dtype, np.number) or not np.isfinite(values).all():
            raise ValueError(f"{name} must be finite numbers of shape ({self.n},), got "
                             f"{values.dtype} {values.shape}")
        return values.astype(np.float32)

    @torch.inference_mode()
    def _observe(self, rewards: torch.Tensor, done: torch.Tensor):
        """Close the pending timestep: feed the reward slot, if any, and advance each row."""
        slot = self.policy.slots[-1]
        if slot.field == "reward":
            self._feed(slot, {"rewards": rewards})
        self.prev_action, self.prev_reward = self.pending, rewards
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
        self.window.append(policy.embed_slot(slot, inputs))
        if not slot.predicts:  # nothing to read from this slot's features: no forward pass
            return None
        h = policy.backbone(torch.cat(self.window, dim=1))
        return policy.heads[slot.predicts](h[:, -1])


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_temperature(temperature):
    """A finite number > 0 (inf would flatten every policy to uniform, nan poisons sampling)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not np.isfinite(temperature) or not temperature > 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
