"""Strict validation of exported graphs against the torch ``ReSAE`` (the oracle).

As optimum's exporters do: the graph's input and output names must equal the spec's exactly
(same names, same order), then each probe (:mod:`export.probes`) is run through onnxruntime
(CPU) and through ``ReSAE``, and every output is compared in float64 against the tolerance of
the graph's precision (:class:`export.spec.Tolerance`). Top-k indices must select the same
latents; the only accepted differences are at ties, where a latent's torch score lies within
the tie window of the token's k-th score or of its cut-off. Tokens at such ties are left out of
value comparisons (the codes legitimately differ there) and counted. The first failure, by
how far it exceeds its tolerance, raises :class:`ParityError` stating the worst difference;
the full report goes to ``export_manifest.json`` under ``validation``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resae_serve.artifact import load_artifact
from resae_serve.interventions import EditOp
from resae_serve.resae import ReSAE

from .errors import ExportError, ParityError, require
from .folder import (
    ExportManifest,
    GraphEntry,
    dictionary_fingerprint,
    read_export_manifest,
    update_manifest,
)
from .graphs import as_float32, dictionary_layout
from .oracle import LayerScores, layer_scores, oracle_outputs
from .probes import PROBES, graph_inputs
from .spec import DEFAULT_TOLERANCES, Tolerance, layer_feeds, layer_outputs

logger = logging.getLogger(__name__)

PROBE_TOKENS = {"random": 64, "real-scale": 256}


@dataclass(frozen=True)
class OutputCheck:
    """How one output of one graph compared with the oracle on one probe."""

    graph: str
    precision: str
    probe: str
    output: str
    tokens: int
    max_abs: float
    """Largest ``|ours − torch|`` (0 for index outputs, which are checked as sets)."""
    max_rel: float
    """``max_abs / max|torch|``."""
    allowed: float
    """``atol + rtol · max|torch|``."""
    worst: str
    """Where the largest difference is, with both values."""
    tie_tokens: int = 0
    """Tokens left out because a top-k choice there sits at a tie."""
    exact_tie_tokens: int = 0
    """Of those, tokens whose differing latents tie exactly (difference 0)."""
    index_mismatch_tokens: int = 0
    """Tokens selecting other latents than torch away from any tie (must be 0)."""

    @property
    def passed(self) -> bool:
        return self.max_abs <= self.allowed and self.index_mismatch_tokens == 0

    @property
    def excess(self) -> float:
        """``max_abs / allowed``, how far past its tolerance (> 1 fails); the one place that
        divides by ``allowed``. That is 0 for index outputs (judged by mismatched tokens) and
        exact tolerances, where any difference counts as infinite, as do mismatches and NaN."""
        if self.index_mismatch_tokens or math.isnan(self.max_abs):
            return math.inf
        if self.allowed > 0:
            return self.max_abs / self.allowed
        return 0.0 if self.max_abs == 0 else math.inf

    def share(self) -> str:
        """:attr:`excess` in words: ``exact``, ``3% of allowed``, ``12.5× allowed``, …"""
        if self.index_mismatch_tokens:
            return (f"{self.index_mismatch_tokens} of {self.tokens} tokens select other latents "
                    "than torch")
        if math.isnan(self.max_abs):
            return "not a number"
        if self.max_abs == 0:
            return "exact"
        if self.allowed == 0:
            return "exceeds a tolerance of 0"
        if self.excess >= 1000:
            return f"{self.excess:,.0f}× allowed"
        if self.excess > 1:
            return f"{self.excess:.3g}× allowed"
        return f"{self.excess:.0%} of allowed" if self.excess >= 0.01 else "<1% of allowed"

    def describe(self) -> str:
        if self.index_mismatch_tokens:
            return (f"{self.graph} ({self.precision}) output {self.output!r} on {self.probe} "
                    f"activations: {self.index_mismatch_tokens} of {self.tokens} tokens select "
                    f"other latents than torch away from any tie; {self.worst}")
        return (f"{self.graph} ({self.precision}) output {self.output!r} on {self.probe} "
                f"activations: max |ours − torch| = {self.max_abs:.3e} ({self.worst}), "
                f"relative {self.max_rel:.2e}; allowed {self.allowed:.3e} ({self.share()})")


@dataclass(frozen=True)
class ValidationReport:
    """Every check of one validation run."""

    checks: tuple[OutputCheck, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def worst(self) -> OutputCheck:
        return worst_check(self.checks)

    def of_graph(self, graph: str, precision: str,
                 layer: int | None = None) -> tuple[OutputCheck, ...]:
        """The checks of one graph file (name and precision, and layer for a per-layer one)."""
        return tuple(c for c in self.checks if c.graph == graph and c.precision == precision
                     and (layer is None or c.output.rsplit("_", 1)[-1] == str(layer)))

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed,
                "checks": [{**asdict(c), "passed": c.passed} for c in self.checks]}


def worst_check(checks: Sequence[OutputCheck]) -> OutputCheck:
    """The check furthest past its tolerance. Among equals (all infinitely past, or all
    exact): the most index mismatches, then the largest difference, then a value check, so
    integer outputs are named only when they fail; then the first."""
    if not checks:
        raise ExportError("no checks to choose the worst of")
    return max(checks, key=lambda c: (c.excess, c.index_mismatch_tokens,
                                      math.inf if math.isnan(c.max_abs) else c.max_abs,
                                      c.allowed > 0))


def summarize(checks: Sequence[OutputCheck]) -> str:
    """One line for the checks of one graph: how close to torch, and the worst check (output,
    probe, share of its tolerance); tie tokens left out of the comparison are counted."""
    if not checks:
        return "not checked"
    worst = worst_check(checks)
    ties = sum(c.tie_tokens for c in checks if c.output.startswith("indices_"))
    tie_note = f", {ties} tie tokens" if ties else ""
    if not worst.passed:
        detail = (worst.share() if worst.index_mismatch_tokens
                  else f"max abs {worst.max_abs:.2e} ({worst.share()})")
        return f"FAILED: {worst.output} on {worst.probe}, {detail}{tie_note}"
    if worst.max_abs == 0:
        return f"exact: max abs 0 in all {len(checks)} checks{tie_note}"
    return (f"max abs {max(c.max_abs for c in checks):.2e}, max rel "
            f"{max(c.max_rel for c in checks):.2e} (worst: {worst.output} on {worst.probe}, "
            f"{worst.share()}){tie_note}")


def _near_boundary(s: LayerScores, window: float) -> np.ndarray:
    """(N, d_sae) latents whose selection or code could flip under differences of ``window``:
    in the top k within ``window`` of the (k+1)-th score, outside it within ``window`` of the
    k-th, or within ``window`` of the activation cut-off."""
    inside = s.score >= s.kth[:, None]
    rank_gap = np.where(inside, s.score - s.next_score[:, None], s.kth[:, None] - s.score)
    return (rank_gap <= window) | (s.cutoff_gap <= window)


def _membership(indices: np.ndarray, values: np.ndarray, d_sae: int) -> np.ndarray:
    """(N, d_sae) bool: latents among a token's codes with a non-zero value."""
    member = np.zeros((len(indices), d_sae), dtype=bool)
    rows = np.repeat(np.arange(len(indices)), indices.shape[1])
    keep = (values != 0).reshape(-1)
    member[rows[keep], indices.reshape(-1)[keep]] = True
    return member


def _values_check(graph: str, precision: str, probe: str, output: str, ours: np.ndarray,
                  ref: np.ndarray, tol: Tolerance, skip: np.ndarray) -> OutputCheck:
    ours64, ref64 = ours.astype(np.float64), ref.astype(np.float64)
    scale = float(np.abs(ref64).max()) if ref64.size else 0.0
    diff = np.abs(ours64 - ref64)
    diff[skip] = 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    where = np.unravel_index(int(diff.argmax()), diff.shape) if diff.size else ()
    worst = (f"token {where[0]}, column {where[1]}: ours {ours64[where]:.6g}, torch "
             f"{ref64[where]:.6g}" if where else "empty output")
    return OutputCheck(graph, precision, probe, output, len(ref), max_abs,
                       max_abs / scale if scale else 0.0, tol.allowed(scale), worst,
                       tie_tokens=int(skip.sum()))


def _index_check(name: str, precision: str, probe: str, L: int, d_sae: int,
                 ref: dict[str, np.ndarray], ours: dict[str, np.ndarray], s: LayerScores,
                 window: float) -> tuple[OutputCheck, np.ndarray]:
    """Check ``indices_L`` as sets of active latents; returns the check and the tie tokens."""
    differs = (_membership(ref[f"indices_{L}"], ref[f"values_{L}"], d_sae)
               ^ _membership(ours[f"indices_{L}"], ours[f"values_{L}"], d_sae))  # (N, d_sae)
    near = _near_boundary(s, window)
    bad = (differs & ~near).any(axis=1)
    ties = differs.any(axis=1) & ~bad
    n_exact = int((ties & ~(differs & ~_near_boundary(s, 0.0)).any(axis=1)).sum())
    worst = "no mismatch"
    if bad.any():
        n = int(np.flatnonzero(bad)[0])
        extra = np.flatnonzero(differs[n] & ~near[n]).tolist()
        worst = (f"token {n}: latents {extra} differ; torch scores "
                 f"{[round(float(s.score[n, j]), 6) for j in extra]}, k-th score "
                 f"{float(s.kth[n]):.6g}, tie window {window:.2e}")
    check = OutputCheck(name, precision, probe, f"indices_{L}", len(differs), 0.0, 0.0, 0.0,
                        worst, int(ties.sum()), n_exact, int(bad.sum()))
    return check, ties


def compare_outputs(name: str, precision: str, probe: str, resae: ReSAE,
                    feeds: dict[str, np.ndarray], ours: dict[str, np.ndarray],
                    tol: Tolerance) -> list[OutputCheck]:
    """Compare a graph's outputs ``ours`` on ``feeds`` with the oracle's."""
    ref = oracle_outputs(name, resae, feeds)
    scores = layer_scores(resae, feeds, name) if name in ("encode", "intervention") else {}
    tokens = len(next(iter(ref.values())))
    checks: list[OutputCheck] = []
    upstream: np.ndarray = np.zeros(tokens, dtype=bool)
    for L, sae in zip(resae.layers, resae.saes, strict=True):
        skip: np.ndarray = np.zeros(tokens, dtype=bool)
        outputs = [f"reconstruction_{L}"]
        if name in ("encode", "intervention"):
            s = scores[L]
            window = (tol.tie_window if tol.tie_window is not None
                      else tol.allowed(float(np.abs(s.score).max())))
        if name == "encode":
            check, skip = _index_check(name, precision, probe, L, sae.config.d_sae, ref, ours,
                                       s, window)
            checks.append(check)
            outputs = [f"values_{L}", f"watched_{L}"]
        elif name == "intervention":
            # Leave out tokens whose edits read a code that sits at a tie, here or upstream
            # (a residualized layer reads the previous layer's edited output).
            feature, op = feeds[f"edit_feature_{L}"], feeds[f"edit_op_{L}"]
            reads_code = np.isin(op, [EditOp.CLAMP, EditOp.SCALE, EditOp.ABLATE])
            at_tie = np.take_along_axis(_near_boundary(s, window), feature, axis=1)
            skip = np.asarray((at_tie & reads_code).any(axis=1))
            if resae.mode == "resae":
                skip = upstream = skip | upstream
            outputs = [f"delta_{L}"]
        checks += [_values_check(name, precision, probe, out, ours[out], ref[out], tol, skip)
                   for out in outputs]
    return checks


def _session(path: Path) -> Any:
    ort = require("onnxruntime", purpose="validating exported graphs")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors; name the file
        raise ParityError(f"onnxruntime cannot load {path.name}: {exc}") from exc


def check_names(entry: GraphEntry, session: Any) -> None:
    """Input and output names must equal the spec's, in order; else :class:`ParityError`."""
    for kind, want, have in (
        ("inputs", entry.spec.input_names, [i.name for i in session.get_inputs()]),
        ("outputs", entry.spec.output_names, [o.name for o in session.get_outputs()]),
    ):
        if have != want:
            raise ParityError(
                f"{entry.file}: {kind} are {have}; the spec says {want} (missing "
                f"{sorted(set(want) - set(have))}, unexpected {sorted(set(have) - set(want))})")


def validate_graph(manifest: ExportManifest, entry: GraphEntry, resae: ReSAE, *,
                   tolerance: Tolerance, probes: tuple[str, ...] = PROBES,
                   tokens: dict[str, int] | None = None, seed: int = 0,
                   real_acts: dict[int, torch.Tensor] | None = None) -> list[OutputCheck]:
    """Check one graph file on every probe, and on ``real_acts`` when given (names first)."""
    session = _session(manifest.path(entry))
    check_names(entry, session)
    dtypes = {t.name: t.dtype for t in entry.spec.inputs}
    checks: list[OutputCheck] = []
    runs: list[tuple[str, dict[int, torch.Tensor] | None]] = [(p, None) for p in probes]
    if real_acts is not None:
        runs.append(("real", real_acts))
    for n, (probe, acts) in enumerate(runs):
        count = (tokens or PROBE_TOKENS).get(probe, 64)
        if entry.spec.name == "encode_layer":
            checks += _check_layer_graph(entry, session, resae, probe, tolerance,
                                         graph_inputs("encode", resae, probe, count,
                                                      seed + 100 * n, acts))
            continue
        feeds = graph_inputs(entry.spec.name, resae, probe, count, seed + 100 * n, acts)
        run_feeds = {k: v.astype(dtypes[k]) for k, v in feeds.items()}
        values = session.run(entry.spec.output_names, run_feeds)
        ours = dict(zip(entry.spec.output_names, values, strict=True))
        checks += compare_outputs(entry.spec.name, entry.spec.precision, probe, resae, feeds,
                                  ours, tolerance)
    return checks


def _check_layer_graph(entry: GraphEntry, session: Any, resae: ReSAE, probe: str,
                       tolerance: Tolerance, feeds: dict[str, np.ndarray]) -> list[OutputCheck]:
    """An ``encode_layer`` graph on the ``encode`` graph's feeds, judged as the ``encode``
    graph's outputs of its layer (the other layers are filled with the oracle's own)."""
    spec = entry.spec
    dtypes = {t.name: t.dtype for t in spec.inputs}
    layer_in = layer_feeds(spec, dictionary_layout(resae), feeds)
    values = session.run(spec.output_names, {k: v.astype(dtypes[k]) for k, v in layer_in.items()})
    ours = {**oracle_outputs("encode", resae, feeds),
            **layer_outputs(spec, dict(zip(spec.output_names, values, strict=True)))}
    mine = {f"{name}_{spec.layer}" for name in spec.output_names}
    return [replace(c, graph=spec.name) for c in
            compare_outputs("encode", spec.precision, probe, resae, feeds, ours, tolerance)
            if c.output in mine]


def validate_export(export_dir: Path, resae: ReSAE | None = None, *,
                    tolerances: dict[str, Tolerance] | None = None,
                    probes: tuple[str, ...] = PROBES, tokens: dict[str, int] | None = None,
                    seed: int = 0, real_acts: dict[int, torch.Tensor] | None = None,
                    record: bool = True, strict: bool = True) -> ValidationReport:
    """Validate every graph of an export folder against ``resae`` (default: its artifact).

    ``real_acts`` (``{layer: (N, d_model)}``, e.g. captured held-out activations) adds a
    ``real`` probe to the synthetic ones.

    Records the report in ``export_manifest.json`` (``record``) and raises
    :class:`ParityError` naming the worst difference when a check fails (``strict``).
    """
    manifest = read_export_manifest(export_dir)
    if resae is None:
        source = manifest.artifact.get("path")
        if not source:
            raise ExportError(f"{export_dir}: the manifest names no source artifact; pass the "
                              "ReSAE to validate against")
        resae, _ = load_artifact(Path(source))
    resae = as_float32(resae)
    if (fingerprint := dictionary_fingerprint(resae)) != manifest.fingerprint:
        raise ParityError(f"{export_dir}: graphs were exported from dictionary "
                          f"{manifest.fingerprint}, but the ReSAE given is {fingerprint}")
    recorded = {p: Tolerance(**t) for p, t in (manifest.raw.get("tolerances") or {}).items()}
    tolerances = {**DEFAULT_TOLERANCES, **recorded, **(tolerances or {})}
    checks: list[OutputCheck] = []
    for entry in manifest.graphs:
        checks += validate_graph(manifest, entry, resae, tolerance=tolerances[entry.spec.precision],
                                 probes=probes, tokens=tokens, seed=seed, real_acts=real_acts)
    report = ValidationReport(tuple(checks))
    for c in checks:
        logger.debug("%s %s", "ok  " if c.passed else "FAIL", c.describe())
    if record:
        update_manifest(Path(export_dir), "validation", report.to_dict())
    if strict and not report.passed:
        raise ParityError(report.worst().describe())
    return report
