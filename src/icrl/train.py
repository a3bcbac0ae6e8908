"""One training loop for in-context policies: random windows of histories, NLL of every action."""
from __future__ import annotations

import itertools
import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import distributed

from .config import check, param
from .atomic import check_directory, check_replaceable, output_lock, reads
from .checkpoint import read_checkpoint, read_train_state, save_checkpoint, save_train_state
from .data.store import HistoryStore
from .data.windows import WindowSampler
from .envs import family_from_config
from .errors import UserError
from .models.policy import ModelSpec, PolicyConfig, SequencePolicy
from .resources import check_device, check_train_size


@dataclass
class TrainConfig:
    steps: int = param(3000, low=1, help="optimizer steps")
    batch_size: int = param(128, low=1, help="windows per step")
    lr: float = param(1e-3, low=0, open_low=True, help="peak learning rate")
    warmup_steps: int = param(100, low=0, help="linear warm-up, then cosine decay")
    min_lr_frac: float = param(0.1, low=0, high=1, help="the decay ends at lr * min_lr_frac")
    weight_decay: float = param(1e-4, low=0)
    beta2: float = param(0.99, low=0, high=1, open_high=True, help="AdamW's beta2")
    grad_clip: float = param(1.0, low=0, open_low=True, help="gradient norm clip")
    seed: int = param(0, low=0, help="seed of the initialisation and of the window sampling")
    log_every: int = param(50, low=1, help="TensorBoard scalars every N steps")
    checkpoint_every: int = param(1000, low=1, help="save model.pt and the training state "
                                  "every N steps")
    device: str = param("cpu", help="torch device, e.g. cuda (under torchrun: one GPU per "
                        "process)")
    precision: str = param("fp32", choices=("fp32", "bf16"), help="bf16: autocast the forward "
                           "pass to bfloat16 (for GPUs; far slower on most CPUs)")
    compile: bool = param(False, help="torch.compile the model (pays off on GPUs)")
    init_from: str | None = param(None, help="start from this checkpoint's weights (fresh "
                                  "optimiser)")
    memory_mb: int = param(256, low=1, help="MiB of histories held in memory to cut windows "
                           "from (beyond it, windows are read from disk)")


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * cosine)


def validate_train_config(cfg: TrainConfig, spec: ModelSpec):
    """UserError in one line unless both configs hold settings in their declared ranges."""
    check(cfg)
    check(spec)
    t = spec.transformer
    if t.d_model % t.n_head:
        raise UserError(f"--d-model ({t.d_model}) must be divisible by --heads ({t.n_head})")


STATE_FILE = "train_state.pt"
# Settings that do not change the trained weights: a resumed run may change them.
RESUMABLE_CHANGES = ("log_every", "checkpoint_every", "device", "compile")


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
    kept after the run finishes.

    Under torchrun each process trains on its share of every batch (`batch_size` is the global
    batch, a multiple of the number of processes) with DistributedDataParallel; only the first
    process writes files. The run follows a single-process run of the same settings, and resumes
    from the same state, with any number of processes."""
    spec, cfg = spec or ModelSpec(), cfg or TrainConfig()
    validate_train_config(cfg, spec)
    group = distributed.join(cfg.device)
    try:
        return _train(data_path, Path(out_dir), spec, cfg, progress, resume, group)
    finally:
        group.leave()


def _train(data_path, out_dir: Path, spec: ModelSpec, cfg: TrainConfig, progress: bool,
           resume: bool, group: distributed.Group) -> Path:
    device = group.device
    check_device(device)
    check_train_size(spec, cfg)
    ckpt_path, state_path = out_dir / "model.pt", out_dir / STATE_FILE
    check_directory(out_dir)  # other files may sit there (e.g. eval.json), not another model.pt
    check_replaceable(ckpt_path, reads(read_checkpoint), "an icrl policy checkpoint")
    with output_lock(out_dir) if group.main else nullcontext(), \
            HistoryStore(data_path) as store:
        family = family_from_config(store.family_config())
        try:
            family.check_split(store.meta["split"])
        except ValueError as e:
            raise UserError(f"{store.path}: {e}") from None
        if spec.context > store.n_steps:
            raise UserError(f"context {spec.context} is longer than the histories in "
                            f"{store.path} ({store.n_steps} steps)")
        try:
            policy_cfg = PolicyConfig(family.obs_spec, family.n_actions, family.episode_len, spec)
        except ValueError as e:
            raise UserError(str(e)) from None
        settings = {"train_config": asdict(cfg), "model_spec": asdict(spec),
                    "policy_config": policy_cfg.to_dict(), "data": store.fingerprint()}
        state = None
        if not resume:
            group.barrier()  # every process has looked for the state before it goes
            if group.main:
                state_path.unlink(missing_ok=True)
        elif state_path.exists():
            state = read_train_state(state_path)
            _check_resumable(state, settings, state_path)
            if state["step"] >= cfg.steps and ckpt_path.is_file():
                return ckpt_path

        torch.manual_seed(cfg.seed)
        policy = SequencePolicy(policy_cfg)
        if cfg.init_from is not None and state is None:
            _init_from(policy, cfg.init_from)
        policy = policy.to(device)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2),
                                      weight_decay=cfg.weight_decay)
        stream = WindowSampler(store, spec.context, cfg.batch_size, seed=cfg.seed,
                               memory=cfg.memory_mb * 2**20, rank=group.rank, world=group.world)
        first_step, loss_avg, seconds_before = 0, None, 0.0
        if state is not None:
            policy.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            stream.load_state_dict(state["stream"])
            first_step, loss_avg = state["step"], state["loss_avg"]
            seconds_before = state["train_seconds"]
        # After building the model, whose init drew from the RNG: each process its own stream.
        _set_process_rng(state, group, cfg.seed)
        if cfg.compile:  # the backbone: the loss around it reads floats out (graph breaks)
            policy.backbone.compile()
        model = distributed.wrap(_Loss(policy), group)
        autocast = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
                    if cfg.precision == "bf16" else nullcontext())
        payload = {"policy_config": policy_cfg.to_dict(), "family": family.config(),
                   "split": store.meta["split"], "data": _data_summary(store),
                   "train_config": asdict(cfg)}

        def save(done: int):
            """model.pt and the training state after `done` steps (every process calls it)."""
            rngs = group.gather(rng_state(device))
            seconds = seconds_before + time.time() - start
            if group.main:
                save_checkpoint(ckpt_path, {
                    **payload, "step": done, "state_dict": policy.state_dict(),
                    **({"final_loss": loss_avg, "train_seconds": seconds}
                       if done == cfg.steps else {})})
                save_train_state(state_path, {
                    **settings, "step": done, "model": policy.state_dict(),
                    "optimizer": optimizer.state_dict(), "stream": stream.state_dict(),
                    **rngs[0], "process_rngs": rngs, "loss_avg": loss_avg,
                    "train_seconds": seconds})
            group.barrier()  # no process stops before the state is on disk

        # The first batch is read (and its values checked) before anything is written or shown.
        batches = itertools.chain([next(stream)], stream)
        from torch.utils.tensorboard import SummaryWriter
        model.train()
        start, tokens = time.time(), 0
        # purge_step: TensorBoard drops what an earlier session logged from this step on, so a
        # resumed (or restarted) curve continues without duplicates.
        with StopRequest() as stop, \
                (SummaryWriter(str(out_dir / "tb"), purge_step=first_step) if group.main
                 else nullcontext()) as writer, \
                tqdm(range(first_step, cfg.steps), initial=first_step, total=cfg.steps,
                     desc=f"train {out_dir.name}", disable=not (progress and group.main)) as bar:
            for step in bar:
                batch = {k: v.to(device) for k, v in next(batches).items()}
                for param_group in optimizer.param_groups:
                    param_group["lr"] = lr_at(step, cfg)
                with autocast:
                    loss, parts = model(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # under DDP: gradients averaged over the processes
                torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
                optimizer.step()
                tokens += batch["actions"].numel() * group.world
                # The global batch's loss, and whether any process was asked to stop.
                loss_sum, stops = group.sum([loss.item(), float(stop.requested)])
                step_loss, stop_requested = loss_sum / group.world, stops > 0
                loss_avg = step_loss if loss_avg is None else 0.98 * loss_avg + 0.02 * step_loss
                if group.main and (step % cfg.log_every == 0 or step == cfg.steps - 1):
                    rate = tokens / (time.time() - start)
                    writer.add_scalar("train/loss", step_loss, step)
                    for name, value in parts.items():
                        writer.add_scalar(f"train/loss_{name}", value, step)
                    writer.add_scalar("train/lr", lr_at(step, cfg), step)
                    writer.add_scalar("train/tokens_per_s", rate, step)
                    bar.set_postfix(loss=f"{loss_avg:.3f}", tok_s=f"{rate:,.0f}")
                done = step + 1
                if done < cfg.steps and (stop_requested or done % cfg.checkpoint_every == 0):
                    save(done)
                if done < cfg.steps and stop_requested:
                    raise KeyboardInterrupt(f"training state saved at step {done} of "
                                            f"{cfg.steps} in {state_path}")
            save(cfg.steps)  # still inside: a signal now is ignored, the run is complete
        return ckpt_path


class _Loss(nn.Module):
    """The policy's training loss as a module's forward, which DistributedDataParallel wraps."""

    def __init__(self, policy: SequencePolicy):
        super().__init__()
        self.policy = policy

    def forward(self, batch: dict):
        return self.policy.loss(batch)


def _set_process_rng(state: dict | None, group: distributed.Group, seed: int):
    """Torch's RNG (dropout draws from it) as saved for this process, or a fresh stream. The
    first process continues the single-process stream; the others get their own."""
    saved = (state or {}).get("process_rngs") or ([state] if state else [])
    if group.rank < len(saved):
        set_rng_state(saved[group.rank], group.device)
    elif group.rank > 0:  # a new run, or a resume with more processes than before
        torch.manual_seed(int(np.random.SeedSequence([seed, group.rank]).generate_state(1)[0]))


def _init_from(policy: SequencePolicy, path):
    """Copy the weights of a checkpoint whose model has the same shape (fine-tuning start)."""
    from .checkpoint import load_policy

    source, _ = load_policy(path)
    if source.cfg != policy.cfg:
        raise UserError(f"--init-from {path}: its model ({_describe(source.cfg)}) differs from "
                        f"this one ({_describe(policy.cfg)})")
    policy.load_state_dict(source.state_dict())


def _describe(cfg: PolicyConfig) -> str:
    m, t = cfg.model, cfg.model.transformer
    return (f"{m.layout}/{m.backbone}, {t.n_layer}x{t.d_model}, context {m.context}, "
            f"observations {cfg.obs_spec.shape}, {cfg.n_actions} actions")


class StopRequest:
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
    was = flatten({**state["train_config"], **state["model_spec"]})
    now = flatten({**settings["train_config"], **settings["model_spec"]})
    diffs = [f"{name} {was.get(name)} -> {now.get(name)}" for name in sorted(was | now)
             if was.get(name) != now.get(name) and name not in RESUMABLE_CHANGES]
    if not diffs and state["policy_config"] != settings["policy_config"]:
        diffs = ["the model's config"]  # same choices, other derived config (another icrl?)
    if diffs:
        raise UserError(f"{path}: saved by a run with other settings ({', '.join(diffs)}); "
                        f"{advice}")


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested config dicts as {"transformer.d_model": 64, ...}, for naming what differs."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def rng_state(device: str) -> dict:
    """Torch's RNG states (dropout draws from them), CPU and, when training there, CUDA."""
    cuda = torch.device(device).type == "cuda"
    return {"torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if cuda else None}


def set_rng_state(state: dict, device: str):
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def _data_summary(store: HistoryStore) -> dict:
    m = store.meta
    return {"path": str(store.path), "kind": m["kind"], "source": m["source"],
            "n_histories": m["n_histories"], "n_steps": m["n_steps"], "every": m["every"]}
