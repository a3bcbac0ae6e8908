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
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

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
    n_envs: int = param(256, low=1, help="trials run side by side (one training task each)")
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
    check_device(cfg.device)
    # a lower bound: the unroll's inputs and GRU activations of every trial, float32
    check_fits(f"{cfg.n_envs:,} parallel trials", "lower --n-envs, --unroll or --hidden",
               memory=4 * cfg.n_envs * (cfg.unroll + 1) * cfg.hidden * (cfg.layers + 4),
               device=cfg.device)
    out_dir = Path(out_dir)
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

    with output_lock(out_dir):
        state = None
        if not resume:
            state_path.unlink(missing_ok=True)
        elif state_path.exists():
            state = read_train_state(state_path)
            _check_resumable(state, settings, state_path)
            if state["env_steps"] >= cfg.steps and ckpt_path.is_file():
                return ckpt_path
        torch.manual_seed(cfg.seed)
        model = ActorCritic(policy_cfg).to(cfg.device)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=1e-5)
        rng = np.random.default_rng(cfg.seed)
        sampler = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
        env_steps, updates, seconds_before = 0, 0, 0.0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            rng.bit_generator.state = state["numpy_rng"]
            sampler.set_state(state["sampler_rng"])
            set_rng_state(state, cfg.device)
            env_steps, updates = state["env_steps"], state["updates"]
            seconds_before = state["train_seconds"]
        learner = _Learner(model, optimizer, cfg)
        payload = {"policy_config": policy_cfg.to_dict(), "family": family.config(),
                   "split": split, "data": {"path": str(Path(data_path)), "kind": "online",
                                            "source": "rl2"},
                   "train_config": asdict(cfg)}

        def save():
            seconds = seconds_before + time.time() - start
            save_checkpoint(ckpt_path, {**payload, "step": env_steps, "train_seconds": seconds,
                                        "state_dict": model.policy.state_dict()})
            save_train_state(state_path, {
                **settings, "env_steps": env_steps, "updates": updates,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "numpy_rng": rng.bit_generator.state, "sampler_rng": sampler.get_state(),
                **rng_state(cfg.device), "train_seconds": seconds})

        from torch.utils.tensorboard import SummaryWriter
        start, last_saved, steps_at_start = time.time(), updates, env_steps
        with StopRequest() as stop, \
                SummaryWriter(str(out_dir / "tb"), purge_step=updates) as writer, \
                tqdm(total=cfg.steps, initial=min(env_steps, cfg.steps), unit="step",
                     unit_scale=True, desc=f"RL² {out_dir.name}", disable=not progress) as bar:
            while env_steps < cfg.steps:
                tasks = train_tasks[rng.integers(len(train_tasks), size=cfg.n_envs)]
                env = family.make(tasks, seed=int(rng.integers(2**31)))
                for stats in learner.trial(env, family.episode_len, sampler):
                    updates += 1
                    env_steps += stats.pop("steps")
                    bar.update(min(env_steps, cfg.steps) - bar.n)
                    if updates % cfg.log_every == 0:
                        for name, value in stats.items():
                            writer.add_scalar(f"rl2/{name}", value, updates)
                        writer.add_scalar("rl2/env_steps", env_steps, updates)
                        writer.add_scalar("rl2/steps_per_s", (env_steps - steps_at_start)
                                          / (time.time() - start), updates)
                episodes = learner.last_trial_returns  # (episodes,) mean over the batch
                writer.add_scalar("rl2/first_episode_return", episodes[0], updates)
                writer.add_scalar("rl2/last_episode_return", episodes[-1], updates)
                bar.set_postfix(first=f"{episodes[0]:.2f}", last=f"{episodes[-1]:.2f}")
                if env_steps >= cfg.steps:
                    break
                if stop.requested or updates - last_saved >= cfg.checkpoint_every:
                    save()
                    last_saved = updates
                if stop.requested:
                    raise KeyboardInterrupt(f"training state saved after {env_steps:,} of "
                                            f"{cfg.steps:,} steps in {state_path}")
            save()
        return ckpt_path


class _Learner:
    """Runs trials in a batched environment and updates the actor-critic every `unroll` steps."""

    def __init__(self, model: ActorCritic, optimizer, cfg: RL2Config):
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.device = cfg.device
        self.last_trial_returns = np.zeros(cfg.trial_episodes)

    def trial(self, env, episode_len: int, sampler: torch.Generator):
        """One trial of every row, from fresh hidden states; yields each update's statistics."""
        cfg, dev, n = self.cfg, self.device, self.cfg.n_envs
        model = self.model
        total = cfg.trial_episodes * episode_len   # fixed-length episodes: rows stay in lockstep
        state = model.policy.new_state(n)
        prev_action = torch.full((n,), -1, dtype=torch.long, device=dev)
        prev_reward = torch.zeros(n, device=dev)
        step = torch.zeros(n, dtype=torch.long, device=dev)
        returns = np.zeros((n, cfg.trial_episodes))
        episode = np.zeros(n, dtype=np.int64)
        obs = env.reset()
        t = 0
        while t < total:
            h0 = state.h.clone()
            rollout = {k: [] for k in ("obs", "prev_action", "prev_reward", "step", "actions",
                                       "rewards", "values", "log_probs")}
            for _ in range(min(cfg.unroll, total - t)):
                inputs = {"obs": _tensor(obs, dev), "prev_action": prev_action,
                          "prev_reward": prev_reward, "step": step}
                with torch.no_grad():
                    logits, value = model({k: v[:, None] for k, v in inputs.items()}, state)
                log_probs = torch.log_softmax(logits[:, 0], -1)
                action = torch.multinomial(log_probs.exp(), 1, generator=sampler)[:, 0]
                obs, reward, done = env.step(action.cpu().numpy())
                returns[np.arange(n), np.minimum(episode, cfg.trial_episodes - 1)] += reward
                episode += done
                reward = torch.as_tensor(reward, dtype=torch.float32, device=dev)
                for k, v in (*inputs.items(), ("actions", action), ("rewards", reward),
                             ("values", value[:, 0]),
                             ("log_probs", log_probs.gather(1, action[:, None])[:, 0])):
                    rollout[k].append(v)
                prev_action, prev_reward = action, reward
                done_t = torch.as_tensor(done, device=dev)
                step = torch.where(done_t, 0, step + 1)
                if done.any():
                    obs = env.reset(done)
                t += 1
            if t < total:  # bootstrap from the next step's value, without advancing the state
                with torch.no_grad():
                    _, next_value = model({"obs": _tensor(obs, dev)[:, None],
                                           "prev_action": prev_action[:, None],
                                           "prev_reward": prev_reward[:, None],
                                           "step": step[:, None]},
                                          RecurrentState(state.h.clone()))
                next_value = next_value[:, 0]
            else:          # the trial's end is terminal
                next_value = torch.zeros(n, device=dev)
            batch = {k: torch.stack(v, dim=1) for k, v in rollout.items()}
            stats = self._update(batch, h0, next_value)
            stats["steps"] = n * batch["actions"].shape[1]
            yield stats
        self.last_trial_returns = returns.mean(0)

    def _update(self, batch: dict, h0: torch.Tensor, next_value: torch.Tensor) -> dict:
        cfg = self.cfg
        # The critic predicts a discounted *average*, (1 - gamma) * sum_k gamma^k r: its targets
        # stay in the rewards' range whatever gamma, so its loss cannot swamp the policy's in the
        # shared, norm-clipped gradient. Normalised advantages are unchanged by the scale.
        advantages = _gae((1 - cfg.gamma) * batch["rewards"], batch["values"], next_value,
                          cfg.gamma, cfg.gae_lambda)
        targets = advantages + batch["values"]
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        inputs = {k: batch[k] for k in ("obs", "prev_action", "prev_reward", "step")}
        n = len(h0[0])
        for _ in range(cfg.epochs):
            for rows in torch.randperm(n).chunk(cfg.minibatches):
                logits, values = self.model({k: v[rows] for k, v in inputs.items()},
                                            RecurrentState(h0[:, rows]))
                log_probs = torch.log_softmax(logits, -1)
                new = log_probs.gather(2, batch["actions"][rows, :, None])[..., 0]
                ratio = (new - batch["log_probs"][rows]).exp()
                adv = advantages[rows]
                policy_loss = -torch.min(ratio * adv,
                                         ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv).mean()
                value_loss = F.mse_loss(values, targets[rows])
                entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
                loss = policy_loss + cfg.value_coef * value_loss - cfg.entropy_coef * entropy
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.optimizer.step()
        return {"policy_loss": policy_loss.item(), "value_loss": value_loss.item(),
                "entropy": entropy.item(), "reward_per_step": batch["rewards"].mean().item()}


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
