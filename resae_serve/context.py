"""The context a dictionary was trained in, and which served positions lie outside it.

Training reads text in one particular way (:mod:`resae_serve.windows`,
:mod:`resae_serve.capture`): BOS first and its position dropped (``prepend_bos``,
``skip_bos``), and tokens whose block-output norm exceeds ``outlier_norm_ratio`` × the batch
median dropped (massive activations). Serving reads a text as the tokenizer gives it, so two
kinds of positions reach the dictionary that it never saw:

- the **first position** (an attention sink: SmolLM2 adds no BOS, so its first text token
  plays that part), when training skipped its first position;
- **norm outliers**: a token whose block-output norm at a layer exceeds
  ``outlier_norm_ratio × reference_norms[layer]``, where the reference norm is the median token
  norm of that layer on the training activations (what the batch median estimates), so the
  rule applies to one token without a batch. Training dropped a token that was an outlier at
  any dictionary layer; a served record judges the layer it reports.

Every served position is still encoded and reported; :func:`TrainingContext.reasons` says
which are outside, and why (:class:`OutOfDistribution`). Threshold events skip them unless a
request asks for them.

The manifest stores this as ``training_context``. Dictionaries without it (older manifests,
imported SAELens / sparsify / Gemma Scope dictionaries) get :meth:`TrainingContext.unknown`:
the first-position rule only (the first position is an attention sink in the models these
dictionaries come from, and their training either drops it or is not known to keep it) and no
norm rule, since their scales say nothing about token norms (imported layers have scale 1.0;
a residual layer's ``σ`` measures the residual, not ``h``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import torch

from resae_serve.errors import ResaeError


class OutOfDistribution(IntEnum):
    """Why a served position lies outside the dictionary's training distribution (the
    ``OutOfDistribution`` enum of the API has the same numbers)."""

    NONE = 0
    """In distribution."""
    FIRST_POSITION = 1
    """The sequence's first position, which training skipped."""
    NORM_OUTLIER = 2
    """Block-output norm above ``outlier_norm_ratio × reference_norms[layer]``."""


class ContextError(ResaeError):
    """A ``training_context`` section holds a value that makes no sense."""


@dataclass(frozen=True)
class TrainingContext:
    """How the training text was read, and the per-token rule derived from it."""

    prepend_bos: bool | None
    """Training put BOS first (``None``: unknown)."""
    skip_bos: bool | None
    """Training dropped the BOS position (``None``: unknown)."""
    outlier_norm_ratio: float | None
    """Tokens above this many times the median norm were dropped (``None``: no rule)."""
    reference_norms: tuple[float, ...] | None
    """Median token norm per dictionary layer on the training activations (``None``:
    unknown, so no norm rule)."""
    source: str = "training"
    """``training`` (measured by the pipeline), ``unknown`` (old manifest), ``imported``."""

    def __post_init__(self) -> None:
        if self.outlier_norm_ratio is not None and not self.outlier_norm_ratio > 1:
            raise ContextError(f"training_context.outlier_norm_ratio={self.outlier_norm_ratio}; "
                               "must be > 1 or null")
        if self.reference_norms is not None and not all(
                np.isfinite(n) and n > 0 for n in self.reference_norms):
            raise ContextError(f"training_context.reference_norms={list(self.reference_norms)}"
                               "; must be finite positive numbers")

    @classmethod
    def unknown(cls, source: str = "unknown") -> TrainingContext:
        """The documented default: first-position rule only (module docstring)."""
        return cls(None, None, None, None, source)

    @property
    def skips_first_position(self) -> bool:
        """Training never saw a text token at a sequence's first position: it put BOS there
        and dropped it, or that is unknown."""
        return self.prepend_bos is None or self.skip_bos is None or bool(
            self.prepend_bos and self.skip_bos)

    def norm_limit(self, i: int) -> float | None:
        """Largest in-distribution norm at dictionary position ``i`` (``None``: no rule)."""
        if self.outlier_norm_ratio is None or self.reference_norms is None:
            return None
        return self.outlier_norm_ratio * self.reference_norms[i]

    def reasons(self, i: int, positions: np.ndarray | Sequence[int],
                norms: np.ndarray | Sequence[float]) -> np.ndarray:
        """(n,) int :class:`OutOfDistribution` codes of tokens at sequence ``positions`` with
        block-output ``norms`` at dictionary position ``i`` (the first position wins)."""
        positions, norms = np.asarray(positions), np.asarray(norms, dtype=np.float64)
        out = np.zeros(len(positions), dtype=np.int64)
        limit = self.norm_limit(i)
        if limit is not None:
            out[norms > limit] = OutOfDistribution.NORM_OUTLIER
        if self.skips_first_position:
            out[positions == 0] = OutOfDistribution.FIRST_POSITION
        return out

    def check_layers(self, n_layers: int, where: str) -> None:
        """Reference norms, when known, must be one per dictionary layer."""
        if self.reference_norms is not None and len(self.reference_norms) != n_layers:
            raise ContextError(f"{where}: training_context.reference_norms has "
                               f"{len(self.reference_norms)} entries for {n_layers} layers")

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the manifest's ``training_context``)."""
        return {"prepend_bos": self.prepend_bos, "skip_bos": self.skip_bos,
                "outlier_norm_ratio": self.outlier_norm_ratio,
                "reference_norms": (None if self.reference_norms is None
                                    else list(self.reference_norms)),
                "source": self.source}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TrainingContext:
        """Inverse of :meth:`to_dict`; ``None`` (no section) is :meth:`unknown`."""
        if data is None:
            return cls.unknown()
        if not isinstance(data, Mapping):
            raise ContextError(f"training_context is {data!r}; expected an object")

        def flag(name: str) -> bool | None:
            value = data.get(name)
            if value is not None and not isinstance(value, bool):
                raise ContextError(f"training_context.{name}={value!r}; expected true, false "
                                   "or null")
            return value

        ratio, norms = data.get("outlier_norm_ratio"), data.get("reference_norms")
        try:
            return cls(flag("prepend_bos"), flag("skip_bos"),
                       None if ratio is None else float(ratio),
                       None if norms is None else tuple(float(n) for n in norms),
                       str(data.get("source", "training")))
        except (TypeError, ValueError) as exc:
            raise ContextError(f"training_context is invalid: {exc}") from exc


def median_norms(norms: torch.Tensor) -> tuple[float, ...]:
    """Reference norms: the median per layer of token norms ``(N, n_layers)`` of training
    activations (``acts.norm(dim=-1)`` of ``(N, n_layers, d)``)."""
    return tuple(float(m) for m in norms.float().median(dim=0).values.tolist())
