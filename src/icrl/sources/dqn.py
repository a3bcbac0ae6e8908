"""DQN on image observations, one convolutional Q-network per task, all networks updated together.

The paper's Watermaze source. Each of the `n` tasks has its own Q-network, target network, replay
buffer and optimiser state, but they live in shared tensors with a leading task axis and are run
together:

- **Convolutions are grouped convolutions.** Task i's frames become channels [i*C, (i+1)*C) of one
  image and its filters group i of a `groups=k` convolution, so each task's filters only ever see
  its own frames. Tasks share one such call while its input stays cache-sized (4 MiB of floats):
  every task at once for small frames and for acting, one task per call for minibatches of large
  frames (Watermaze: 32 frames of 72x96x3 are 2.6 MiB per task), where oneDNN's grouped kernels
  slowed down 2-3x and a call holds enough work that Python's overhead is nil. Measured on CPU
  against one grouped call for all tasks, `torch.vmap`, im2col + `bmm` and a Python loop over
  tasks: benchmarks/dqn.py.
- **The MLP head is `baddbmm`** over the task axis.
- **The loss is a sum over tasks** of each task's mean Huber loss, so a task's gradient is what it
  would be alone; Adam is elementwise and gradients are clipped per task, so no statistic is
  shared and the tasks learn independently.

The network: for frames of at least 36 pixels a side, the Nature-DQN torso (8x8 stride 4, 4x4
stride 2, 3x3 stride 1) at reduced width; for small frames (MinAtar's 10x10, the 6x6 test family)
MinAtar's one 3x3 convolution. Then a hidden layer and one output per action. Frames enter as uint8
and are scaled by 1/255 inside the network (folded into the first layer's weights).

The replay keeps each frame once: a transition's successor is the next slot of its task's ring.
When an episode ends, its last frame takes the following slot, which is marked as no transition.
Sampling draws a rank among a task's stored transitions and finds its slot through counts of
transitions per block of BLOCK slots, kept up to date as slots are written: O(batch * BLOCK +
capacity / BLOCK) per update instead of a running count over every slot (3 ms per update at the
mgdt preset's 50,000 slots, 0.25 ms now).
Targets bootstrap, y = r + gamma * max_a' Q_target(o', a'), except after a terminal state (a
game's end, `terminal` in `update`): y = r there. The grid and Watermaze episodes end by a time
limit only, so their targets always bootstrap. Exploration is epsilon-greedy, decaying linearly over
environment steps. Double DQN was tried and left out: on darkroom-pixels (36 tasks, 3 seeds) it
did no better (greedy return 0.84 of the oracle against 0.87) for a quarter more compute.

An update runs with denormal floats flushed to zero (x86's FTZ/DAZ mode, set on the calling
thread only: intra-op worker threads keep theirs). Adam's first moment of a weight whose gradient
stays zero (features that do not fire on sparse MinAtar frames) decays through the denormal range,
where each operation on it takes a slow microcode path: after 1,400 updates on MinAtar a third of
the moments were denormal, and at step 30,000 of the mgdt preset's run fused Adam took 16 ms per
update instead of 1 (45% of the time). Flushing changes values below 1.2e-38 only, far below the
last bit of any weight: with and without it, 1,400 updates on MinAtar (10 rows) gave
byte-identical histories and bit-identical weights.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import check, param
from ..errors import UserError
from ..resources import check_device, check_fits
from .base import Source


@dataclass
class DQNConfig:
    lr: float = param(5e-4, low=0, help="Adam step size (0 freezes the networks: a control)")
    gamma: float = param(0.9, low=0, high=1, help="discount")
    batch_size: int = param(32, low=1, help="transitions per task per update")
    capacity: int = param(10_000, low=2, help="replay slots per task (frames are kept once)")
    learning_starts: int = param(500, low=0, help="environment steps before the first update")
    learn_every: int = param(4, low=1, help="environment steps between updates")
    target_every: int = param(250, low=1, help="updates between target-network syncs")
    eps_start: float = param(1.0, low=0, high=1, help="exploration at the first step")
    eps_end: float = param(0.05, low=0, high=1, help="exploration after the decay")
    eps_decay_steps: int = param(5_000, low=0, help="environment steps of linear decay")
    channels: int = param(16, low=1, help="filters of the first convolution (later: twice)")
    hidden: int = param(128, low=1, help="units of the hidden layer")
    max_grad_norm: float = param(10.0, low=0, help="per-task gradient clip (0: none)")
    tasks_per_conv: int = param(0, low=0, help="tasks per grouped convolution (0: as many "
                                "as fit in CONV_BYTES)")
    device: str = param("cpu", help="torch device of the networks and their updates, e.g. cuda "
                        "(the replay stays in host memory)")

# The largest float input of one grouped convolution when `tasks_per_conv` is 0: about a core's
# cache; above it, convolutions over more tasks per call got slower on CPU (benchmarks/dqn.py).
CONV_BYTES = 2**22
# Replay slots per block of the transition counts that sampling searches.
BLOCK = 64


@contextmanager
def flushing_denormals():
    """Within the block (or decorated function), this thread reads and writes denormal floats
    as zero (a no-op where the CPU has no such mode); the mode it had is restored after."""
    # A float32 product below 1.2e-38 is 0 exactly when the mode is on.
    was_on = (torch.full((), 2e-38) * 0.25).item() == 0.0
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if not was_on:
            torch.set_flush_denormal(False)


def torso(height: int, width: int) -> list[tuple[int, int]]:
    """(kernel, stride) of each convolution for frames of this size."""
    if min(height, width) >= 36:
        return [(8, 4), (4, 2), (3, 1)]   # Nature DQN
    return [(3, 1)]                       # MinAtar DQN


class DQN(Source):
    name = "dqn"
    obs_kinds = ("image",)

    def __init__(self, obs_shape, n_actions: int, n: int, config: DQNConfig | None = None,
                 seed: int = 0):
        self.config = c = config or DQNConfig()
        check(c)
        if c.capacity < c.batch_size:
            raise UserError(f"--capacity: must be at least --batch-size ({c.batch_size}), "
                            f"got {c.capacity}")
        if n < 1 or n_actions < 1:
            raise ValueError(f"DQN needs n >= 1 tasks and n_actions >= 1, got {n} and {n_actions}")
        if len(tuple(obs_shape)) != 3:
            raise ValueError(f"DQN needs (height, width, channels) frames, got shape {obs_shape}")
        self.obs_shape = tuple(int(s) for s in obs_shape)
        self.n_actions, self.n = int(n_actions), int(n)
        height, width, channels = self.obs_shape
        if min(height, width) < 3:
            raise ValueError(f"DQN needs frames of at least 3x3 pixels, got {height}x{width}")
        frame_bytes = height * width * channels
        check_fits(f"{n} replay buffers of {c.capacity} frames", "lower --capacity or the "
                   "number of tasks per batch", memory=n * c.capacity * (frame_bytes + 16))
        check_device(c.device)
        self.device = torch.device(c.device)
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)

        # Parameters: per conv layer a weight (n, out, in, k, k) and bias (n, out); then the head.
        self.layers = torso(height, width)
        self.params: list[torch.Tensor] = []
        c_in, h, w = channels, height, width
        for i, (k, s) in enumerate(self.layers):
            c_out = c.channels if i == 0 else 2 * c.channels
            self._add(c_in * k * k, (n, c_out, c_in, k, k), (n, c_out))
            c_in, h, w = c_out, (h - k) // s + 1, (w - k) // s + 1
        self._add(c_in * h * w, (n, c_in * h * w, c.hidden), (n, c.hidden))
        self._add(c.hidden, (n, c.hidden, n_actions), (n, n_actions))
        self.target = [p.detach().clone() for p in self.params]
        # Fused: one kernel per step; several times faster on CPU than the per-op version.
        self.optimizer = torch.optim.Adam(self.params, lr=c.lr, fused=True)

        # Replay: one ring of `capacity` slots per task. `starts[i, j]`: slot j of task i holds
        # a transition whose successor frame is slot j + 1 (mod capacity). `block_counts[i, b]`:
        # how many of slots [b * BLOCK, (b + 1) * BLOCK) of task i hold one (`starts` is a view
        # of whole blocks, `_blocked_starts`, whose padding past `capacity` is never set).
        self.frames = np.zeros((n, c.capacity, height, width, channels), dtype=np.uint8)
        self.actions = np.zeros((n, c.capacity), dtype=np.int64)
        self.rewards = np.zeros((n, c.capacity), dtype=np.float32)
        self.terminals = np.zeros((n, c.capacity), dtype=bool)
        blocks = -(-c.capacity // BLOCK)
        self._blocked_starts = np.zeros((n, blocks, BLOCK), dtype=bool)
        self.starts = self._blocked_starts.reshape(n, -1)[:, :c.capacity]
        self.block_counts = np.zeros((n, blocks), dtype=np.int64)
        self.head = np.zeros(n, dtype=np.int64)
        self.rows = np.arange(n)
        self.steps = 0      # environment steps seen by `update` (each: one transition per task)
        self.updates = 0

    def _add(self, fan_in: int, w_shape, b_shape):
        """A layer's weight and bias, uniform in +-1/sqrt(fan_in) as torch's own layers (drawn
        on the CPU, so that every device starts from the same weights)."""
        bound = 1 / np.sqrt(fan_in)
        for shape in (w_shape, b_shape):
            p = (torch.rand(shape, generator=self.gen) * 2 - 1) * bound
            self.params.append(p.to(self.device).requires_grad_())

    def hyperparameters(self) -> dict:
        # Where it ran is not what it is: the device is left out of a store's metadata.
        return {k: v for k, v in asdict(self.config).items() if k != "device"}

    @property
    def epsilon(self) -> float:
        c = self.config
        frac = min(self.steps / c.eps_decay_steps, 1.0) if c.eps_decay_steps else 1.0
        return c.eps_start + frac * (c.eps_end - c.eps_start)

    def q_values(self, params, frames: torch.Tensor) -> torch.Tensor:
        """Q-values (n, B, A) of uint8 frames (n, B, H, W, C), task i through network i."""
        n, batch = frames.shape[:2]
        chunk = self._conv_chunk(frames[0].numel())
        # split, not slicing: its backward assembles the weights' gradients in one copy.
        convs = [p.split(chunk) for p in params[:2 * len(self.layers)]]
        features = [self._convolve([p[j] for p in convs], frames[lo:lo + chunk])
                    for j, lo in enumerate(range(0, n, chunk))]
        x = features[0] if len(features) == 1 else torch.cat(features)   # (n, B, features)
        w1, b1, w2, b2 = params[-4:]
        x = F.relu(torch.baddbmm(b1[:, None], x, w1))
        return torch.baddbmm(b2[:, None], x, w2)

    def _conv_chunk(self, frame_values: int) -> int:
        """How many tasks share one grouped convolution when one task's input has this many
        values."""
        if self.config.tasks_per_conv:
            return self.config.tasks_per_conv
        return max(1, min(self.n, CONV_BYTES // (4 * frame_values)))

    def _convolve(self, params, frames: torch.Tensor) -> torch.Tensor:
        """Conv features (k, B, F) of uint8 frames (k, B, H, W, C) through the k tasks' filters."""
        k, batch, height, width, channels = frames.shape
        # (B, H, W, k*C) memory seen as (B, k*C, H, W): channels-last, oneDNN's fast layout.
        # Floats first: interleaving the tasks' channels is a faster copy of floats than of bytes.
        x = frames.float().permute(1, 2, 3, 0, 4).reshape(batch, height, width, k * channels)
        x = x.permute(0, 3, 1, 2)
        for i, (size, stride) in enumerate(self.layers):
            w, b = params[2 * i], params[2 * i + 1]
            if i == 0:
                w = w / 255           # scales the frames for the price of a tiny tensor
            w = w.reshape(-1, *w.shape[2:])
            x = F.relu(F.conv2d(x, w, b.reshape(-1), stride=stride, groups=k))
        # Features in (row, column, channel) order: a copy that keeps channels-last, so that the
        # backward pass meets the same layout (mixing layouts made ReLU's backward 10x slower).
        rows, cols = x.shape[2:]
        x = x.permute(0, 2, 3, 1).reshape(batch, rows, cols, k, -1).permute(3, 0, 1, 2, 4)
        return x.reshape(k, batch, -1)

    def _frames(self, obs, what: str) -> np.ndarray:
        obs = np.asarray(obs)
        if obs.shape != (self.n, *self.obs_shape) or obs.dtype != np.uint8:
            raise ValueError(f"DQN expects {what} as uint8 frames of shape "
                             f"{(self.n, *self.obs_shape)}, got {obs.dtype} {obs.shape}")
        return obs

    def act(self, obs, greedy=False):
        obs = self._frames(obs, "observations")
        if greedy:
            explore = np.zeros(self.n, dtype=bool)
        else:
            explore = self.rng.random(self.n) < self.epsilon
            random_actions = self.rng.integers(self.n_actions, size=self.n)
        if explore.all():       # skip the network while every task explores
            return random_actions
        with torch.no_grad():
            q = self.q_values(self.params, torch.from_numpy(obs)[:, None].to(self.device))[:, 0]
        best = q.argmax(dim=1).cpu().numpy()
        return best if greedy else np.where(explore, random_actions, best)

    def update(self, obs, actions, rewards, next_obs, done, terminal=None):
        obs, next_obs = self._frames(obs, "observations"), self._frames(next_obs, "next_obs")
        rows, head, cap = self.rows, self.head, self.config.capacity
        self.frames[rows, head] = obs
        self.actions[rows, head] = actions
        self.rewards[rows, head] = rewards
        self.terminals[rows, head] = False if terminal is None else terminal
        self._mark(head, True)
        # The successor goes in the next slot: the next call overwrites it with the same frame
        # (its obs), unless the episode ended; then it is kept and the next episode skips a slot.
        succ = (head + 1) % cap
        self.frames[rows, succ] = next_obs
        self._mark(succ, False)
        self.head = (succ + np.asarray(done, dtype=np.int64)) % cap
        self.steps += 1
        c = self.config
        if self.steps >= c.learning_starts and self.steps % c.learn_every == 0:
            self.learn(*self.sample())

    def _mark(self, slots: np.ndarray, value: bool) -> None:
        """starts[i, slots[i]] = value for every task i, keeping `block_counts`."""
        was = self.starts[self.rows, slots]
        self.starts[self.rows, slots] = value
        self.block_counts[self.rows, slots // BLOCK] += int(value) - was

    def sample_slots(self) -> np.ndarray:
        """Slots (n, B) of a minibatch per task, uniform with replacement over its stored
        transitions: a rank k drawn below the task's count picks its k-th (from 0) stored
        slot."""
        n, batch = self.n, self.config.batch_size
        running = np.cumsum(self.block_counts, axis=1)     # transitions up to each block's end
        ranks = (self.rng.random((n, batch)) * running[:, -1:]).astype(np.int64)
        # The block of rank k is the first whose running count exceeds k: one search over every
        # task, each task's counts lifted above all of the previous task's.
        lift = self.rows[:, None] * (self.config.capacity + 1)
        found = np.searchsorted((running + lift).ravel(), (ranks + lift).ravel(), side="right")
        rows = self.rows[:, None]
        blocks = found.reshape(n, batch) - rows * running.shape[1]
        # ... and within it, the slot where the block's own running count exceeds what is left.
        left = ranks - (running[rows, blocks] - self.block_counts[rows, blocks])
        inside = np.cumsum(self._blocked_starts[rows, blocks], axis=2, dtype=np.int32)
        return blocks * BLOCK + (inside <= left[..., None]).sum(axis=2)

    def sample(self) -> tuple[torch.Tensor, ...]:
        """A minibatch per task, uniform with replacement over its stored transitions:
        frames (n, B, H, W, C) uint8, actions (n, B), rewards (n, B), next frames, and whether
        each transition ended in a terminal state (n, B); on the source's device."""
        slots = self.sample_slots()
        rows, successors = self.rows[:, None], (slots + 1) % self.config.capacity
        return tuple(torch.from_numpy(a).to(self.device) for a in (
            self.frames[rows, slots], self.actions[rows, slots], self.rewards[rows, slots],
            self.frames[rows, successors], self.terminals[rows, slots]))

    @flushing_denormals()
    def learn(self, frames, actions, rewards, next_frames, terminals=None) -> torch.Tensor:
        """One gradient step of every task's network on its own minibatch; returns the per-task
        losses (n,)."""
        c = self.config
        with torch.no_grad():
            future = self.q_values(self.target, next_frames).amax(dim=2)
            if terminals is not None:
                future = future.masked_fill(terminals, 0.0)
            target = rewards + c.gamma * future
        q = self.q_values(self.params, frames).gather(2, actions[..., None])[..., 0]
        per_task = F.smooth_l1_loss(q, target, reduction="none").mean(dim=1)
        self.optimizer.zero_grad()
        per_task.sum().backward()   # sum, not mean: a task's gradient does not depend on n
        if c.max_grad_norm > 0:
            norms = torch.stack([torch.linalg.vector_norm(p.grad.flatten(1), dim=1)
                                 for p in self.params])
            scale = (c.max_grad_norm / (norms.norm(dim=0) + 1e-6)).clamp(max=1.0)
            if (scale < 1).any():       # a scale of 1 would leave every gradient as it is
                for p in self.params:
                    p.grad.mul_(scale.view(-1, *[1] * (p.dim() - 1)))
        self.optimizer.step()
        self.updates += 1
        if self.updates % c.target_every == 0:
            with torch.no_grad():
                for t, p in zip(self.target, self.params):
                    t.copy_(p)
        return per_task.detach()
