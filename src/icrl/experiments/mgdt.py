"""The Multi-Game Decision Transformer: one model, five games (`icrl run mgdt-minatar`; on Atari,
with a GPU, `icrl run mgdt-atari`).

1. Data like DQN-Replay: a DQN learns each game from scratch (two runs per game, all runs batched)
   and every transition of its whole run is recorded, from random play to its best policy: mixed
   quality, unfiltered (`replay.h5`).
2. One Decision Transformer (`dt`: patch tokens, return-to-go, action, reward) and one behaviour
   cloner (`bc`: the same transformer without return tokens) are trained on all games at once.
3. Each acts in fresh episodes of every game: DT with expert action inference (kappa = 10), DT
   conditioned on a fixed target (each game's best DQN score), and BC.
4. Scores are normalised per game as (score - random) / (best DQN score in the data - random),
   where random is a uniform policy over the game's legal actions and the best DQN score is the
   best mean of `best_window` consecutive episodes of any run in the data; the IQM over games and
   episodes comes with a stratified bootstrap 95% interval (icrl/stats.py). The data itself is
   scored the same way: every finished episode of the dataset.

Every step is reused by a rerun (data, checkpoints, scores); an interrupted one resumes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..report import write_json
from ..resources import check_device
from ..atomic import file_sha256
from ..checkpoint import load_policy, read_checkpoint
from ..data.store import HistoryStore
from ..envs.atari import Atari
from ..envs.games import GameSuite
from ..envs.minatar import MinAtar
from ..errors import UserError
from ..evaluate import evaluate
from ..generate import GenerateConfig, generate
from ..models.policy import ModelSpec
from ..models.transformer import TransformerConfig
from ..stats import iqm_with_ci
from ..train import TrainConfig, train
from .cache import cached_json

OUTPUTS = ("replay.h5", "dt", "bc", "baselines.json", "scores.json", "report.json", "mgdt.png")
METHODS = ("DT-expert", "DT", "BC")

# MinAtar's DQN (Young & Tian, 2019) shortened to a CPU budget: discount 0.99, exploration from 1
# to 0.1 over the first eighth of the run, a replay of 50k transitions per run.
DQN_MINATAR = {"gamma": 0.99, "lr": 5e-4, "learning_starts": 5000, "eps_end": 0.1,
               "eps_decay_steps": 25_000, "capacity": 50_000, "target_every": 250}


# Atari's DQN (Mnih et al. 2015, as Dopamine runs it) shortened to a small GPU run: discount
# 0.99, Adam, exploration from 1 to 0.1 over the first quarter, the Nature network (32, 64, 64
# filters, 512 hidden units), a target network synced every 8,000 steps (2,000 updates).
DQN_ATARI = {"gamma": 0.99, "lr": 1e-4, "learning_starts": 5000, "eps_end": 0.1,
             "eps_decay_steps": 12_500, "capacity": 50_000, "target_every": 2000,
             "channels": 32, "hidden": 512, "device": "cuda"}
SUITES = {"minatar": MinAtar, "atari": Atari}


@dataclass
class MGDTPreset:
    suite: str = "minatar"                # a key of SUITES
    games: tuple[str, ...] = MinAtar.known
    max_steps: int = 2500                 # an episode's time limit (Freeway's own length)
    data: GenerateConfig = field(default_factory=lambda: GenerateConfig(
        source="dqn", source_config=DQN_MINATAR, steps=100_000, seeds_per_task=2,
        chunk_size=10))
    data_workers: int = 1                 # processes that make the replay's chunks
    # MinAtar frames are 10x10: 5x5 patches give 4 tokens per frame (7 per timestep with the
    # return, action and reward), and a linear map of a patch's 250 values loses no cell.
    model: ModelSpec = field(default_factory=lambda: ModelSpec(
        layout="dt", encoder="patch", patch=5, context=8,
        transformer=TransformerConfig(n_layer=4, n_head=4, d_model=128, d_ff=512)))
    # ~6M timesteps seen, about six passes over the default replay; compute-bound on a CPU
    # (at 12,000 steps the DT with expert inference stayed below its data: docs/mgdt.md)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=24_000, batch_size=32, lr=1e-3, warmup_steps=200, checkpoint_every=1000,
        memory_mb=4096))
    eval_episodes: int = 16               # per game and method
    kappa: float = 10.0
    random_episodes: int = 100            # per game, for the random score
    best_window: int = 20                 # consecutive episodes averaged for the best DQN score
    seed: int = 0


MINATAR_PRESETS = {
    "default": MGDTPreset(),
    # seconds, for tests: a few thousand steps of data, a tiny model
    "smoke": MGDTPreset(
        max_steps=200,
        data=GenerateConfig(source="dqn", source_config={**DQN_MINATAR, "learning_starts": 100,
                                                         "capacity": 500},
                            steps=600, seeds_per_task=1, chunk_size=10),
        model=ModelSpec(layout="dt", encoder="patch", patch=5, context=4,
                        transformer=TransformerConfig(n_layer=1, n_head=2, d_model=32, d_ff=64)),
        train=TrainConfig(steps=30, batch_size=8, warmup_steps=5, checkpoint_every=30),
        eval_episodes=2, random_episodes=3, best_window=3),
}
# Atari needs a GPU (the DQN's and the transformer's work) and many cores (ALE steps one row at
# a time on the CPU): each DQN run is a chunk of its own, made in a process of its own. Episodes
# are cut at 2,000 steps (8,000 frames) to keep evaluation within minutes.
ATARI_PRESETS = {
    "default": MGDTPreset(
        suite="atari", games=Atari().games, max_steps=2000,
        data=GenerateConfig(source="dqn", source_config=DQN_ATARI, steps=50_000,
                            seeds_per_task=2, chunk_size=1),
        data_workers=10,
        # 84x84 frames in 14x14 patches: the paper's 36 tokens per frame
        model=ModelSpec(layout="dt", encoder="patch", patch=14, context=4,
                        transformer=TransformerConfig(n_layer=4, n_head=4, d_model=256,
                                                      d_ff=1024)),
        train=TrainConfig(steps=4000, batch_size=64, lr=3e-4, warmup_steps=200,
                          checkpoint_every=1000, device="cuda", memory_mb=8192),
        eval_episodes=8, random_episodes=8, best_window=10),
    # seconds on a CPU, for tests
    "smoke": MGDTPreset(
        suite="atari", games=("breakout", "pong"), max_steps=30,
        data=GenerateConfig(source="dqn", source_config={"capacity": 64, "learning_starts": 16,
                                                         "batch_size": 4, "channels": 4,
                                                         "hidden": 16},
                            steps=60, seeds_per_task=1, chunk_size=1),
        data_workers=2,
        model=ModelSpec(layout="dt", encoder="patch", patch=14, context=2,
                        transformer=TransformerConfig(n_layer=1, n_head=2, d_model=32, d_ff=64)),
        train=TrainConfig(steps=10, batch_size=4, warmup_steps=2, checkpoint_every=10),
        eval_episodes=1, random_episodes=1, best_window=2),
}
PRESETS = {"minatar": MINATAR_PRESETS, "atari": ATARI_PRESETS}


def get_preset(name: str, suite: str = "minatar") -> MGDTPreset:
    if name not in PRESETS[suite]:
        raise UserError(f"unknown preset {name!r} for the MGDT experiments on {suite}; choose "
                        f"from {', '.join(PRESETS[suite])}")
    return PRESETS[suite][name]


def run(out_dir, family: str | None = None, preset: str = "default", progress: bool = True,
        log=print, steps: int | None = None) -> dict:
    """The whole pipeline (see the module docstring); returns the report."""
    t = time.time()
    p, out, suite, data, baselines = prepare(out_dir, family, preset, None, progress, log)
    if steps:
        p = replace(p, train=replace(p.train, steps=steps))
    seconds = {"data": time.time() - t}
    checkpoints = {}
    # "dt": the return-conditioned model, in the preset's layout (dt or mgdt); "bc": without
    for name, layout in (("dt", p.model.layout), ("bc", "bc")):
        t = time.time()
        checkpoints[name] = train(data, out / name, replace(p.model, layout=layout), p.train,
                                  progress=progress)
        seconds[f"train_{name}"] = time.time() - t
    t = time.time()
    scores = cached_json(out / "scores.json", {
        "checkpoints": {k: file_sha256(v) for k, v in checkpoints.items()},
        **evaluation_key(p), "targets": baselines["best"]}, lambda: {
        "DT-expert": play(checkpoints["dt"], suite, p, return_mode="expert", kappa=p.kappa),
        "DT": play(checkpoints["dt"], suite, p, return_mode="target",
                   target_return=np.array(baselines["best"])),
        "BC": play(checkpoints["bc"], suite, p)})
    seconds["evaluate"] = time.time() - t

    report = summarise(suite.games, scores, baselines)
    report["models"] = {layout: _model_info(path) for layout, path in checkpoints.items()}
    report["seconds_this_call"] = {k: round(v, 1) for k, v in seconds.items()}
    report["preset"] = preset
    write_json(out / "report.json", report)
    plot(report, out / "mgdt.png")
    for line in report_lines(report):
        log(line)
    return report


def prepare(out_dir, family: str | None, preset: str, data, progress: bool, log=print):
    """What every MGDT experiment starts from: (preset, output folder, suite, replay path,
    baselines). The replay is `data` if given (checked to hold the suite's games), else made in
    the output folder."""
    family = family or "minatar"
    if family not in SUITES:
        raise UserError(f"the MGDT experiments run on {' or '.join(SUITES)}, not {family}")
    p = get_preset(preset, family)
    try:
        check_device(p.train.device)
    except UserError as e:
        raise UserError(f"{e}: the {family} preset {preset!r} runs on it; choose another "
                        f"preset (smoke runs on a CPU)") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suite = SUITES[p.suite](games=p.games, max_steps=p.max_steps)
    data = check_replay(data, suite) if data else \
        make_replay(suite, out / "replay.h5", p, progress, log)
    return p, out, suite, data, data_baselines(suite, data, out / "baselines.json", p)


def make_replay(suite: GameSuite, path: Path, p: MGDTPreset, progress: bool, log=print) -> Path:
    """The DQN runs' replay (generated, or reused if `path` already holds it)."""
    if not path.exists():
        log(f"replay data: {p.data.seeds_per_task} DQN runs x {p.data.steps} steps on each of "
            f"{len(suite.games)} games")
    return generate(suite, path, replace(p.data, seed=p.seed), progress=progress,
                    workers=p.data_workers)


def check_replay(path, suite: GameSuite) -> Path:
    """`path` (given with --data) as a replay of exactly this suite's games; UserError if not."""
    with HistoryStore(path) as store:
        if store.meta["kind"] != "replay":
            raise UserError(f"{path} holds {store.meta['kind']}, not a replay (made with "
                            f"`icrl generate --steps` or by an mgdt run)")
        if store.family_config() != suite.config():
            raise UserError(f"{path} holds data of {store.family_config()}, the experiment "
                            f"needs {suite.config()}")
    return Path(path)


def data_scores(path: Path, n_games: int) -> list[list[np.ndarray]]:
    """Each game's runs: the returns of every finished episode of each run, in order."""
    with HistoryStore(path) as store:
        returns, games = store.column("episode_returns"), store.column("task_ids")
    return [[row[~np.isnan(row)] for row, g in zip(returns, games) if g == game]
            for game in range(n_games)]


def best_score(runs: list[np.ndarray], window: int) -> float:
    """The best mean of `window` consecutive episodes of any run (all of a shorter run)."""
    best = -np.inf
    for r in runs:
        w = min(window, len(r))
        if w:
            best = max(best, np.convolve(r, np.ones(w) / w, mode="valid").max())
    return float(best)


def data_baselines(suite: GameSuite, data: Path, path: Path, p: MGDTPreset) -> dict:
    """Per game: the random score, the best DQN score and the data's episode returns (cached in
    `path`, keyed by the data's fingerprint)."""
    with HistoryStore(data) as store:
        key = {"data": store.fingerprint()["sha256"], "random_episodes": p.random_episodes,
               "best_window": p.best_window, "seed": p.seed}

    def compute():
        runs = data_scores(data, len(suite.games))
        return {"random": suite.random_returns(p.random_episodes, seed=p.seed).tolist(),
                "best": [best_score(r, p.best_window) for r in runs],
                "episodes": [np.concatenate(r).tolist() for r in runs]}
    return cached_json(path, key, compute)


def play(checkpoint: Path, suite: GameSuite, p: MGDTPreset, **how) -> list[list[float]]:
    """Returns of `eval_episodes` fresh episodes of every game, (games, episodes), all games'
    episodes in one batch, on the device the preset trains on. A fixed target return may be
    given per game."""
    policy, _ = load_policy(checkpoint, p.train.device)
    target = how.get("target_return")
    if isinstance(target, np.ndarray):  # rows are rollout-major: game g at rows r * n + g
        how["target_return"] = np.tile(target, p.eval_episodes)
    returns = evaluate(policy, suite, suite.tasks(), 1, p.eval_episodes, seed=p.seed + 1, **how)
    return returns[:, :, 0].T.tolist()


def evaluation_key(p: MGDTPreset) -> dict:
    """The settings of `play`: cached scores are reused only for the same."""
    return {"episodes": p.eval_episodes, "kappa": p.kappa, "seed": p.seed,
            "max_steps": p.max_steps}


def normalised(scores, random: float, best: float) -> np.ndarray:
    return (np.asarray(scores, dtype=np.float64) - random) / max(best - random, 1e-8)


def summarise(games, scores: dict, baselines: dict) -> dict:
    """report.json: per-game means and normalised scores of each method and of the data, and
    each one's IQM over games with its bootstrap interval."""
    methods = {**scores, "data": baselines["episodes"]}
    per_game = {g: {} for g in games}
    iqm = {}
    for method, by_game in methods.items():
        norm = [normalised(s, baselines["random"][i], baselines["best"][i])
                for i, s in enumerate(by_game)]
        for g, s, z in zip(games, by_game, norm):
            per_game[g][method] = {"score_mean": round(float(np.mean(s)), 4),
                                   "normalised": round(float(z.mean()), 4),
                                   "n_episodes": len(s)}
        iqm[method] = iqm_with_ci(norm)
    return {"games": list(games), "iqm": iqm, "per_game": per_game,
            "random": dict(zip(games, np.round(baselines["random"], 4).tolist())),
            "best_dqn": dict(zip(games, np.round(baselines["best"], 4).tolist())),
            "normalisation": "(score - random) / (best DQN score in the data - random)"}


def report_lines(report: dict) -> list[str]:
    lines = ["normalised IQM over games (95% bootstrap CI):"]
    for method, s in report["iqm"].items():
        lines.append(f"  {method:<10} {s['mean']:7.3f}  [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]")
    return lines


def plot(report: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    games, methods = report["games"], list(report["iqm"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(methods)
    for k, m in enumerate(methods):
        ax1.bar(np.arange(len(games)) + k * width, [report["per_game"][g][m]["normalised"]
                                                    for g in games], width, label=m)
    ax1.set_xticks(np.arange(len(games)) + 0.4 - width / 2, games)
    ax1.set_ylabel("normalised score")
    ax1.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax1.legend()
    means = [report["iqm"][m]["mean"] for m in methods]
    errs = np.array([[means[i] - report["iqm"][m]["ci"][0], report["iqm"][m]["ci"][1] - means[i]]
                     for i, m in enumerate(methods)]).T
    ax2.bar(methods, means, yerr=errs, color=[f"C{i}" for i in range(len(methods))], capsize=4)
    ax2.set_title("IQM over games (95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _model_info(path: Path) -> dict:
    ckpt = read_checkpoint(path)
    n = sum(v.numel() for v in ckpt["state_dict"].values())
    return {"params": int(n), "steps": ckpt.get("step"), "train_seconds":
            round(float(ckpt.get("train_seconds", 0.0)), 1)}
