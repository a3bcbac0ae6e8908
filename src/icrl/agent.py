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

A layout with a return slot (`dt`) decides its return-to-go by `return_mode`: "sample" draws it
from the model's distribution; "expert" from that distribution reweighted towards high returns
(the Multi-Game Decision Transformer's expert action inference, `expert_return_logits`, of
strength `kappa`); "target" conditions on `target_return` (plain Decision-Transformer
conditioning; one number, or one per row): each row on its target minus the rewards received so
far in its episode. The action is then drawn given the chosen return.
"""
from __future__ import annotations

import numbers

import numpy as np
import torch

from .checkpoint import load_policy
from .models.policy import SequencePolicy
from .models.transformer import window_after_slide

RETURN_MODES = ("sample", "expert", "target")


def sample(logits: torch.Tensor, temperature: float, greedy: bool,
           generator: torch.Generator) -> torch.Tensor:
    """One class per row: the most likely if greedy, else sampled at `temperature`. Finite for
    any temperature > 0: the largest logit is subtracted before dividing, so a tiny temperature
    tends to the argmax instead of overflowing."""
    if greedy:
        return logits.argmax(-1)
    z = (logits - logits.amax(-1, keepdim=True)) / temperature
    return torch.multinomial(z.softmax(-1), 1, generator=generator)[:, 0]


def expert_return_logits(logits: torch.Tensor, low: int, high: int,
                         kappa: float) -> torch.Tensor:
    """MGDT's expert return distribution as logits: P(R | expert) is proportional to P(R) times
    exp(kappa * (R - low) / (high - low)), so the logits of the return bins (..., high - low + 1),
    bin k holding R = low + k, gain kappa * k / (high - low)."""
    if logits.shape[-1] != high - low + 1:
        raise ValueError(f"expected {high - low + 1} return bins for [{low}, {high}], got "
                         f"{logits.shape[-1]}")
    bins = torch.arange(logits.shape[-1], device=logits.device, dtype=logits.dtype)
    return logits + kappa * bins / (high - low)


def check_return_options(policy: SequencePolicy, return_mode: str = "sample",
                         target_return=None, kappa: float = 10.0):
    """ValueError, in one line, for a way of choosing returns-to-go that `policy` cannot take."""
    if not isinstance(return_mode, str) or return_mode not in RETURN_MODES:
        raise ValueError(f"return_mode must be one of {', '.join(RETURN_MODES)}, got "
                         f"{return_mode!r}")
    if return_mode != "sample" and not any(s.field == "return" for s in policy.slots):
        raise ValueError(f"the {policy.cfg.model.layout!r} layout has no return slot: "
                         f"return_mode {return_mode!r} needs one (dt)")
    if (return_mode == "target") != (target_return is not None):
        raise ValueError(f"target_return goes with return_mode 'target' (and only with it), got "
                         f"{target_return!r} with {return_mode!r}")
    if target_return is not None and not _finite_numbers(target_return):
        raise ValueError(f"target_return must be a finite number or a vector of them (one per "
                         f"row), got {target_return!r}")
    if not _finite_number(kappa) or not kappa >= 0:
        raise ValueError(f"kappa must be a finite number >= 0, got {kappa!r}")


class InContextAgent:
    """`return_mode`: how a layout with a return slot chooses its return-to-go ("sample",
    "expert" or "target", see the module's docstring); `target_return`: the target of "target",
    a number or one per row (n,);
    `kappa`: the strength of "expert" (MGDT's 10). Temperature and greedy apply to the returns
    sampled in both other modes as to the actions."""

    def __init__(self, policy: SequencePolicy, greedy: bool = False, temperature: float = 1.0,
                 seed: int = 0, return_mode: str = "sample", target_return=None,
                 kappa: float = 10.0):
        if not isinstance(policy, SequencePolicy):
            raise TypeError(f"policy must be a SequencePolicy, got {type(policy).__name__}")
        _check_temperature(temperature)
        if not _is_int(seed) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        check_return_options(policy, return_mode, target_return, kappa)
        self.policy = policy.eval()
        self.greedy, self.temperature = greedy, temperature
        self.return_mode, self.kappa = return_mode, float(kappa)
        self.target_return = target_return if target_return is None or np.ndim(target_return) \
            else float(target_return)   # (a vector is copied at start)
        self.device = next(policy.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.state = None
        self.n = 0
        self.last_logits: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, checkpoint, device="cpu", greedy: bool = False, temperature: float = 1.0,
             seed: int = 0, return_mode: str = "sample", target_return=None,
             kappa: float = 10.0):
        policy, _ = load_policy(checkpoint, device)
        return cls(policy, greedy=greedy, temperature=temperature, seed=seed,
                   return_mode=return_mode, target_return=target_return, kappa=kappa)

    def start(self, n: int):
        """Begin `n` empty contexts (one per task / environment copy)."""
        if not _is_int(n) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if self.return_mode == "target":  # each row's target minus its episode's rewards
            target = np.asarray(self.target_return, dtype=np.float32)
            if target.ndim and target.shape != (n,):
                raise ValueError(f"target_return has {len(target)} values for {n} rows")
            self.target = torch.as_tensor(np.broadcast_to(target, (n,)).copy(),
                                          device=self.device)
            self.return_to_go = self.target.clone()
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
        if self.return_mode == "target":  # a new episode
            self.return_to_go[mask] = self.target[mask]

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
                    chosen[slot.predicts] = self._choose(slot.predicts, z)
        self.pending, self.last_logits = chosen["action"], logits
        return logits

    def _choose(self, target: str, logits: torch.Tensor) -> torch.Tensor:
        """The action, or the return-to-go by `return_mode`, chosen from the model's logits."""
        if target == "return":
            low, high = self.policy.cfg.model.return_low, self.policy.cfg.model.return_high
            if self.return_mode == "target":
                return self.return_to_go.clone()   # draws no random numbers
            if self.return_mode == "expert":
                logits = expert_return_logits(logits, low, high, self.kappa)
            return sample(logits, self.temperature, self.greedy, self.generator) + low
        return sample(logits, self.temperature, self.greedy, self.generator)

    def act(self, obs) -> np.ndarray:
        """Actions (n,) for observations (n, *obs_spec.shape): sampled at `temperature`, or the
        most likely if greedy. `last_logits` then holds the logits (n, classes) the step decoded
        from, by target ("action", and "return" for a return-conditioned layout)."""
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
        if self.return_mode == "target":  # a row whose episode ended aims anew
            self.return_to_go = torch.where(done, self.target, self.return_to_go - rewards)
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


def _finite_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and bool(np.isfinite(x))


def _finite_numbers(x) -> bool:
    """A finite number, or a non-empty vector of them."""
    values = np.asarray(x)
    return values.ndim <= 1 and values.size > 0 and values.dtype != bool \
        and np.issubdtype(values.dtype, np.number) and bool(np.isfinite(values).all())


def _check_temperature(temperature):
    """A finite number > 0 (inf would flatten every policy to uniform, nan poisons sampling)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not np.isfinite(temperature) or not temperature > 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
