"""One training loop for in-context policies: random windows of histories, NLL of every action."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import save_checkpoint
from .data.store import HistoryStore
from .data.windows import WindowStream
from .envs import family_from_config
from .errors import UserError
from .models.ad import InContextPolicy, PolicyConfig
from .models.transformer import TransformerConfig


@dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_frac: float = 0.1         # cosine decay ends at lr * min_lr_frac
    weight_decay: float = 1e-4
    beta2: float = 0.99
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000
    device: str = "cpu"


@dataclass
class ModelSpec:
    """What the user chooses about the model; the family fills in the rest of PolicyConfig."""
    context: int = 80
    transformer: TransformerConfig = field(default_factory=TransformerConfig)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * cosine)


def validate_train_config(cfg: TrainConfig, spec: ModelSpec):
    checks = [(cfg.steps >= 1, "steps must be >= 1"), (cfg.batch_size >= 1, "batch size must be >= 1"),
              (cfg.lr > 0, "learning rate must be > 0"), (spec.context >= 2, "context must be >= 2"),
              (spec.transformer.d_model % spec.transformer.n_head == 0,
               "d_model must be divisible by n_head"),
              (0 <= spec.transformer.dropout < 1 and 0 <= spec.transformer.attn_dropout < 1,
               "dropout must be in [0, 1)")]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


def train(data_path, out_dir, spec: ModelSpec | None = None, cfg: TrainConfig | None = None,
          progress: bool = True) -> Path:
    """Train a policy on the histories in `data_path`; write `out_dir/model.pt` and TensorBoard
    scalars under `out_dir/tb`. Returns the checkpoint path."""
    spec, cfg = spec or ModelSpec(), cfg or TrainConfig()
    validate_train_config(cfg, spec)
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    with HistoryStore(data_path) as store:
        family = family_from_config(store.family_config())
        if spec.context > store.n_steps:
            raise UserError(f"context {spec.context} is longer than the histories in "
                            f"{store.path} ({store.n_steps} steps)")
        policy_cfg = PolicyConfig(family.obs_dims, family.n_actions, family.episode_len,
                                  spec.context, spec.transformer)
        policy = InContextPolicy(policy_cfg).to(cfg.device)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2),
                                      weight_decay=cfg.weight_decay)
        stream = iter(WindowStream(store, spec.context, cfg.batch_size, family.n_actions,
                                   seed=cfg.seed))
        payload = {"policy_config": policy_cfg.to_dict(), "family": family.config(),
                   "split": store.meta["split"], "data": _data_summary(store),
                   "train_config": asdict(cfg)}
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out_dir / "tb"))
        policy.train()
        bar = tqdm(range(cfg.steps), desc=f"train {out_dir.name}", disable=not progress)
        start, tokens, loss_avg = time.time(), 0, None
        for step in bar:
            batch = {k: v.to(cfg.device) for k, v in next(stream).items()}
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            logits = policy(batch["obs"], batch["prev_action"], batch["prev_reward"], batch["step"])
            loss = F.cross_entropy(logits.flatten(0, 1), batch["target"].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            optimizer.step()
            tokens += batch["target"].numel()
            loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                rate = tokens / (time.time() - start)
                writer.add_scalar("train/loss", loss.item(), step)
                writer.add_scalar("train/lr", lr_at(step, cfg), step)
                writer.add_scalar("train/tokens_per_s", rate, step)
                bar.set_postfix(loss=f"{loss_avg:.3f}", tok_s=f"{rate:,.0f}")
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                save_checkpoint(out_dir / "model.pt", {**payload, "step": step + 1,
                                                       "state_dict": policy.state_dict()})
        writer.close()
        payload.update(step=cfg.steps, final_loss=loss_avg, train_seconds=time.time() - start,
                       state_dict=policy.state_dict())
        return save_checkpoint(out_dir / "model.pt", payload)


def _data_summary(store: HistoryStore) -> dict:
    m = store.meta
    return {"path": str(store.path), "kind": m["kind"], "source": m["source"],
            "n_histories": m["n_histories"], "n_steps": m["n_steps"], "every": m["every"]}
