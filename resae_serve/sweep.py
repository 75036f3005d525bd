"""``resae sweep``: train a grid of dictionaries (mode × k), evaluate them together, report.

Every run shares the data settings, so the activations are captured once (the pipeline's
cache) and every dictionary sees the same tokens in the same order; all runs are evaluated in
one :func:`~resae_serve.evaluation.report.run_evaluation` call, i.e. on the same held-out
activations and the same splicing windows. A run whose folder already holds a dictionary with
its settings is skipped (its recorded wall time is kept), and the evaluation is reused when no
run was trained and its settings are unchanged, so an interrupted sweep resumes where it
stopped.

Layout under ``out``: one dictionary folder per run (``resae-k32``, ``layerwise-k32``, …),
``sweep.json`` (settings and wall times), ``eval/`` (the full ``resae eval`` report of all
runs). The frontier report (``report.md``, ``frontier.json``, plots) goes to ``report``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from resae_serve.evaluation.report import (
    REPORT_JSON,
    EvalConfig,
    EvalError,
    run_evaluation,
    write_report,
)
from resae_serve.pipeline import (
    DataConfig,
    check_sae_settings,
    existing_summary,
    train_dictionary,
)
from resae_serve.resae import MODES
from resae_serve.train import TrainConfig

logger = logging.getLogger(__name__)

SWEEP_JSON = "sweep.json"
EVAL_FOLDER = "eval"


@dataclass(frozen=True)
class SweepConfig:
    """The grid and how it is evaluated."""

    ks: tuple[int, ...] = (16, 32, 64, 128)
    """Active latents per token, one run per value and mode."""
    modes: tuple[str, ...] = MODES
    """Dictionary modes (``resae``, ``layerwise``)."""
    evaluation: EvalConfig = field(default_factory=lambda: EvalConfig(
        splice_windows=64, propagation_features=0))
    """How every run is evaluated (the same windows for all)."""

    def __post_init__(self) -> None:
        if not self.ks or any(k < 1 for k in self.ks) or len(set(self.ks)) != len(self.ks):
            raise EvalError(f"ks={list(self.ks)}; give distinct positive integers, e.g. "
                            "16,32,64,128")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes or len(set(self.modes)) != len(self.modes):
            raise EvalError(f"modes={list(self.modes)}; allowed: {', '.join(MODES)} (distinct)")


def run_name(mode: str, k: int) -> str:
    """Folder name of one run: ``resae-k32``."""
    return f"{mode}-k{k}"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_sweep(data: DataConfig, base: TrainConfig, sweep: SweepConfig, out: Path,
              report_dir: Path, *, force: bool = False, progress: bool = True,
              ) -> dict[str, Any]:
    """Train what is missing, evaluate, write the frontier report; returns ``frontier.json``.

    ``base``: the training settings every run shares (its ``mode`` and ``k`` are replaced).
    """
    from resae_serve.evaluation.frontier import frontier_table, write_frontier

    out.mkdir(parents=True, exist_ok=True)
    state = _read_json(out / SWEEP_JSON)
    wall: dict[str, float] = state.get("train_wall_s", {})
    folders, trained = [], False
    for k in sweep.ks:
        for mode in sweep.modes:
            name, train = run_name(mode, k), replace(base, mode=mode, k=k)  # type: ignore[arg-type]
            folder = out / name
            if force or existing_summary(folder, data, train) is None:
                check_sae_settings(data, train)
                logger.info("sweep: training %s (%d tokens)", name, train.tokens)
                start = time.perf_counter()
                train_dictionary(data, train, folder, progress=progress)
                wall[name] = time.perf_counter() - start
                trained = True
                state = {"data_config": asdict(data), "base_train_config": asdict(base),
                         "ks": list(sweep.ks), "modes": list(sweep.modes), "train_wall_s": wall}
                (out / SWEEP_JSON).write_text(json.dumps(state, indent=2) + "\n")
            else:
                logger.info("sweep: %s already trained with these settings", name)
            folders.append(folder)

    eval_dir = out / EVAL_FOLDER
    previous = _read_json(eval_dir / REPORT_JSON)
    settings = json.loads(json.dumps(asdict(sweep.evaluation)))
    same_runs = [Path(d["folder"]).name for d in previous.get("dictionaries", {}).values()
                 ] == [f.name for f in folders]
    if not trained and previous.get("settings") == settings and same_runs:
        logger.info("sweep: reusing the evaluation in %s", eval_dir)
        report = previous
    else:
        start = time.perf_counter()
        report, raw = run_evaluation(folders, sweep.evaluation, progress=progress)
        report["eval_wall_s"] = time.perf_counter() - start
        write_report(eval_dir, report, raw)
    table = frontier_table(report, wall)
    write_frontier(report_dir, table)
    return table
