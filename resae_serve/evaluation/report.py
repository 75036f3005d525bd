"""``resae eval``: every evaluation of one or more dictionaries over the same tokens, as one
report (``report.json``, ``report.md`` and PNG plots).

Dictionaries are compared on identical held-out activations (reconstruction) and identical
token windows (splicing, propagation). A layerwise dictionary borrows the affine maps of a
ReSAE in the same report for residual-space FVE, mapped redundancy and propagation.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from resae_serve import __version__
from resae_serve.corpus import load_documents
from resae_serve.errors import ResaeError
from resae_serve.evaluation.data import (
    Dictionary,
    heldout_activations,
    load_dictionaries,
    take_windows,
)
from resae_serve.evaluation.propagation import linear_propagation
from resae_serve.evaluation.reconstruction import evaluate_layers
from resae_serve.evaluation.redundancy import LayerRedundancy, redundancy
from resae_serve.evaluation.splice import SPLICE_MODES, evaluate_splicing
from resae_serve.models import load_model
from resae_serve.resae import ReSAE

logger = logging.getLogger(__name__)

REPORT_JSON, REPORT_MD = "report.json", "report.md"


class EvalError(ResaeError):
    """An evaluation was configured with values it cannot use."""


@dataclass(frozen=True)
class EvalConfig:
    """What ``resae eval`` measures and on how many tokens."""

    eval_tokens: int | None = None
    """Held-out tokens for reconstruction metrics (None: the dictionary's ``eval_tokens``)."""
    splice_windows: int = 16
    """Held-out windows for splicing."""
    context_size: int = 128
    """Tokens per splicing / propagation window (BOS included)."""
    batch_size: int = 4
    """Windows per forward pass."""
    modes: tuple[str, ...] = SPLICE_MODES
    """Joint splicing modes (:data:`~resae_serve.evaluation.splice.SPLICE_MODES`)."""
    propagation_features: int = 8
    """Features sampled per layer for the linear-propagation check (0: skip it)."""
    propagation_windows: int = 2
    """Windows the propagation check runs on."""
    seed: int = 0
    """Seed of the feature sample."""

    def __post_init__(self) -> None:
        for name in ("splice_windows", "context_size", "batch_size", "propagation_windows"):
            if getattr(self, name) < 1:
                raise EvalError(f"{name}={getattr(self, name)}; must be at least 1")
        if self.eval_tokens is not None and self.eval_tokens < 1:
            raise EvalError(f"eval_tokens={self.eval_tokens}; must be positive or None")
        bad = sorted(set(self.modes) - set(SPLICE_MODES))
        if bad or not self.modes:
            raise EvalError(f"modes={list(self.modes)}; allowed: {', '.join(SPLICE_MODES)}")


def _affine_source(dictionary: Dictionary, others: list[Dictionary]) -> ReSAE | None:
    if dictionary.resae.mode == "resae":
        return None
    for other in others:
        if other.resae.mode == "resae" and other.resae.layers == dictionary.resae.layers:
            return other.resae
    return None


def _redundancy_json(rows: list[LayerRedundancy]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        entry: dict[str, Any] = {"layer": row.layer, "previous": row.previous,
                                 **row.fractions(), "median_raw": float(row.raw.median())}
        entry["median_mapped"] = None if row.mapped is None else float(row.mapped.median())
        out.append(entry)
    return out


def run_evaluation(folders: list[Path], config: EvalConfig, *, model: str | None = None,
                   corpus: str | None = None, progress: bool = True,
                   ) -> tuple[dict[str, Any], dict[str, list[LayerRedundancy]]]:
    """Evaluate the dictionaries in ``folders`` (the first is the main one).

    Returns the JSON-ready report and the raw redundancy vectors (for the histograms).
    """
    model_dir, dicts = load_dictionaries(folders, model=model, corpus=corpus)
    report: dict[str, Any] = {
        "format": "resae-eval-report", "package_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": dicts[0].manifest.model.name, "model_fingerprint":
        dicts[0].manifest.model.fingerprint, "corpus": dicts[0].data.corpus, "split": "heldout",
        "settings": asdict(config), "dictionaries": {},
    }
    means: dict[int, torch.Tensor] = {}
    raw_redundancy: dict[str, list[LayerRedundancy]] = {}
    for d in dicts:
        n_tokens = config.eval_tokens or d.data.eval_tokens
        logger.info("reconstruction of %s on %d held-out tokens", d.name, n_tokens)
        affine_from = _affine_source(d, dicts)
        recon = evaluate_layers(d.resae, heldout_activations(d, n_tokens, progress=progress),
                                affine_from=affine_from)
        for layer, mean in recon.means.items():
            means.setdefault(layer, mean)
        raw_redundancy[d.name] = redundancy(d.resae, affine_from=affine_from)
        report["dictionaries"][d.name] = {
            "folder": str(d.folder), "mode": d.resae.mode, "layers": list(d.resae.layers),
            "d_sae": [sae.config.d_sae for sae in d.resae.saes],
            "architecture": d.resae.saes[0].config.architecture, "k": d.resae.saes[0].config.k,
            "tokens_trained": d.manifest.training.get("tokens_seen"),
            "affine_maps_from": (d.name if d.resae.mode == "resae" else
                                 next((o.name for o in dicts if o.resae is affine_from), None)),
            "reconstruction": [row._asdict() for row in recon.layers],
            "redundancy": _redundancy_json(raw_redundancy[d.name]),
        }
    lm, tokenizer = load_model(model_dir)
    documents = load_documents(dicts[0].data.corpus, "heldout")
    windows = take_windows(documents, tokenizer, n_windows=config.splice_windows,
                           context_size=config.context_size, batch_size=config.batch_size)
    splices = evaluate_splicing(lm, windows, {d.name: d.resae for d in dicts}, means,
                                modes=config.modes, progress=progress)
    probe = take_windows(documents, tokenizer, n_windows=config.propagation_windows,
                         context_size=config.context_size,
                         batch_size=config.propagation_windows)[0]
    for d in dicts:
        splice = splices[d.name]
        entry = report["dictionaries"][d.name]
        entry["splicing"] = {
            "ce_clean": splice.ce_clean, "n_tokens": splice.n_tokens,
            "single": {str(layer): r._asdict() for layer, r in splice.single.items()},
            "local": {str(layer): r._asdict() for layer, r in splice.local.items()},
            "sum_single_delta_ce": sum(r.delta_ce for r in splice.single.values()),
            "joint": {mode: r._asdict() for mode, r in splice.joint.items()},
            "interaction": splice.interaction,
        }
        propagation = [] if not config.propagation_features else linear_propagation(
            lm, probe, d.resae, affine_from=_affine_source(d, dicts),
            n_features=config.propagation_features, seed=config.seed)
        entry["propagation"] = [row._asdict() for row in propagation]
    report["splice_tokens"] = int(sum(int(w.keep.sum()) for w in windows))
    return report, raw_redundancy


def write_report(out: Path, report: dict[str, Any],
                 raw_redundancy: dict[str, list[LayerRedundancy]]) -> list[Path]:
    """Write ``report.json``, ``report.md`` and the plots into ``out``; returns the paths."""
    from resae_serve.evaluation.plots import plot_delta_ce, plot_fve_l0, plot_redundancy
    from resae_serve.evaluation.render import render_markdown

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / REPORT_JSON, out / REPORT_MD]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    plots = [plot_fve_l0(report, out / "fve_l0.png"),
             plot_delta_ce(report, out / "delta_ce.png"),
             plot_redundancy(raw_redundancy, out / "redundancy.png")]
    paths[1].write_text(render_markdown(report, [p.name for p in plots if p is not None]))
    return paths + [p for p in plots if p is not None]
