"""Configuration of one sparse autoencoder (any architecture), serialisable to ``cfg.json``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

Architecture = Literal["topk", "batchtopk", "jumprelu", "relu"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)


@dataclass(frozen=True, kw_only=True)
class SAEConfig:
    """Hyper-parameters of one SAE; written next to its tensors and enough to rebuild it."""

    architecture: Architecture = "topk"
    """Registry key: ``"topk"`` (default), ``"batchtopk"`` (trained; saved for inference as
    ``"jumprelu"``), ``"jumprelu"`` (inference form) or ``"relu"`` (ReLU with L1 penalty)."""

    d_in: int
    """Width of the (already normalised) input vectors."""

    d_sae: int
    """Number of latents (dictionary size)."""

    k: int = 32
    """Active latents per token for ``topk``; mean active latents per token for ``batchtopk``;
    for ``jumprelu`` and ``relu`` the most codes :meth:`SAE.encode_sparse` returns per token."""

    aux_k: int | None = None
    """Dead latents used by the AuxK loss; ``None`` means ``min(d_in // 2, d_sae)``
    (Gao et al. 2024 use ``d_in / 2``). See :meth:`effective_aux_k`."""

    aux_coefficient: float = 1 / 32
    """Weight of the AuxK loss (``topk`` and ``batchtopk``)."""

    dead_after_tokens: int = 1_000_000
    """A latent that has not fired for this many training tokens counts as dead (for AuxK)."""

    l1_coefficient: float = 5.0
    """Weight of the decoder-norm-weighted L1 penalty (``relu`` only). The penalty is divided
    by ``d_in`` like the MSE, so 5 matches the Anthropic (April 2024) scale."""

    lr: float | None = None
    """Adam learning rate; ``None`` means ``2e-4 / sqrt(d_sae / 2**14)`` (Gao et al. scaling).
    See :meth:`effective_lr`."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            allowed = ", ".join(ARCHITECTURES)
            raise ValueError(f"architecture={self.architecture!r} is unknown; allowed: {allowed}")
        for name in ("d_in", "d_sae", "k", "dead_after_tokens"):
            _require_positive_int(name, getattr(self, name))
        if self.k > self.d_sae:
            raise ValueError(f"k={self.k} exceeds d_sae={self.d_sae}; need 1 <= k <= d_sae")
        if self.aux_k is not None:
            _require_positive_int("aux_k", self.aux_k)
            if self.aux_k > self.d_sae:
                raise ValueError(f"aux_k={self.aux_k} exceeds d_sae={self.d_sae}")
        for name in ("aux_coefficient", "l1_coefficient"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value!r}; must be a finite number >= 0")
        if self.lr is not None and (
            not _is_real(self.lr) or not math.isfinite(self.lr) or self.lr <= 0
        ):
            raise ValueError(f"lr={self.lr!r}; must be a finite number > 0 or None")

    def effective_aux_k(self) -> int:
        """``aux_k``, or its default ``min(max(d_in // 2, 1), d_sae)``."""
        if self.aux_k is not None:
            return self.aux_k
        return min(max(self.d_in // 2, 1), self.d_sae)

    def effective_lr(self) -> float:
        """``lr``, or its default ``2e-4 / sqrt(d_sae / 2**14)``."""
        if self.lr is not None:
            return self.lr
        return 2e-4 / math.sqrt(self.d_sae / 2**14)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; :meth:`from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Rebuild from :meth:`to_dict` output; unknown or missing keys raise ``ValueError``."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(
                f"unknown SAEConfig key(s) {unknown}; allowed: {', '.join(fields)}"
            )
        missing = sorted(
            name
            for name, f in fields.items()
            if name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ValueError(f"SAEConfig is missing required key(s) {missing}")
        return cls(**data)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r}; must be an integer >= 1")
