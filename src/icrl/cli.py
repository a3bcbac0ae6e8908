"""The `icrl` command: generate histories, train, evaluate, or run a whole experiment.

A thin layer over the Python API. User mistakes end in one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        command = self.prog.removeprefix("icrl").strip()
        raise UserError(f"{command}: {message}" if command else message)


def _number(kind, minimum):
    """An argparse type: a `kind` number >= minimum (> 0 for floats with minimum 0)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
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
    g.add_argument("--tasks", choices=["train", "test"], default="train")
    g.add_argument("--n-test", type=_positive_int, default=16, help="held-out tasks in the split")
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

    e = sub.add_parser("evaluate", help="in-context evaluation of a checkpoint on held-out tasks")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--family", help="check the checkpoint was trained for this family")
    e.add_argument("--tasks", choices=["test", "train"], default="test")
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
    return p


def cmd_generate(a):
    from .envs import make_family
    from .generate import GenerateConfig, generate

    family = make_family(a.family)
    cfg = GenerateConfig(source=a.source, source_config=_parse_sets(a.set), n_episodes=a.episodes,
                         seeds_per_task=a.seeds_per_task, every=a.every,
                         expert_episodes=a.expert_episodes, tasks=a.tasks, n_test=a.n_test,
                         split_seed=a.split_seed, seed=a.seed)
    _check_output_file(a.out)
    path = generate(family, a.out, cfg)
    print(f"wrote {path}")


def cmd_train(a):
    from .models.transformer import TransformerConfig
    from .train import ModelSpec, TrainConfig, train

    spec = ModelSpec(context=a.context, transformer=TransformerConfig(
        n_layer=a.layers, n_head=a.heads, d_model=a.d_model, d_ff=a.d_ff))
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                      device=a.device)
    _check_device(a.device)
    print(f"wrote {train(a.data, a.out, spec, cfg)}")


def cmd_evaluate(a):
    import numpy as np

    from .checkpoint import load_policy
    from .envs import family_from_config, make_family
    from .evaluate import evaluate
    from .report import summarize, write_json

    policy, ckpt = load_policy(a.checkpoint)
    family = family_from_config(ckpt["family"])
    if a.family is not None:
        wanted = make_family(a.family)
        if wanted.config() != family.config():
            raise UserError(f"{a.checkpoint} was trained on {family.name} "
                            f"(observations {family.obs_dims}), not {wanted.name} "
                            f"(observations {wanted.obs_dims})")
    ids = np.asarray(ckpt["split"][a.tasks], dtype=np.int64)
    tasks = family.tasks()[ids]
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
    from .experiments.incontext import run_incontext
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
    report = run_incontext(a.family, a.out, preset)
    for name, m in report["methods"].items():
        print(f"{name:>7}: first episode {m['first_return_mean']:6.2f}   "
              f"last episode {m['last_return_mean']:6.2f}")
    print(f" oracle: {report['oracle_return_mean']:.2f}   ({report['wall_seconds']:.0f} s)")
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
    return out


def _check_output_file(path: Path):
    if path.exists() and path.is_dir():
        raise UserError(f"{path} is a directory, expected a file path")


def _check_output_dir(path: Path):
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / "report.json").exists() \
            and not (path / "data").exists():
        raise UserError(f"{path} holds other files; choose an empty or new directory")


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
    except KeyboardInterrupt:
        print("icrl: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
