"""One training loop for in-context policies: random windows of histories, NLL of every action."""
from __future__ import annotations

import math
import numbers
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import read_train_state, save_checkpoint, save_train_state
from .data.store import HEADER_BYTES, HistoryStore
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
    t = spec.transformer
    ints = {"steps": (cfg.steps, 1), "batch size": (cfg.batch_size, 1),
            "warmup steps": (cfg.warmup_steps, 0), "seed": (cfg.seed, 0),
            "log_every": (cfg.log_every, 1), "checkpoint_every": (cfg.checkpoint_every, 1),
            "context": (spec.context, 2), "layers (n_layer)": (t.n_layer, 1),
            "heads (n_head)": (t.n_head, 1), "d_model": (t.d_model, 1), "d_ff": (t.d_ff, 1)}
    for name, (value, low) in ints.items():
        # bool is an int to Python, and 2.0 steps would fail later in range()
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
    floats = {"learning rate": cfg.lr, "weight decay": cfg.weight_decay, "beta2": cfg.beta2,
              "grad_clip": cfg.grad_clip, "min_lr_frac": cfg.min_lr_frac,
              "dropout": t.dropout, "attn_dropout": t.attn_dropout, "rope_base": t.rope_base}
    for name, value in floats.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                or not math.isfinite(value):
            raise UserError(f"{name} must be a finite number, got {value!r}")
    checks = [(cfg.lr > 0, f"learning rate must be > 0, got {cfg.lr}"),
              (cfg.weight_decay >= 0, f"weight decay must be >= 0, got {cfg.weight_decay}"),
              (0 <= cfg.beta2 < 1, f"beta2 must be in [0, 1), got {cfg.beta2}"),
              (cfg.grad_clip > 0, f"grad_clip must be > 0, got {cfg.grad_clip}"),
              (0 <= cfg.min_lr_frac <= 1, f"min_lr_frac must be in [0, 1], got {cfg.min_lr_frac}"),
              (t.rope_base > 0, f"rope_base must be > 0, got {t.rope_base}"),
              (t.d_model % t.n_head == 0,
               f"d_model ({t.d_model}) must be divisible by n_head ({t.n_head})"),
              (0 <= t.dropout < 1 and 0 <= t.attn_dropout < 1, "dropout must be in [0, 1)")]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


STATE_FILE = "train_state.pt"
# Settings that do not change the trained weights: a resumed run may change them.
RESUMABLE_CHANGES = ("log_every", "checkpoint_every", "device")


def train(data_path, out_dir, spec: ModelSpec | None = None, cfg: TrainConfig | None = None,
          progress: bool = True, resume: bool = True) -> Path:
    """Train a policy on the histories in `data_path`; write `out_dir/model.pt` and TensorBoard
    scalars under `out_dir/tb`. Returns the checkpoint path.

    Resumable. Every `checkpoint_every` steps, at the end, and on SIGINT or SIGTERM (after the
    step under way) it writes `model.pt` and `out_dir/train_state.pt`: weights, optimizer, RNG
    states, the window stream's position, the loss average, the configs and a fingerprint of the
    data. After a signal it then raises KeyboardInterrupt; a second signal interrupts at once.
    With `resume=True` a later call on the same `out_dir` continues from that state, with the
    same result as an uninterrupted run, or, if that run had finished, returns its `model.pt` at
    once; a state from other data or other settings (except log_every, checkpoint_every and
    device) is a UserError. `resume=False` discards the state and starts over. The state is
    kept after the run finishes."""
    spec, cfg = spec or ModelSpec(), cfg or TrainConfig()
    validate_train_config(cfg, spec)
    out_dir = Path(out_dir)
    ckpt_path, state_path = out_dir / "model.pt", out_dir / STATE_FILE
    with HistoryStore(data_path) as store:
        family = family_from_config(store.family_config())
        if spec.context > store.n_steps:
            raise UserError(f"context {spec.context} is longer than the histories in "
                            f"{store.path} ({store.n_steps} steps)")
        policy_cfg = PolicyConfig(family.obs_dims, family.n_actions, family.episode_len,
                                  spec.context, spec.transformer)
        settings = {"train_config": asdict(cfg), "model_spec": asdict(spec),
                    "policy_config": policy_cfg.to_dict(), "data": _fingerprint(store)}
        state = None
        if not resume:
            state_path.unlink(missing_ok=True)
        elif state_path.exists():
            state = read_train_state(state_path)
            _check_resumable(state, settings, state_path)
            if state["step"] >= cfg.steps and ckpt_path.is_file():
                return ckpt_path

        torch.manual_seed(cfg.seed)
        policy = InContextPolicy(policy_cfg).to(cfg.device)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2),
                                      weight_decay=cfg.weight_decay)
        stream = WindowStream(store, spec.context, cfg.batch_size, family.n_actions,
                              seed=cfg.seed)
        first_step, loss_avg, seconds_before = 0, None, 0.0
        if state is not None:
            policy.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            stream.load_state_dict(state["stream"])
            _set_rng_state(state, cfg.device)  # after building the model, whose init drew from it
            first_step, loss_avg = state["step"], state["loss_avg"]
            seconds_before = state["train_seconds"]
        payload = {"policy_config": policy_cfg.to_dict(), "family": family.config(),
                   "split": store.meta["split"], "data": _data_summary(store),
                   "train_config": asdict(cfg)}

        def save(done: int):
            """model.pt and the training state after `done` steps."""
            seconds = seconds_before + time.time() - start
            save_checkpoint(ckpt_path, {**payload, "step": done, "state_dict": policy.state_dict(),
                                        **({"final_loss": loss_avg, "train_seconds": seconds}
                                           if done == cfg.steps else {})})
            save_train_state(state_path, {
                **settings, "step": done, "model": policy.state_dict(),
                "optimizer": optimizer.state_dict(), "stream": stream.state_dict(),
                **_rng_state(cfg.device), "loss_avg": loss_avg, "train_seconds": seconds})

        from torch.utils.tensorboard import SummaryWriter
        policy.train()
        start, tokens = time.time(), 0
        # purge_step: TensorBoard drops what an earlier session logged from this step on, so a
        # resumed (or restarted) curve continues without duplicates.
        with _StopRequest() as stop, \
                SummaryWriter(str(out_dir / "tb"), purge_step=first_step) as writer, \
                tqdm(range(first_step, cfg.steps), initial=first_step, total=cfg.steps,
                     desc=f"train {out_dir.name}", disable=not progress) as bar:
            for step in bar:
                batch = {k: v.to(cfg.device) for k, v in next(stream).items()}
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, cfg)
                logits = policy(batch["obs"], batch["prev_action"], batch["prev_reward"],
                                batch["step"])
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
                done = step + 1
                if done < cfg.steps and (stop.requested or done % cfg.checkpoint_every == 0):
                    save(done)
                if done < cfg.steps and stop.requested:
                    raise KeyboardInterrupt(f"training state saved at step {done} of "
                                            f"{cfg.steps} in {state_path}")
            save(cfg.steps)  # still inside: a signal now is ignored, the run is complete
        return ckpt_path


class _StopRequest:
    """While active, SIGINT and SIGTERM only set `requested`, so the training loop can finish its
    step and save before stopping; a second signal raises KeyboardInterrupt at once. Python lets
    only the main thread install handlers: elsewhere signals keep their usual effect."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.requested, self.previous = False, {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            # None: a handler not installed from Python; the default is the closest we can put back
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _fingerprint(store: HistoryStore) -> dict:
    """What identifies the data. The SHA-256 comes from the file's header, which HistoryStore
    checked against the contents on opening: no second pass over a large file."""
    with open(store.path, "rb") as raw:
        digest = raw.read(HEADER_BYTES).split(b"\n")[1].decode().removeprefix("sha256 ")
    return {"name": store.path.name, "n_histories": store.n_histories,
            "n_steps": store.n_steps, "sha256": digest}


def _check_resumable(state: dict, settings: dict, path: Path):
    """UserError, in one line, unless `state` was saved by a run on the same data with the same
    settings (the data's file name may differ: its contents decide)."""
    advice = "start over with --fresh (resume=False) or use another output directory"
    old, new = state["data"], settings["data"]
    if (old["sha256"], old["n_histories"], old["n_steps"]) != \
            (new["sha256"], new["n_histories"], new["n_steps"]):
        raise UserError(f"{path}: saved by a run on other data ({old['name']}, sha256 "
                        f"{old['sha256'][:12]}), not {new['name']} (sha256 {new['sha256'][:12]}); "
                        f"{advice}")
    was = _flatten({**state["train_config"], **state["model_spec"]})
    now = _flatten({**settings["train_config"], **settings["model_spec"]})
    diffs = [f"{name} {was.get(name)} -> {now.get(name)}" for name in sorted(was | now)
             if was.get(name) != now.get(name) and name not in RESUMABLE_CHANGES]
    if not diffs and state["policy_config"] != settings["policy_config"]:
        diffs = ["the model's config"]  # same choices, other derived config (another icrl?)
    if diffs:
        raise UserError(f"{path}: saved by a run with other settings ({', '.join(diffs)}); "
                        f"{advice}")


def _flatten(d: dict, prefix: str = "") -> dict:
    """Nested config dicts as {"transformer.d_model": 64, ...}, for naming what differs."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _rng_state(device: str) -> dict:
    """Torch's RNG states (dropout draws from them), CPU and, when training there, CUDA."""
    cuda = torch.device(device).type == "cuda"
    return {"torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if cuda else None}


def _set_rng_state(state: dict, device: str):
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def _data_summary(store: HistoryStore) -> dict:
    m = store.meta
    return {"path": str(store.path), "kind": m["kind"], "source": m["source"],
            "n_histories": m["n_histories"], "n_steps": m["n_steps"], "every": m["every"]}
