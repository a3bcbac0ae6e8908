"""The `icrl` command: generate histories, train, evaluate, or run a whole experiment.

A thin layer over the Python API. The options of `generate` and `train` are the fields of
GenerateConfig, TrainConfig and ModelSpec (icrl.config), with their names, defaults and ranges;
each check lives with the code it protects. User mistakes, and files or folders the operating
system refuses, end in one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from contextlib import contextmanager, nullcontext

from .config import add_options, check, from_options, param, path_option
from .errors import UserError
from .parts import WHOLE, parse_shard


@dataclasses.dataclass
class EvaluateOptions:
    tasks: str = param("test", help="task set of the checkpoint's split: test, train, or ood")
    episodes: int = param(40, low=1, help="consecutive in-context episodes")
    rollouts: int = param(4, low=1, help="rollouts per task")
    greedy: bool = param(False, help="take the most likely action instead of sampling")
    temperature: float = param(1.0, low=0, open_low=True, help="sampling temperature")
    seed: int = param(0, low=0, help="seed of the sampling")
    device: str = param("cpu", help="torch device, e.g. cuda")
    chunk_size: int = param(1024, low=1, help="rows (task x rollout) per batch, each seeded; "
                            "--shard shares out these chunks")
    return_mode: str = param("sample", choices=("sample", "expert", "target"),
                             help="return-conditioned layouts (dt): how the return-to-go is "
                             "chosen: sampled from the model, expert action inference, or "
                             "--target-return")
    target_return: float | None = param(None, help="the return to condition on with "
                                        "--return-mode target")
    kappa: float = param(10.0, low=0, help="strength of expert action inference")


SHARD_HELP = ("I/N: do only chunks i with i %% N == I, leaving them in OUT.parts (or auto: the "
              "rank from torchrun or Slurm); a last run without --shard joins them")


@dataclasses.dataclass
class RunOptions:
    preset: str = param("default", help="embedded configuration (default, long)")
    train_seeds: int | None = param(None, low=1, help="override the preset's training seeds")
    steps: int | None = param(None, low=1, help="override AD's training steps")
    temperature: float | None = param(None, low=0, open_low=True,
                                      help="override the sampling temperature")
    methods: str = param("AD,ED", help="methods to train and evaluate, comma-separated: AD, "
                         "ED, RL2 (RL², trained online; slower)")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        command = self.prog.removeprefix("icrl").strip()
        raise UserError(f"{command}: {message}" if command else message)


def build_parser() -> argparse.ArgumentParser:
    from .baselines.rl2 import RL2Config
    from .envs import FAMILIES
    from .experiments import EXPERIMENTS
    from .generate import GenerateConfig
    from .train import ModelSpec, TrainConfig

    p = _Parser(prog="icrl", description="In-context RL with sequence models "
                "(Algorithm Distillation). Try: icrl run darkroom --out runs/darkroom")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    families = f"task family: {', '.join(FAMILIES)}"

    def command(name, about, configs, **out):
        c = sub.add_parser(name, help=about, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        c.add_argument("--out", type=path_option, **out)
        for config in configs:
            add_options(c, config)
        return c

    g = command("generate", "run a source RL algorithm on many tasks, store histories",
                [GenerateConfig], required=True, help="output HDF5 file")
    g.add_argument("family", help=families)
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="source hyperparameter, e.g. --set init_value=5 (repeatable)")
    g.add_argument("--shard", type=parse_shard, default=WHOLE, help=SHARD_HELP)
    g.add_argument("--workers", type=int, default=1, help="local processes that share the chunks "
                   "(each runs shard i/N), then the join: for slow sources, one chunk per core")
    g.add_argument("--games", help="game suites (minatar, atari): the games, comma-separated "
                   "(default: the suite's own)")
    g.add_argument("--max-steps", type=int, help="game suites: an episode's time limit in steps")
    d = command("import-dqn-replay", "read DQN-Replay files (Dopamine's replay checkpoints) of "
                "one Atari game into a replay history file", [], required=True,
                help="output HDF5 file")
    d.add_argument("replay_dir", type=path_option, help="a run's replay_logs folder")
    d.add_argument("--game", required=True, help="the Atari game (e.g. Pong or pong)")
    d.add_argument("--checkpoints", help="checkpoint numbers, comma-separated (default: all)")
    t = command("train", "train an in-context policy (AD or ED) on a history file",
                [TrainConfig, ModelSpec], required=True, help="output directory (model.pt, tb/)")
    t.add_argument("data", type=path_option, help="history file made by `icrl generate`")
    t.add_argument("--fresh", action="store_true", help="start over, discarding the training "
                   "state in --out (by default an interrupted run continues where it stopped)")
    q = command("rl2", "train the RL² baseline online on the training tasks of a history "
                "file's split", [RL2Config], required=True, help="output directory (model.pt, tb/)")
    q.add_argument("data", type=path_option, help="history file whose stored split to train on")
    q.add_argument("--fresh", action="store_true", help="start over, discarding the training "
                   "state in --out")
    e = command("evaluate", "in-context evaluation of a checkpoint on held-out tasks",
                [EvaluateOptions], help="write the summary JSON here")
    e.add_argument("checkpoint", type=path_option)
    e.add_argument("--family", help="check the checkpoint was trained for this family")
    e.add_argument("--shard", type=parse_shard, default=WHOLE, help=SHARD_HELP)
    r = command("run", "the whole pipeline with embedded defaults: report + figure",
                [RunOptions], required=True, help="output directory")
    r.add_argument("family", help=f"{families}; or mgdt-minatar (the Multi-Game Decision "
                   f"Transformer on MinAtar's five games) or mgdt-atari (on five Atari games, "
                   f"for a GPU)")
    r.add_argument("--fresh", action="store_true", help="delete this run's earlier outputs in "
                   "--out and start over (default: a rerun reuses finished work, resumes the rest)")
    x = command("experiment", "one of the paper's other experiments: report + figure", [],
                required=True, help="output directory")
    x.add_argument("name", choices=tuple(EXPERIMENTS), help="the experiment")
    x.add_argument("--family", help="task family (default: the experiment's own)")
    x.add_argument("--preset", default="default", help="embedded configuration")
    x.add_argument("--data", type=path_option, help="MGDT experiments: reuse this replay file "
                   "(e.g. an mgdt-minatar run's replay.h5) instead of generating one")
    x.add_argument("--fresh", action="store_true", help="delete this experiment's earlier "
                   "outputs in --out and start over")
    return p


def cmd_generate(a):
    from .envs import make_family
    from .generate import GenerateConfig, generate
    from .sources import parse_settings

    cfg = from_options(GenerateConfig, a, source_config=parse_settings(a.set))
    overrides = {k: v for k, v in (("games", a.games and a.games.split(",")),
                                   ("max_steps", a.max_steps)) if v is not None}
    try:
        family = make_family(a.family, **overrides)
    except (TypeError, ValueError) as e:  # a family without games, an unknown game
        raise UserError(f"--games/--max-steps: {e}" if not isinstance(e, TypeError) else
                        f"--games and --max-steps are for game suites, not {a.family}") from None
    path = generate(family, a.out, cfg, shard=a.shard, workers=a.workers)
    if a.shard.whole:
        print(f"wrote {path}")
    else:
        print(f"shard {a.shard}: its chunks are in {path}; run again without --shard to join")


def cmd_import_dqn_replay(a):
    from .data.dqn_replay import import_dqn_replay

    checkpoints = None
    if a.checkpoints:
        try:
            checkpoints = [int(c) for c in a.checkpoints.split(",")]
        except ValueError:
            raise UserError(f"--checkpoints expects numbers, e.g. 49,50, got "
                            f"{a.checkpoints!r}") from None
    print(f"wrote {import_dqn_replay(a.replay_dir, a.game, a.out, checkpoints)}")


def cmd_train(a):
    from .distributed import is_main_process
    from .train import ModelSpec, TrainConfig, train

    with _resumable():
        path = train(a.data, a.out, from_options(ModelSpec, a), from_options(TrainConfig, a),
                     resume=not a.fresh)
    if is_main_process():  # under torchrun every process gets here
        print(f"wrote {path}")


def cmd_rl2(a):
    from .baselines.rl2 import RL2Config, train_rl2
    from .distributed import is_main_process

    with _resumable():
        path = train_rl2(a.data, a.out, from_options(RL2Config, a), resume=not a.fresh)
    if is_main_process():  # under torchrun every process gets here
        print(f"wrote {path}")


@contextmanager
def _resumable():
    """An interruption whose state was saved says how to continue."""
    try:
        yield
    except KeyboardInterrupt as e:
        if str(e):
            raise KeyboardInterrupt(f"{e}; run the same command again to continue") from None
        raise


def cmd_evaluate(a):
    import numpy as np

    from .atomic import check_replaceable, file_sha256, output_lock
    from .checkpoint import load_policy
    from .envs import family_from_config, make_family
    from .evaluate import evaluate
    from .parts import Parts
    from .resources import check_device
    from .report import evaluation_line, evaluation_summary, is_summary, write_json

    o = from_options(EvaluateOptions, a)
    check(o)
    if not a.shard.whole and not a.out:
        raise UserError("--shard needs --out: the shards leave their chunks beside it")
    if a.out:  # before the evaluation, so a bad path does not cost its whole run
        check_replaceable(a.out, is_summary, "an evaluation summary")
    check_device(o.device)
    policy, ckpt = load_policy(a.checkpoint, o.device)
    family = family_from_config(ckpt["family"])
    if a.family is not None and make_family(a.family).config() != family.config():
        raise UserError(f"{a.checkpoint} was trained on {family.name}, not {a.family}")
    sets = [k for k in ckpt["split"] if k != "seed"]
    if o.tasks not in sets:
        raise UserError(f"--tasks: must be one of {', '.join(sets)} for this checkpoint, "
                        f"got {o.tasks!r}")
    tasks = family.tasks()[np.asarray(ckpt["split"][o.tasks], dtype=np.int64)]
    # Chunks from another checkpoint or other options must not be joined into this summary.
    checkpoint = file_sha256(a.checkpoint)
    parts = Parts(a.out, {"checkpoint": checkpoint, **dataclasses.asdict(o)},
                  ("returns",)) if a.out else None
    with output_lock(a.shard.lock_path(a.out)) if a.out else nullcontext():
        try:
            returns = evaluate(policy, family, tasks, o.episodes, o.rollouts, greedy=o.greedy,
                               temperature=o.temperature, seed=o.seed, chunk_size=o.chunk_size,
                               parts=parts, shard=a.shard, progress=True,
                               return_mode=o.return_mode, target_return=o.target_return,
                               kappa=o.kappa)
        except ValueError as e:  # return options the checkpoint's layout cannot take
            raise UserError(str(e)) from None
        if returns is None:
            print(f"shard {a.shard}: its chunks are in {parts.folder}; run again without "
                  f"--shard to join")
            return
        summary = evaluation_summary(family, o.tasks, tasks, returns)
        print(evaluation_line(summary))
        if a.out:
            print(f"wrote {write_json(a.out, summary)}")


def cmd_run(a):
    from .atomic import output_lock
    from .envs import make_family
    from .experiments import RUNS
    from .experiments.incontext import (check_output_dir, clear_outputs, parse_methods,
                                        run_incontext)
    from .experiments.presets import get_preset
    from .report import report_lines

    o = from_options(RunOptions, a)
    check(o)
    if a.family in RUNS:
        return _run_module(a, o)
    methods = parse_methods(o.methods)
    make_family(a.family)
    preset = get_preset(a.family, o.preset)
    preset.train_seeds = o.train_seeds or preset.train_seeds
    preset.train.steps = o.steps or preset.train.steps
    preset.temperature = o.temperature or preset.temperature
    check_output_dir(a.out)
    with output_lock(a.out):
        if a.fresh:
            clear_outputs(a.out)
        report = run_incontext(a.family, a.out, preset, methods)
    print("\n".join(report_lines(report)))
    print(f"wrote {a.out / 'report.json'} and {a.out / 'incontext.png'}")


def _run_module(a, o):
    """`icrl run` for a pipeline of its own (the MGDT on MinAtar): its preset and steps."""
    if o.train_seeds or o.temperature or o.methods != "AD,ED":
        raise UserError(f"{a.family} takes --preset and --steps (its methods are fixed)")
    _run_experiment(a.family, a.out, a.fresh, family=a.family.removeprefix("mgdt-"),
                    preset=o.preset, steps=o.steps)


def cmd_experiment(a):
    extra = {} if a.data is None else {"data": a.data}
    _run_experiment(a.name, a.out, a.fresh, family=a.family, preset=a.preset, **extra)


def _run_experiment(name: str, out, fresh: bool, **options):
    """Run an experiment module (icrl.experiments) in `out`, which holds only its outputs, under
    the output's lock; `fresh` deletes its earlier outputs first."""
    from .atomic import output_lock
    from .experiments import load_experiment
    from .experiments.incontext import check_output_dir, clear_outputs

    module = load_experiment(name)
    if "data" in options and not getattr(module, "TAKES_DATA", False):
        raise UserError(f"--data: the {name} experiment makes its own data")
    check_output_dir(out, module.OUTPUTS)
    with output_lock(out):
        if fresh:
            clear_outputs(out, module.OUTPUTS)
        module.run(out, **options)
    print(f"wrote {out / 'report.json'}")


def _os_error(e: OSError) -> str:
    """An error of the operating system as one line: the path and the reason."""
    reason = e.strerror or str(e)
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    return " ".join((f"{where}: {reason}" if where else reason).split())


COMMANDS = {"generate": cmd_generate, "import-dqn-replay": cmd_import_dqn_replay,
            "train": cmd_train, "rl2": cmd_rl2,
            "evaluate": cmd_evaluate, "run": cmd_run, "experiment": cmd_experiment}


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        COMMANDS[args.command](args)
    except UserError as e:
        _say(f"icrl: error: {e}")
        return 2
    except OSError as e:  # a path the system refuses: read-only, a loop, a name too long...
        _say(f"icrl: error: {_os_error(e)}")
        return 2
    except KeyboardInterrupt as e:  # a command may say what was saved and how to continue
        _say(f"icrl: interrupted; {e}" if str(e) else "icrl: interrupted")
        return 130
    return 0


def _say(line: str):
    """One line on stderr in one write: under torchrun every process may say the same thing to
    the same pipe, and print's separate write of the newline let two lines run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
