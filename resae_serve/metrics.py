"""Streaming reconstruction metrics (SAEBench definitions, docs/ARCHITECTURE.md §2).

FVE = 1 − E‖x − x̂‖² / (E‖x‖² − ‖E x‖²), pooled over all tokens seen; accumulated in float64
so that a stream of batches gives the same number as one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ReconstructionStats:
    """Running sums for FVE, MSE, cosine, L0 and which latents fired."""

    d_sae: int
    n: int = 0
    sum_x: torch.Tensor | None = None
    sum_sq_x: float = 0.0
    sum_sq_err: float = 0.0
    sum_cos: float = 0.0
    sum_l0: float = 0.0
    fired_count: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.fired_count = torch.zeros(self.d_sae, dtype=torch.float64)

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, active: torch.Tensor) -> None:
        """Add a batch: ``x, x_hat (N, d)``, ``active (N, d_sae)`` bool (latent fired)."""
        x64, err = x.double(), (x - x_hat).double()
        self.sum_x = x64.sum(0) if self.sum_x is None else self.sum_x + x64.sum(0)
        self.sum_sq_x += float(x64.pow(2).sum())
        self.sum_sq_err += float(err.pow(2).sum())
        self.sum_cos += float(torch.nn.functional.cosine_similarity(x64, x_hat.double(),
                                                                    dim=-1).sum())
        self.sum_l0 += float(active.sum())
        self.fired_count += active.sum(0).double().cpu()
        self.n += len(x)

    @property
    def fve(self) -> float:
        """Fraction of variance explained, pooled."""
        assert self.sum_x is not None, "no data"
        total = self.sum_sq_x - float(self.sum_x.pow(2).sum()) / self.n
        return 1.0 - self.sum_sq_err / total

    @property
    def mse(self) -> float:
        """Mean squared error per element."""
        assert self.sum_x is not None, "no data"
        return self.sum_sq_err / (self.n * len(self.sum_x))

    def summary(self) -> dict[str, float]:
        """All metrics as plain floats."""
        density = self.fired_count / max(self.n, 1)
        return {
            "fve": self.fve,
            "mse": self.mse,
            "cosine": self.sum_cos / self.n,
            "l0": self.sum_l0 / self.n,
            "dead_fraction": float((self.fired_count == 0).double().mean()),
            "dense_fraction": float((density > 0.1).double().mean()),
            "n_tokens": float(self.n),
        }


def batch_fve(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """FVE of one batch (for progress bars)."""
    centred = (x - x.mean(0)).pow(2).sum()
    return float(1 - (x - x_hat).pow(2).sum() / centred.clamp_min(1e-12))
