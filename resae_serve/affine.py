"""Streaming ridge fit of the affine maps ``h_m ≈ A_m h_{m-1} + c_m`` between selected layers.

One pass over the activations fills :class:`AffineStats` (float64 sufficient statistics of the
pairs ``(x, y) = (h_{m-1}, h_m)``); :func:`fit_affine` then solves the ridge problem in closed
form and picks λ on held-out tokens, also from statistics alone. Nothing bigger than the
statistics (``d×d`` float64) is ever materialised, so ``d`` up to 8192 fits in memory.

Statistics are kept centred (means plus co-moments, merged with Chan et al.'s pairwise
update) rather than as raw ``XᵀX``: activations carry large per-dimension means, and centring
after the fact would cancel most of the float64 digits.

Ridge, with ``C_xx = Σ (x-x̄)(x-x̄)ᵀ / n`` and ``C_xy = Σ (x-x̄)(y-ȳ)ᵀ / n`` on the train set::

    W(λ) = (C_xx + λ I)⁻¹ C_xy = V diag(1/(e+λ)) Vᵀ C_xy      (C_xx = V diag(e) Vᵀ)
    A = Wᵀ,   c = ȳ - A x̄

Held-out error of any ``(A, c)`` from the held-out statistics (means ``x̄_h, ȳ_h``, centred
co-moments ``S_xx, S_xy``, ``S_yy``), with ``b = ȳ_h - A x̄_h - c``::

    SSE = tr S_yy - 2 tr(A S_xy) + tr(A S_xx Aᵀ) + n_h ‖b‖²

In the eigenbasis of ``C_xx`` every term is a cheap function of λ, so one ``eigh`` serves the
whole grid.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from resae_serve.errors import ResaeError

logger = logging.getLogger(__name__)

DEFAULT_REL_LAMBDAS: tuple[float, ...] = (0.0, *(10.0**k for k in range(-8, 0)))
"""λ grid relative to ``tr(C_xx)/d_in``: 0, 1e-8, 1e-7, …, 1e-1."""

TIE_RTOL = 1e-12
"""A larger λ wins only if its held-out MSE is within this relative margin of the best."""

_CHUNK_ELEMENTS = 1 << 24  # rows per float64 cast chunk: ~128 MiB per operand


class AffineFitError(ResaeError):
    """Affine statistics or fit were given inconsistent, non-finite or too little data."""


def _check_rows(name: str, t: Tensor, d: int) -> None:
    if t.ndim != 2 or t.shape[1] != d:
        raise AffineFitError(f"{name} has shape {tuple(t.shape)}; expected (N, {d})")
    if not t.is_floating_point():
        raise AffineFitError(f"{name} has dtype {t.dtype}; expected a floating point dtype")


def _check_finite(name: str, t: Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise AffineFitError(f"{name} contains NaN or Inf values; activations must be finite")


class AffineStats:
    """Float64 sufficient statistics of pairs ``(x, y)``, ``x ∈ R^{d_in}``, ``y ∈ R^{d_out}``.

    Attributes (all float64 on ``device``):
        mean_x: (d_in,) running mean x̄.
        mean_y: (d_out,) running mean ȳ.
        sxx: (d_in, d_in) centred co-moment ``Σ (x-x̄)(x-x̄)ᵀ``.
        sxy: (d_in, d_out) centred co-moment ``Σ (x-x̄)(y-ȳ)ᵀ``.
        syy: (d_out,) centred sum of squares per dimension ``Σ (y-ȳ)²``.

    Merging two sets A, B (n = n_A + n_B, δ = mean_B - mean_A)::

        S = S_A + S_B + δ_x δ_yᵀ · n_A n_B / n,   mean = mean_A + δ · n_B / n
    """

    def __init__(self, d_in: int, d_out: int, device: torch.device | str = "cpu") -> None:
        if d_in < 1 or d_out < 1:
            raise AffineFitError(f"d_in={d_in}, d_out={d_out}; both must be positive")
        self.d_in = d_in
        self.d_out = d_out
        self.device = torch.device(device)
        self._n = 0
        self.mean_x = self._zeros(d_in)  # (d_in,)
        self.mean_y = self._zeros(d_out)  # (d_out,)
        self.sxx = self._zeros(d_in, d_in)  # (d_in, d_in)
        self.sxy = self._zeros(d_in, d_out)  # (d_in, d_out)
        self.syy = self._zeros(d_out)  # (d_out,)

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(*shape, dtype=torch.float64, device=self.device)

    @property
    def n(self) -> int:
        """Number of pairs accumulated."""
        return self._n

    @property
    def sum_x(self) -> Tensor:
        """(d_in,) ``Σ x`` in float64."""
        return self.mean_x * self._n

    @property
    def sum_y(self) -> Tensor:
        """(d_out,) ``Σ y`` in float64."""
        return self.mean_y * self._n

    @property
    def total_ss(self) -> float:
        """``Σ ‖y - ȳ‖²`` pooled over dimensions (the SST of R²)."""
        return float(self.syy.sum())

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add pairs: ``x`` (N, d_in) and ``y`` (N, d_out), any float dtype, any device."""
        _check_rows("x", x, self.d_in)
        _check_rows("y", y, self.d_out)
        if x.shape[0] != y.shape[0]:
            raise AffineFitError(
                f"x has {x.shape[0]} rows but y has {y.shape[0]}; expected the same tokens"
            )
        _check_finite("x", x)
        _check_finite("y", y)
        rows = max(1, _CHUNK_ELEMENTS // max(self.d_in, self.d_out))
        for start in range(0, x.shape[0], rows):
            xc = x[start : start + rows].to(self.device, torch.float64)  # (n_b, d_in)
            yc = y[start : start + rows].to(self.device, torch.float64)  # (n_b, d_out)
            self._add_chunk(xc, yc)

    def _add_chunk(self, x: Tensor, y: Tensor) -> None:
        n_b = x.shape[0]
        mean_xb, mean_yb = x.mean(0), y.mean(0)  # (d_in,), (d_out,)
        x = x - mean_xb
        y = y - mean_yb
        n_a, n = self._n, self._n + n_b
        dx, dy = mean_xb - self.mean_x, mean_yb - self.mean_y
        w = n_a * n_b / n
        self.sxx.addmm_(x.T, x).addr_(dx, dx, alpha=w)
        self.sxy.addmm_(x.T, y).addr_(dx, dy, alpha=w)
        self.syy.add_(y.square().sum(0)).add_(dy.square(), alpha=w)
        self.mean_x.add_(dx, alpha=n_b / n)
        self.mean_y.add_(dy, alpha=n_b / n)
        self._n = n

    def merge(self, other: AffineStats) -> AffineStats:
        """A new statistics object holding the pairs of both ``self`` and ``other``."""
        if (other.d_in, other.d_out) != (self.d_in, self.d_out):
            raise AffineFitError(
                f"cannot merge stats of (d_in, d_out)=({other.d_in}, {other.d_out}) into "
                f"({self.d_in}, {self.d_out}); expected equal dimensions"
            )
        out = AffineStats(self.d_in, self.d_out, self.device)
        n_a, n_b = self._n, other.n
        out._n = n = n_a + n_b
        if n == 0:
            return out
        mx_b, my_b = other.mean_x.to(self.device), other.mean_y.to(self.device)
        dx, dy = mx_b - self.mean_x, my_b - self.mean_y
        w = n_a * n_b / n
        torch.add(self.sxx, other.sxx.to(self.device), out=out.sxx).addr_(dx, dx, alpha=w)
        torch.add(self.sxy, other.sxy.to(self.device), out=out.sxy).addr_(dx, dy, alpha=w)
        torch.add(self.syy, other.syy.to(self.device), out=out.syy).add_(dy.square(), alpha=w)
        torch.add(self.mean_x, dx, alpha=n_b / n, out=out.mean_x)
        torch.add(self.mean_y, dy, alpha=n_b / n, out=out.mean_y)
        return out


class AffineFit(NamedTuple):
    """Result of :func:`fit_affine`: the map ``y ≈ A x + c`` and how well it holds out."""

    A: Tensor
    """(d_out, d_in) float32 linear part."""
    c: Tensor
    """(d_out,) float32 offset ``ȳ - A x̄`` (train means)."""
    lam: float
    """Chosen ridge strength, absolute, as added to the centred ``XᵀX/n``."""
    r2: float
    """Held-out R² = 1 - SSE/SST, SST around the held-out mean of y, pooled over dims."""
    sigma: float
    """Held-out residual RMS per element, ``sqrt(SSE / (n_h · d_out))``."""
    lam_grid: tuple[float, ...]
    """Absolute λ values tried, in grid order."""
    heldout_mse: tuple[float, ...]
    """Held-out mean squared error per element for each value of ``lam_grid``."""


def _check_fit_inputs(train: AffineStats, heldout: AffineStats, rel: Sequence[float]) -> None:
    if train.n <= 1:
        raise AffineFitError(f"train stats hold n={train.n} tokens; need at least 2")
    if heldout.n < 1:
        raise AffineFitError(f"held-out stats hold n={heldout.n} tokens; need at least 1")
    if (heldout.d_in, heldout.d_out) != (train.d_in, train.d_out):
        raise AffineFitError(
            f"held-out stats have (d_in, d_out)=({heldout.d_in}, {heldout.d_out}); expected "
            f"({train.d_in}, {train.d_out}) as in the train stats"
        )
    if len(rel) == 0:
        raise AffineFitError("rel_lambdas is empty; give at least one value ≥ 0")
    bad = [r for r in rel if not (math.isfinite(r) and r >= 0)]
    if bad:
        raise AffineFitError(f"rel_lambdas contains {bad}; every value must be finite and ≥ 0")


def _inverse_spectrum(e: Tensor, lam: float, tol: float) -> Tensor:
    """``1/(e+λ)``, with 0 where ``e+λ`` is at round-off level (min-norm solution at λ=0)."""
    shifted = e + lam
    return torch.where(shifted > tol, 1.0 / shifted.clamp_min(tol), torch.zeros_like(e))


def fit_affine(
    train: AffineStats,
    heldout: AffineStats,
    *,
    rel_lambdas: Sequence[float] = DEFAULT_REL_LAMBDAS,
) -> AffineFit:
    """Ridge-fit ``y ≈ A x + c`` on ``train``, choosing λ by held-out MSE on ``heldout``.

    ``λ = rel · tr(C_xx)/d_in`` for each ``rel`` in ``rel_lambdas``. ``C_xx`` is
    eigendecomposed once in float64; each λ then costs O(d²). The λ with the smallest held-out
    MSE wins; a larger λ wins a tie within ``TIE_RTOL``. At λ = 0 a singular ``C_xx`` gives
    the minimum-norm least-squares solution.
    """
    _check_fit_inputs(train, heldout, rel_lambdas)
    dev = train.device
    n_t, n_h, d_in, d_out = train.n, heldout.n, train.d_in, train.d_out

    evals, V = torch.linalg.eigh(train.sxx)  # (d_in,), (d_in, d_in): S_xx = V diag Vᵀ
    e = evals.clamp_min(0.0) / n_t  # eigenvalues of C_xx
    tol = float(e.max()) * d_in * torch.finfo(torch.float64).eps
    scale = float(train.sxx.diagonal().sum()) / n_t / d_in  # tr(C_xx) / d_in
    lam_grid = tuple(float(r) * scale for r in rel_lambdas)

    P = (V.T @ train.sxy).div_(n_t)  # (d_in, d_out) = Vᵀ C_xy
    # Held-out terms in the eigenbasis: tr(A S_xy) = Σ_i D_i g_i, tr(A S_xx Aᵀ) = Dᵀ G D.
    S_h = V.T @ heldout.sxx.to(dev) @ V  # (d_in, d_in)
    G = S_h.mul_(P @ P.T)  # (d_in, d_in), reuses S_h's memory
    g = (P * (V.T @ heldout.sxy.to(dev))).sum(1)  # (d_in,)
    u = V.T @ (heldout.mean_x.to(dev) - train.mean_x)  # (d_in,)
    dy = heldout.mean_y.to(dev) - train.mean_y  # (d_out,)
    sst = heldout.total_ss

    sse_raw: list[float] = []
    for lam in lam_grid:
        D = _inverse_spectrum(e, lam, tol)  # (d_in,)
        b = dy - P.T @ (D * u)  # (d_out,) held-out offset error ȳ_h - A x̄_h - c
        sse = sst - 2.0 * float(D @ g) + float(D @ (G @ D)) + n_h * float(b @ b)
        sse_raw.append(sse)
    del G, S_h

    best = min(sse_raw)
    # The statistics cancel at round-off level, so a near-zero SSE can come out negative:
    # choose on the raw values, report them clamped at 0.
    near = [i for i, s in enumerate(sse_raw) if s <= best + TIE_RTOL * abs(best)]
    chosen = max(near, key=lambda i: lam_grid[i])
    lam = lam_grid[chosen]
    sse = max(sse_raw[chosen], 0.0)

    D = _inverse_spectrum(e, lam, tol)
    A64 = (V @ (D[:, None] * P)).T  # (d_out, d_in)
    c64 = train.mean_y - A64 @ train.mean_x  # (d_out,)
    if sst > 0:
        r2 = 1.0 - sse / sst
    else:
        logger.warning("held-out y is constant (SST=0); R² is undefined and reported as NaN")
        r2 = math.nan
    sigma = math.sqrt(sse / (n_h * d_out))
    mse = tuple(max(s, 0.0) / (n_h * d_out) for s in sse_raw)
    logger.info(
        "affine fit %d→%d on %d train / %d held-out tokens: λ=%.3g (rel %.3g), R²=%.4f, σ=%.4g",
        d_in, d_out, n_t, n_h, lam, rel_lambdas[chosen], r2, sigma,
    )
    return AffineFit(
        A=A64.to(torch.float32).contiguous(),
        c=c64.to(torch.float32),
        lam=lam,
        r2=r2,
        sigma=sigma,
        lam_grid=lam_grid,
        heldout_mse=mse,
    )


class ScaleStats:
    """Streaming float64 count and ``Σ ‖x‖²``, giving the per-element RMS ``sqrt(E‖x‖²/d)``.

    Used for ``s_0``, the scale that normalises ``h_0`` before ``SAE_0``. ``d`` is taken from
    the first update when not given.
    """

    def __init__(self, d: int | None = None) -> None:
        if d is not None and d < 1:
            raise AffineFitError(f"d={d}; must be positive")
        self.d = d
        self._n = 0
        self.sum_sq = 0.0

    @property
    def n(self) -> int:
        """Number of vectors accumulated."""
        return self._n

    def update(self, x: Tensor) -> None:
        """Add vectors ``x`` (N, d), any float dtype and device."""
        if x.ndim != 2:
            raise AffineFitError(f"x has shape {tuple(x.shape)}; expected (N, d)")
        _check_rows("x", x, self.d if self.d is not None else x.shape[1])
        _check_finite("x", x)
        self.d = x.shape[1]
        rows = max(1, _CHUNK_ELEMENTS // self.d)
        for start in range(0, x.shape[0], rows):
            self.sum_sq += float(x[start : start + rows].to(torch.float64).square().sum())
        self._n += x.shape[0]

    def merge(self, other: ScaleStats) -> ScaleStats:
        """A new object holding the vectors of both ``self`` and ``other``."""
        if self.d is not None and other.d is not None and self.d != other.d:
            raise AffineFitError(f"cannot merge scale stats of d={other.d} into d={self.d}")
        out = ScaleStats(self.d if self.d is not None else other.d)
        out._n = self._n + other.n
        out.sum_sq = self.sum_sq + other.sum_sq
        return out

    @property
    def rms(self) -> float:
        """Per-element RMS ``sqrt(Σ‖x‖² / (n·d))``."""
        if self._n == 0 or self.d is None:
            raise AffineFitError("scale stats hold n=0 vectors; update with activations first")
        return math.sqrt(self.sum_sq / (self._n * self.d))
