"""RL², the online meta-RL baseline: a recurrent actor-critic trained with PPO across trials.

A trial is `trial_episodes` consecutive episodes on one training task; the GRU's hidden state is
carried across the episodes of a trial and reset between trials, so what the policy learns about
the task lives in that state: it must learn to explore in early episodes and exploit later ones.
Every step it sees the observation, the previous action, the previous reward and the step within
the episode (0 marks an episode boundary): AD's fused token, so the policy is a SequencePolicy
with a GRU backbone, and its checkpoint is evaluated by the same agent and `evaluate` as AD's.

Training is batched: `n_envs` trials run side by side in one batched environment, each on a
training task drawn from the stored split of a history file (the same split AD trains on, so no
held-out task is ever trained on). Every `unroll` steps the actor-critic takes PPO steps on the
batch with GAE advantages, back-propagating through the unroll from its stored starting state
(truncated BPTT). Episode ends inside a trial are not terminal (the trial's return continues);
the trial's end is.

Resumable: the training state is saved at trial boundaries (where no environment or hidden state
needs saving), so an interrupted run continues exactly as if it had not stopped.

Data-parallel under torchrun: each of W processes runs the policy on its share of the trials, rows
[rank * n_envs / W, (rank + 1) * n_envs / W), and the run is the single-process run of the same
`n_envs`. Every process draws the same tasks and environment seed and steps the whole batched
environment (its rows share one random stream, so a share of them cannot be stepped alone), with
the whole batch's actions, sampled on every process alike from the gathered action probabilities;
the policy's forward and backward passes, the cost, are split. The update's means are those of the
whole batch (sums over a process's rows divided by the global counts, gradients summed over the
processes; the advantages are normalised with global moments), PPO's minibatches are the
single-process ones (each process takes its rows of them), and every process applies the same
clipped step, so the weights stay equal everywhere and the training state does not depend on W.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import distributed
from ..atomic import check_directory, check_replaceable, output_lock, reads
from ..checkpoint import read_checkpoint, read_train_state, save_checkpoint, save_train_state
from ..config import check, param
from ..data.store import HistoryStore
from ..envs import family_from_config
from ..errors import UserError
from ..models.policy import ModelSpec, PolicyConfig, SequencePolicy
from ..models.recurrent import RecurrentState
from ..models.transformer import TransformerConfig
from ..resources import check_device, check_fits
from ..train import STATE_FILE, StopRequest, flatten, rng_state, set_rng_state


@dataclass
class RL2Config:
    steps: int = param(2_000_000, low=1, help="environment steps, summed over parallel trials")
    n_envs: int = param(256, low=1, help="trials run side by side (one training task each); "
                        "under torchrun the total over the processes, a multiple of their number")
    trial_episodes: int = param(10, low=1, help="episodes per trial (hidden state carried)")
    hidden: int = param(256, low=1, help="GRU width")
    layers: int = param(2, low=1, help="GRU layers")
    unroll: int = param(20, low=1, help="steps per update (truncated back-propagation)")
    lr: float = param(3e-4, low=0, open_low=True, help="Adam's learning rate")
    gamma: float = param(0.99, low=0, high=1, help="discount, across the episodes of a trial")
    gae_lambda: float = param(0.95, low=0, high=1, help="GAE's lambda")
    epochs: int = param(4, low=1, help="PPO passes over each unroll (1: A2C)")
    minibatches: int = param(4, low=1, help="minibatches per pass (split over trials)")
    clip: float = param(0.2, low=0, open_low=True, help="PPO's ratio clip")
    entropy_coef: float = param(0.01, low=0, help="entropy bonus")
    value_coef: float = param(0.5, low=0, help="weight of the value loss")
    grad_clip: float = param(0.5, low=0, open_low=True, help="gradient norm clip")
    seed: int = param(0, low=0, help="seed of the initialisation, tasks and actions")
    log_every: int = param(20, low=1, help="TensorBoard scalars every N updates")
    checkpoint_every: int = param(50, low=1, help="save at the first trial end after every N "
                                  "updates")
    device: str = param("cpu", help="torch device, e.g. cuda")

    def model_spec(self, family) -> ModelSpec:
        """AD's fused one-token layout on a GRU of `layers` x `hidden`."""
        return ModelSpec(context=self.trial_episodes * family.episode_len, layout="ad",
                         backbone="gru", transformer=TransformerConfig(
                             n_layer=self.layers, n_head=1, d_model=self.hidden))


RESUMABLE_CHANGES = ("log_every", "checkpoint_every", "device", "steps")


class ActorCritic(nn.Module):
    """A SequencePolicy (the actor, saved as the checkpoint) and a value head on its features."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.policy = SequencePolicy(cfg)
        self.value = nn.Linear(cfg.model.transformer.d_model, 1)
        nn.init.zeros_(self.value.weight)
        nn.init.zeros_(self.value.bias)

    def forward(self, inputs: dict, state: RecurrentState):
        """Action logits (B, L, A) and values (B, L) of L steps from `state` (updated)."""
        h = self.policy.backbone.step(self.policy.tokens(inputs), state)
        return self.policy.heads["action"](h), self.value(h)[..., 0]


def train_rl2(data_path, out_dir, cfg: RL2Config | None = None, progress: bool = True,
              resume: bool = True) -> Path:
    """Train RL² on the training tasks of the split stored in `data_path` (a history file made by
    `icrl generate`; only its header is read). Writes `out_dir/model.pt` (the policy, loadable by
    `load_policy` and evaluated like AD), the training state and TensorBoard scalars under
    `out_dir/tb`. Resumable like `train()`: a rerun continues an interrupted run, returns a
    finished one at once, and refuses a state saved with other settings; `steps` may grow."""
    cfg = cfg or RL2Config()
    check(cfg)
    group = distributed.join(cfg.device)
    try:
        return _train_rl2(data_path, Path(out_dir), cfg, progress, resume, group)
    finally:
        group.leave()


def _train_rl2(data_path, out_dir: Path, cfg: RL2Config, progress: bool, resume: bool,
               group: distributed.Group) -> Path:
    if cfg.n_envs % group.world:
        raise UserError(f"--n-envs ({cfg.n_envs}) must be a multiple of the number of processes "
                        f"({group.world}): each runs an equal share of the trials")
    device, share = group.device, cfg.n_envs // group.world
    check_device(device)
    # a lower bound: the unroll's inputs and GRU activations of this process's trials, float32
    check_fits(f"{share:,} parallel trials" + (" per process" if group.world > 1 else ""),
               "lower --n-envs, --unroll or --hidden",
               memory=4 * share * (cfg.unroll + 1) * cfg.hidden * (cfg.layers + 4),
               device=device)
    ckpt_path, state_path = out_dir / "model.pt", out_dir / STATE_FILE
    check_directory(out_dir)
    check_replaceable(ckpt_path, reads(read_checkpoint), "an icrl policy checkpoint")
    with HistoryStore(data_path) as store:
        family = family_from_config(store.family_config())
        split = store.meta["split"]
        try:
            family.check_split(split)
        except ValueError as e:
            raise UserError(f"{store.path}: {e}") from None
    train_tasks = family.tasks()[np.asarray(split["train"], dtype=np.int64)]
    try:
        policy_cfg = PolicyConfig(family.obs_spec, family.n_actions, family.episode_len,
                                  cfg.model_spec(family))
    except ValueError as e:
        raise UserError(str(e)) from None
    settings = {"rl2_config": asdict(cfg), "policy_config": policy_cfg.to_dict(),
                "family": family.config(), "split": split}

    # Only the first process holds the lock and writes; every process reads the saved state.
    with output_lock(out_dir) if group.main else nullcontext():
        state = None
        if not resume:
            group.barrier()
            if group.main:
                state_path.unlink(missing_ok=True)
        elif state_path.exists():
            state = read_train_state(state_path)
            _check_resumable(state, settings, state_path)
            if state["env_steps"] >= cfg.steps and ckpt_path.is_file():
                return ckpt_path
        # Every random stream is the same on every process: the initialisation, the tasks and
        # environment seeds (`rng`), the actions (`sampler`) and the minibatches (torch's).
        torch.manual_seed(cfg.seed)
        model = ActorCritic(policy_cfg).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=1e-5)
        rng = np.random.default_rng(cfg.seed)
        sampler = torch.Generator(device=device).manual_seed(cfg.seed)
        env_steps, updates, seconds_before = 0, 0, 0.0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            rng.bit_generator.state = state["numpy_rng"]
            sampler.set_state(state["sampler_rng"])
            set_rng_state(state, device)
            env_steps, updates = state["env_steps"], state["updates"]
            seconds_before = state["train_seconds"]
        learner = _Learner(model, optimizer, cfg, group)
        payload = {"policy_config": policy_cfg.to_dict(), "family": family.config(),
                   "split": split, "data": {"path": str(Path(data_path)), "kind": "online",
                                            "source": "rl2"},
                   "train_config": asdict(cfg)}

        def save():
            """model.pt and the training state (every process calls it; the first writes). The
            state is every process's: all hold the same weights and random streams."""
            seconds = seconds_before + time.time() - start
            if group.main:
                save_checkpoint(ckpt_path, {**payload, "step": env_steps,
                                            "train_seconds": seconds,
                                            "state_dict": model.policy.state_dict()})
                save_train_state(state_path, {
                    **settings, "env_steps": env_steps, "updates": updates,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "numpy_rng": rng.bit_generator.state, "sampler_rng": sampler.get_state(),
                    **rng_state(device), "train_seconds": seconds})
            group.barrier()  # no process stops before the state is on disk

        from torch.utils.tensorboard import SummaryWriter
        start, last_saved, steps_at_start = time.time(), updates, env_steps
        with StopRequest() as stop, \
                (SummaryWriter(str(out_dir / "tb"), purge_step=updates) if group.main
                 else nullcontext()) as writer, \
                tqdm(total=cfg.steps, initial=min(env_steps, cfg.steps), unit="step",
                     unit_scale=True, desc=f"RL² {out_dir.name}",
                     disable=not (progress and group.main)) as bar:
            while env_steps < cfg.steps:
                tasks = train_tasks[rng.integers(len(train_tasks), size=cfg.n_envs)]
                env = family.make(tasks, seed=int(rng.integers(2**31)))
                for stats in learner.trial(env, family.episode_len, sampler):
                    updates += 1
                    env_steps += stats.pop("steps")
                    bar.update(min(env_steps, cfg.steps) - bar.n)
                    if group.main and updates % cfg.log_every == 0:
                        for name, value in stats.items():
                            writer.add_scalar(f"rl2/{name}", value, updates)
                        writer.add_scalar("rl2/env_steps", env_steps, updates)
                        writer.add_scalar("rl2/steps_per_s", (env_steps - steps_at_start)
                                          / (time.time() - start), updates)
                episodes = learner.last_trial_returns  # (episodes,) mean over the batch
                if group.main:
                    writer.add_scalar("rl2/first_episode_return", episodes[0], updates)
                    writer.add_scalar("rl2/last_episode_return", episodes[-1], updates)
                    bar.set_postfix(first=f"{episodes[0]:.2f}", last=f"{episodes[-1]:.2f}")
                if env_steps >= cfg.steps:
                    break
                # whether any process was asked to stop (torchrun and Slurm signal them all)
                stop_requested = group.sum([float(stop.requested)])[0] > 0
                if stop_requested or updates - last_saved >= cfg.checkpoint_every:
                    save()
                    last_saved = updates
                if stop_requested:
                    raise KeyboardInterrupt(f"training state saved after {env_steps:,} of "
                                            f"{cfg.steps:,} steps in {state_path}")
            save()
        return ckpt_path


class _Learner:
    """Runs trials in a batched environment and updates the actor-critic every `unroll` steps.

    Under torchrun this process's policy sees only its rows `[lo, hi)` of the batch; the rest is
    the whole batch's, on every process alike (see the module's notes)."""

    def __init__(self, model: ActorCritic, optimizer, cfg: RL2Config,
                 group: distributed.Group | None = None):
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.group = group or distributed.Group(device=cfg.device)
        self.device = self.group.device
        share = cfg.n_envs // self.group.world
        self.lo, self.hi = self.group.rank * share, (self.group.rank + 1) * share
        self.last_trial_returns = np.zeros(cfg.trial_episodes)

    def trial(self, env, episode_len: int, sampler: torch.Generator):
        """One trial of every row, from fresh hidden states; yields each update's statistics."""
        cfg, dev, n = self.cfg, self.device, self.cfg.n_envs
        model, group, mine = self.model, self.group, slice(self.lo, self.hi)
        total = cfg.trial_episodes * episode_len   # fixed-length episodes: rows stay in lockstep
        b = self.hi - self.lo                      # this process's rows (all n in one process)
        state = model.policy.new_state(b)
        prev_action = torch.full((b,), -1, dtype=torch.long, device=dev)
        prev_reward = torch.zeros(b, device=dev)
        step = torch.zeros(b, dtype=torch.long, device=dev)
        returns = np.zeros((n, cfg.trial_episodes))
        episode = np.zeros(n, dtype=np.int64)
        obs = env.reset()
        t = 0
        while t < total:
            h0 = state.h.clone()
            rollout = {k: [] for k in ("obs", "prev_action", "prev_reward", "step", "actions",
                                       "rewards", "values", "log_probs")}
            for _ in range(min(cfg.unroll, total - t)):
                inputs = {"obs": _tensor(obs[mine], dev), "prev_action": prev_action,
                          "prev_reward": prev_reward, "step": step}
                with torch.no_grad():
                    logits, value = model({k: v[:, None] for k, v in inputs.items()}, state)
                log_probs = torch.log_softmax(logits[:, 0], -1)
                # the whole batch's actions, drawn alike on every process from the same stream
                action = torch.multinomial(group.gather_rows(log_probs).exp(), 1,
                                           generator=sampler)[:, 0]
                obs, reward, done = env.step(action.cpu().numpy())
                returns[np.arange(n), np.minimum(episode, cfg.trial_episodes - 1)] += reward
                episode += done
                action = action[mine]
                reward = torch.as_tensor(reward[mine], dtype=torch.float32, device=dev)
                for k, v in (*inputs.items(), ("actions", action), ("rewards", reward),
                             ("values", value[:, 0]),
                             ("log_probs", log_probs.gather(1, action[:, None])[:, 0])):
                    rollout[k].append(v)
                prev_action, prev_reward = action, reward
                done_t = torch.as_tensor(done[mine], device=dev)
                step = torch.where(done_t, 0, step + 1)
                if done.any():
                    obs = env.reset(done)
                t += 1
            if t < total:  # bootstrap from the next step's value, without advancing the state
                with torch.no_grad():
                    _, next_value = model({"obs": _tensor(obs[mine], dev)[:, None],
                                           "prev_action": prev_action[:, None],
                                           "prev_reward": prev_reward[:, None],
                                           "step": step[:, None]},
                                          RecurrentState(state.h.clone()))
                next_value = next_value[:, 0]
            else:          # the trial's end is terminal
                next_value = torch.zeros(b, device=dev)
            batch = {k: torch.stack(v, dim=1) for k, v in rollout.items()}
            stats = self._update(batch, h0, next_value)
            stats["steps"] = n * batch["actions"].shape[1]
            yield stats
        self.last_trial_returns = returns.mean(0)

    def _update(self, batch: dict, h0: torch.Tensor, next_value: torch.Tensor) -> dict:
        cfg, group = self.cfg, self.group
        single = group.world == 1
        # The critic predicts a discounted *average*, (1 - gamma) * sum_k gamma^k r: its targets
        # stay in the rewards' range whatever gamma, so its loss cannot swamp the policy's in the
        # shared, norm-clipped gradient. Normalised advantages are unchanged by the scale.
        advantages = _gae((1 - cfg.gamma) * batch["rewards"], batch["values"], next_value,
                          cfg.gamma, cfg.gae_lambda)
        targets = advantages + batch["values"]
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8) if single \
            else self._normalise(advantages)
        inputs = {k: batch[k] for k in ("obs", "prev_action", "prev_reward", "step")}
        n, length = cfg.n_envs, batch["actions"].shape[1]
        params = list(self.model.parameters())
        for _ in range(cfg.epochs):
            for rows in torch.randperm(n).chunk(cfg.minibatches):
                rows, mean = self._share(rows, length)
                logits, values = self.model({k: v[rows] for k, v in inputs.items()},
                                            RecurrentState(h0[:, rows]))
                log_probs = torch.log_softmax(logits, -1)
                new = log_probs.gather(2, batch["actions"][rows, :, None])[..., 0]
                ratio = (new - batch["log_probs"][rows]).exp()
                adv = advantages[rows]
                policy_loss = -mean(torch.min(ratio * adv,
                                              ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv))
                value_loss = F.mse_loss(values, targets[rows]) if single else \
                    mean(F.mse_loss(values, targets[rows], reduction="none"))
                entropy = -mean((log_probs.exp() * log_probs).sum(-1))
                loss = policy_loss + cfg.value_coef * value_loss - cfg.entropy_coef * entropy
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # the whole minibatch's gradient on every process, then the same clipped step
                group.sum_([p.grad for p in params if p.grad is not None])
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                self.optimizer.step()
        if single:
            return {"policy_loss": policy_loss.item(), "value_loss": value_loss.item(),
                    "entropy": entropy.item(), "reward_per_step": batch["rewards"].mean().item()}
        # the last minibatch's losses and the batch's mean reward, summed from their parts
        parts = group.sum([policy_loss.item(), value_loss.item(), entropy.item(),
                           batch["rewards"].sum().item() / (n * length)])
        return dict(zip(("policy_loss", "value_loss", "entropy", "reward_per_step"), parts))

    def _share(self, rows: torch.Tensor, length: int):
        """This process's rows of a minibatch (rows of the whole batch), and how to reduce a term
        per step of them to its part of the minibatch's mean: the mean itself in one process;
        under torchrun the sum over its rows divided by the minibatch's global count, which the
        gradients' sum over the processes completes."""
        if self.group.world == 1:
            return rows, torch.mean
        weight = 1.0 / (len(rows) * length)
        rows = rows[(rows >= self.lo) & (rows < self.hi)] - self.lo
        if not len(rows):  # none here: one row at weight 0, so that the same gradients are summed
            rows, weight = torch.zeros(1, dtype=torch.long), 0.0
        return rows, lambda x: x.sum() * weight

    def _normalise(self, advantages: torch.Tensor) -> torch.Tensor:
        """(advantages - mean) / (std + 1e-8) with the whole batch's mean and (unbiased) standard
        deviation, from the processes' sums."""
        count = self.cfg.n_envs * advantages.shape[1]
        mean = self.group.sum([advantages.double().sum().item()])[0] / count
        squares = self.group.sum([((advantages.double() - mean) ** 2).sum().item()])[0]
        std = math.sqrt(squares / (count - 1)) if count > 1 else math.nan
        return (advantages - mean) / (std + 1e-8)


def _gae(rewards, values, next_value, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates (B, L); no step inside the rollout is terminal."""
    advantages = torch.empty_like(rewards)
    gae = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[1])):
        following = next_value if t == rewards.shape[1] - 1 else values[:, t + 1]
        delta = rewards[:, t] + gamma * following - values[:, t]
        gae = delta + gamma * lam * gae
        advantages[:, t] = gae
    return advantages


def _tensor(obs: np.ndarray, device) -> torch.Tensor:
    return torch.as_tensor(obs.astype(np.int64) if obs.dtype != np.uint8 else obs, device=device)


def _check_resumable(state: dict, settings: dict, path: Path):
    advice = "start over with --fresh (resume=False) or use another output directory"
    if (state.get("family"), state.get("split")) != (settings["family"], settings["split"]):
        raise UserError(f"{path}: saved by a run on another family or split; {advice}")
    was, now = flatten(state["rl2_config"]), flatten(settings["rl2_config"])
    diffs = [f"{k} {was.get(k)} -> {now.get(k)}" for k in sorted(was | now)
             if was.get(k) != now.get(k) and k not in RESUMABLE_CHANGES]
    if diffs:
        raise UserError(f"{path}: saved by a run with other settings ({', '.join(diffs)}); "
                        f"{advice}")
