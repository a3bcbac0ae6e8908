"""The `icrl` command: generate histories, train, evaluate, or run a whole experiment.

A thin layer over the Python API. User mistakes end in one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        command = self.prog.removeprefix("icrl").strip()
        raise UserError(f"{command}: {message}" if command else message)


def _number(kind, minimum):
    """An argparse type: a `kind` number >= minimum (finite and > 0 for floats)."""
    noun = "an integer" if kind is int else "a number"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if kind is float and not math.isfinite(value):  # inf would train or sample nonsense
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
        if value < minimum or (kind is float and not value > 0):
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}"
                                             if kind is int else f"must be > 0, got {text}")
        return value
    return parse


_positive_int, _nonneg_int, _positive_float = _number(int, 1), _number(int, 0), _number(float, 0)


def build_parser() -> argparse.ArgumentParser:
    from .envs import FAMILIES
    from .sources import SOURCES

    p = _Parser(prog="icrl", description="In-context RL with sequence models "
                "(Algorithm Distillation). Try: icrl run darkroom --out runs/darkroom")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="run a source RL algorithm on many tasks, store histories")
    g.add_argument("family", help=f"task family: {', '.join(FAMILIES)}")
    g.add_argument("--out", required=True, type=Path, help="output HDF5 file")
    g.add_argument("--source", default="qlearning", help=f"one of {', '.join(SOURCES)}")
    g.add_argument("--episodes", type=_positive_int, default=100, help="episodes per task")
    g.add_argument("--seeds-per-task", type=_positive_int, default=20)
    g.add_argument("--every", type=_positive_int, default=1, help="keep every k-th episode")
    g.add_argument("--expert-episodes", type=_nonneg_int, default=0,
                   help="if > 0: record only this many greedy episodes after --episodes (ED data)")
    g.add_argument("--tasks", default="train",
                   help="task set of the split to run on: train, test, or ood (bandit)")
    g.add_argument("--n-test", type=_positive_int, default=16, help="held-out tasks in the split")
    g.add_argument("--n-train", type=_positive_int,
                   help="cap on the training tasks (default: every task not held out)")
    g.add_argument("--chunk-size", type=_positive_int, default=2048,
                   help="histories per chunk; finished chunks survive an interrupted run")
    g.add_argument("--split-seed", type=_nonneg_int, default=0)
    g.add_argument("--seed", type=_nonneg_int, default=0)
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="source hyperparameter, e.g. --set init_value=5 (repeatable)")

    t = sub.add_parser("train", help="train an in-context policy (AD or ED) on a history file")
    t.add_argument("data", type=Path, help="history file made by `icrl generate`")
    t.add_argument("--out", required=True, type=Path, help="output directory (model.pt, tb/)")
    t.add_argument("--steps", type=_positive_int, default=1500)
    t.add_argument("--batch-size", type=_positive_int, default=128)
    t.add_argument("--lr", type=_positive_float, default=1e-3)
    t.add_argument("--context", type=_positive_int, default=80, help="window length in steps")
    t.add_argument("--layers", type=_positive_int, default=4)
    t.add_argument("--heads", type=_positive_int, default=4)
    t.add_argument("--d-model", type=_positive_int, default=64)
    t.add_argument("--d-ff", type=_positive_int, default=256)
    t.add_argument("--seed", type=_nonneg_int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--checkpoint-every", type=_positive_int, default=1000, metavar="N",
                   help="save model.pt and the training state every N steps")
    t.add_argument("--fresh", action="store_true",
                   help="start over, discarding the training state in --out (by default an "
                   "interrupted run with the same data and settings continues where it stopped)")

    e = sub.add_parser("evaluate", help="in-context evaluation of a checkpoint on held-out tasks")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--family", help="check the checkpoint was trained for this family")
    e.add_argument("--tasks", default="test",
                   help="task set of the stored split: test (default), train, or ood (bandit)")
    e.add_argument("--episodes", type=_positive_int, default=40)
    e.add_argument("--rollouts", type=_positive_int, default=4, help="rollouts per task")
    e.add_argument("--greedy", action="store_true", help="take the most likely action")
    e.add_argument("--temperature", type=_positive_float, default=1.0,
                   help="sampling temperature (default 1: sample from the model)")
    e.add_argument("--seed", type=_nonneg_int, default=0)
    e.add_argument("--out", type=Path, help="write the summary JSON here")

    r = sub.add_parser("run", help="the whole pipeline with embedded defaults: report + figure")
    r.add_argument("family", help=f"task family: {', '.join(FAMILIES)}")
    r.add_argument("--out", required=True, type=Path, help="output directory")
    r.add_argument("--preset", default="default", help="embedded configuration (default, long)")
    r.add_argument("--train-seeds", type=_positive_int, help="override the preset's seeds")
    r.add_argument("--steps", type=_positive_int, help="override AD's training steps")
    r.add_argument("--temperature", type=_positive_float, help="override the sampling temperature")
    r.add_argument("--fresh", action="store_true",
                   help="delete this run's earlier outputs in --out and start over (default: "
                        "a rerun reuses the finished data and training and resumes the rest)")
    return p


def cmd_generate(a):
    from .envs import make_family
    from .generate import GenerateConfig, generate

    family = make_family(a.family)
    sets = _parse_sets(a.set)
    cfg = GenerateConfig(source=a.source, source_config=sets, n_episodes=a.episodes,
                         seeds_per_task=a.seeds_per_task, every=a.every,
                         expert_episodes=a.expert_episodes, tasks=a.tasks, n_test=a.n_test,
                         n_train=a.n_train, split_seed=a.split_seed, seed=a.seed,
                         chunk_size=a.chunk_size)
    _check_output_file(a.out, _is_history_file, "an icrl history file")
    cfg.validate(family)  # the task set must exist before its size can be estimated
    _check_generate_size(family, cfg, a.out)
    path = generate(family, a.out, cfg)
    print(f"wrote {path}")


def cmd_train(a):
    from .models.transformer import TransformerConfig
    from .train import ModelSpec, TrainConfig, train

    spec = ModelSpec(context=a.context, transformer=TransformerConfig(
        n_layer=a.layers, n_head=a.heads, d_model=a.d_model, d_ff=a.d_ff))
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                      checkpoint_every=a.checkpoint_every, device=a.device)
    _check_device(a.device)
    _check_train_size(spec, cfg)
    _check_output_dir(a.out, check_contents=False)  # other files may sit there, e.g. eval.json
    try:
        path = train(a.data, a.out, spec, cfg, resume=not a.fresh)
    except KeyboardInterrupt as e:
        if str(e):  # the state was saved: say how to continue
            raise KeyboardInterrupt(f"{e}; run the same command again to continue") from None
        raise
    print(f"wrote {path}")


def cmd_evaluate(a):
    import numpy as np

    from .checkpoint import load_policy
    from .envs import family_from_config, make_family
    from .evaluate import evaluate
    from .report import summarize, write_json

    if a.out:  # before the evaluation, so a bad path does not cost its whole run
        _check_output_file(a.out, _is_summary, "an evaluation summary")
    policy, ckpt = load_policy(a.checkpoint)
    family = family_from_config(ckpt["family"])
    if a.family is not None:
        wanted = make_family(a.family)
        if wanted.config() != family.config():
            raise UserError(f"{a.checkpoint} was trained on {family.name} "
                            f"(observations {family.obs_dims}), not {wanted.name} "
                            f"(observations {wanted.obs_dims})")
    if a.tasks == "seed" or a.tasks not in ckpt["split"]:
        sets = [k for k in ckpt["split"] if k != "seed"]
        raise UserError(f"--tasks must be one of {', '.join(sets)} for this checkpoint, "
                        f"got {a.tasks!r}")
    ids = np.asarray(ckpt["split"][a.tasks], dtype=np.int64)
    tasks = family.tasks()[ids]
    _check_evaluate_size(policy.cfg, len(tasks) * a.rollouts)
    returns = evaluate(policy, family, tasks, a.episodes, a.rollouts, greedy=a.greedy,
                       temperature=a.temperature, seed=a.seed, progress=True)
    summary = {"family": family.name, "tasks": a.tasks,
               "oracle_return_mean": float(family.oracle_returns(tasks).mean()),
               **summarize(returns, len(tasks), 1)}
    mean = summary["episode_returns_mean"]
    print(f"{family.name}, {len(tasks)} {a.tasks} tasks x {a.rollouts} rollouts: return "
          f"{mean[0]:.2f} (episode 1) -> {mean[-1]:.2f} (episode {len(mean)}), "
          f"oracle {summary['oracle_return_mean']:.2f}")
    if a.out:
        print(f"wrote {write_json(a.out, summary)}")


def cmd_run(a):
    from .envs import make_family
    from .experiments.incontext import clear_outputs, run_incontext
    from .experiments.presets import get_preset

    make_family(a.family)
    preset = get_preset(a.family, a.preset)
    if a.train_seeds:
        preset.train_seeds = a.train_seeds
    if a.steps:
        preset.train.steps = a.steps
    if a.temperature:
        preset.temperature = a.temperature
    _check_output_dir(a.out)
    if a.fresh:
        clear_outputs(a.out)
    report = run_incontext(a.family, a.out, preset)
    sections = [("held-out tasks", report)] + [
        (f"{k} tasks", v) for k, v in report.items() if isinstance(v, dict) and "methods" in v]
    for title, section in sections:
        print(f"{title}: first / last episode, cumulative regret")
        curves = {**section["methods"], **section.get("references", {})}
        for name, m in curves.items():
            print(f"  {name:>9}: {m['first_return_mean']:6.2f} / {m['last_return_mean']:6.2f}   "
                  f"{section['cumulative_regret'][name]:8.2f}")
        if "oracle" not in curves:
            print(f"  {'oracle':>9}: {section['oracle_return_mean']:.2f}")
    print(f"({report['wall_seconds']:.0f} s)")
    print(f"wrote {a.out / 'report.json'} and {a.out / 'incontext.png'}")


def _parse_sets(items) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            raise UserError(f"--set {key}: {value!r} is not a number") from None
        if not math.isfinite(out[key]):  # e.g. 1e999
            raise UserError(f"--set {key}: {value!r} is not a finite number")
    return out


def _check_parents(path: Path):
    """No existing ancestor of `path` may be a file (mkdir would fail with a traceback)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{path}: {parent} is a file, not a directory")
            return


def _is_history_file(path: Path) -> bool:
    from .data.store import MAGIC

    try:
        with open(path, "rb") as raw:
            return raw.read(len(MAGIC) + 1) == MAGIC.encode() + b"\n"
    except OSError:  # unreadable: certainly not ours to overwrite
        return False


def _is_summary(path: Path) -> bool:
    """Whether `path` holds an evaluation summary (which a new evaluation may replace)."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):  # ValueError covers bad JSON and bad UTF-8
        return False
    return isinstance(summary, dict) and "episode_returns_mean" in summary


def _check_output_file(path: Path, is_ours=None, what: str = ""):
    """An output file path: not a directory, under directories, and if it exists, a file of the
    kind this command writes (which it may replace or resume), never some other file."""
    _check_parents(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory, expected a file path")
    if path.exists() and is_ours is not None and not is_ours(path):
        raise UserError(f"{path} exists and is not {what}; not overwriting it (delete it or "
                        f"choose another path)")


def _check_output_dir(path: Path, check_contents: bool = True):
    """An output directory must not be a file; an experiment directory (`check_contents`) must
    also be new, empty, or an earlier run's (to resume it)."""
    _check_parents(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a directory")
    if not check_contents:
        return
    from .atomic import is_temporary
    from .experiments.incontext import OUTPUTS

    others = sorted(p.name for p in path.iterdir()
                    if p.name not in OUTPUTS and not is_temporary(p)) if path.is_dir() else []
    if others:
        raise UserError(f"{path} holds other files ({', '.join(others[:3])}); choose an empty "
                        f"or new directory")


# Memory and disk checks: lower bounds of what a command needs, so absurd sizes (--episodes 1e12,
# --batch-size 1e9) end in one line instead of an allocation traceback or the OOM killer, while
# anything that could fit still runs.

def _memory_bytes(device: str = "cpu") -> int:
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _check_generate_size(family, cfg, out: Path):
    n = len(cfg.split(family)[cfg.tasks]) * cfg.seeds_per_task
    episodes = cfg.n_episodes + cfg.expert_episodes
    steps = (cfg.expert_episodes or -(-cfg.n_episodes // cfg.every)) * family.episode_len
    k = len(family.obs_dims)
    # on disk: uint8 obs and actions, float16 rewards, float32 returns; while collecting a chunk
    # the rewards are float32
    file_bytes = n * (steps * (k + 3) + episodes * 4)
    chunk_bytes = min(n, cfg.chunk_size) * (steps * (k + 5) + episodes * 4)
    disk = next(p for p in [out.parent, *out.parent.parents] if p.exists())
    free = shutil.disk_usage(disk).free
    if file_bytes > free:
        raise UserError(f"{n} histories of {steps} steps need about {_gib(file_bytes)} on disk, "
                        f"{disk} has {_gib(free)} free; use fewer tasks, seeds or episodes")
    if chunk_bytes > _memory_bytes():
        raise UserError(f"a chunk of {min(n, cfg.chunk_size)} histories of {steps} steps needs "
                        f"about {_gib(chunk_bytes)} of memory, more than this machine's "
                        f"{_gib(_memory_bytes())}; lower --chunk-size or --episodes")


def _check_train_size(spec, cfg):
    t = spec.transformer
    params = t.n_layer * (4 * t.d_model ** 2 + 2 * t.d_model * t.d_ff)
    # float32 weights, gradients and AdamW's two moments; one activation per layer and token
    need = 16 * params + 4 * cfg.batch_size * spec.context * t.d_model * t.n_layer
    if need > _memory_bytes(cfg.device):
        raise UserError(f"this model and batch need at least {_gib(need)} of memory on "
                        f"{cfg.device}, which has {_gib(_memory_bytes(cfg.device))}; lower "
                        f"--batch-size, --context, --d-model, --d-ff or --layers")


def _check_evaluate_size(policy_cfg, batch: int):
    t = policy_cfg.transformer
    # the KV cache: keys, values and inputs of every row's window, float32
    need = 4 * batch * policy_cfg.context * t.d_model * (2 * t.n_layer + 1)
    if need > _memory_bytes():
        raise UserError(f"{batch} parallel rollouts need at least {_gib(need)} of memory for "
                        f"their contexts, this machine has {_gib(_memory_bytes())}; lower "
                        f"--rollouts")


def _check_device(device: str):
    import torch
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f"device {device!r} is not usable here ({str(e).splitlines()[0]})") \
            from None


COMMANDS = {"generate": cmd_generate, "train": cmd_train, "evaluate": cmd_evaluate,
            "run": cmd_run}


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        COMMANDS[args.command](args)
    except UserError as e:
        print(f"icrl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a command may say what was saved and how to continue
        print(f"icrl: interrupted; {e}" if str(e) else "icrl: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
