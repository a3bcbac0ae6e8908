"""The paper's experiments, one module each; every one writes numbers (JSON) and a figure (PNG).

`icrl run FAMILY` is experiment 1 (incontext.py). The others are `icrl experiment NAME`: each
module listed in EXPERIMENTS defines

    OUTPUTS: tuple[str, ...]     the names it writes in its output directory (a rerun reuses
                                 them; --fresh deletes exactly these)
    run(out_dir, family: str | None, preset: str, progress: bool = True) -> dict   the report

and a module docstring whose first line is its one-line help.
"""
from __future__ import annotations

import importlib

# name on the command line -> module under icrl.experiments
EXPERIMENTS = {
    "data-efficiency": "data_efficiency",
    "prompting": "prompting",
    "context-size": "context_size",
    "mgdt-scaling": "mgdt_scaling",
    "mgdt-finetune": "mgdt_finetune",
}
# `icrl run NAME` pipelines that are not an AD task family: module under icrl.experiments
RUNS = {"mgdt-minatar": "mgdt", "mgdt-atari": "mgdt"}


def load_experiment(name: str):
    """The module of an experiment (EXPERIMENTS) or of a pipeline (RUNS)."""
    return importlib.import_module(f"{__name__}.{EXPERIMENTS.get(name) or RUNS[name]}")
