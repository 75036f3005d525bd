"""Streaming ridge fit of affine maps: exact recovery, λ choice, streaming = batch, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from resae_serve.affine import (
    DEFAULT_REL_LAMBDAS,
    AffineFitError,
    AffineStats,
    ScaleStats,
    fit_affine,
)

STAT_FIELDS = ("mean_x", "mean_y", "sxx", "sxy", "syy")


def _stats(x: Tensor, y: Tensor, chunk: int | None = None) -> AffineStats:
    stats = AffineStats(x.shape[1], y.shape[1])
    step = chunk or len(x)
    for start in range(0, len(x), step):
        stats.update(x[start : start + step], y[start : start + step])
    return stats


def _noisy_pair(
    n: int, d_in: int, d_out: int, noise: float, seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / math.sqrt(d_in)
    c = torch.randn(d_out, generator=g, dtype=torch.float64)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) * 2.0 + 3.0  # (n, d_in)
    y = x @ A.T + c + noise * torch.randn(n, d_out, generator=g, dtype=torch.float64)
    return x, y, A, c


def _assert_same_stats(a: AffineStats, b: AffineStats, rtol: float = 1e-10) -> None:
    assert a.n == b.n
    for name in STAT_FIELDS:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=rtol, atol=rtol)


def test_planted_map_is_recovered() -> None:
    x, y, A, c = _noisy_pair(5000, 24, 16, noise=0.0, seed=0)
    train = _stats(x[:4000], y[:4000], chunk=500)
    heldout = _stats(x[4000:], y[4000:], chunk=500)
    fit = fit_affine(train, heldout)
    assert fit.A.shape == (16, 24) and fit.A.dtype == torch.float32
    assert fit.c.shape == (16,) and fit.c.dtype == torch.float32
    rel_a = (fit.A.double() - A).norm() / A.norm()
    rel_c = (fit.c.double() - c).norm() / c.norm()
    assert rel_a <= 1e-6 and rel_c <= 1e-6, (rel_a, rel_c)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)
    assert fit.lam <= 1e-7 * float(train.sxx.diagonal().sum()) / train.n / 24


def test_lambda_selection_shrinks_when_data_is_scarce() -> None:
    x, y, _, _ = _noisy_pair(60 + 3000, 40, 8, noise=1.0, seed=1)
    train, heldout = _stats(x[:60], y[:60]), _stats(x[60:], y[60:])
    fit = fit_affine(train, heldout)
    assert len(fit.heldout_mse) == len(fit.lam_grid) == len(DEFAULT_REL_LAMBDAS)
    assert fit.lam_grid[0] == 0.0
    assert fit.lam > 0
    chosen = fit.lam_grid.index(fit.lam)
    assert fit.heldout_mse[chosen] <= fit.heldout_mse[0]
    assert fit.heldout_mse[chosen] == min(fit.heldout_mse)


def test_ridge_matches_closed_form_and_heldout_mse_is_direct() -> None:
    x, y, _, _ = _noisy_pair(300 + 200, 12, 5, noise=0.5, seed=2)
    xt, yt, xh, yh = x[:300], y[:300], x[300:], y[300:]
    train, heldout = _stats(xt, yt, chunk=64), _stats(xh, yh, chunk=64)
    fit = fit_affine(train, heldout, rel_lambdas=(0.0, 1e-2, 1.0))
    xc, yc = xt - xt.mean(0), yt - yt.mean(0)
    for lam, mse in zip(fit.lam_grid, fit.heldout_mse, strict=True):
        W = torch.linalg.solve(xc.T @ xc / 300 + lam * torch.eye(12, dtype=torch.float64),
                               xc.T @ yc / 300)  # (d_in, d_out)
        pred = xh @ W + (yt.mean(0) - xt.mean(0) @ W)
        assert mse == pytest.approx(float((yh - pred).square().mean()), rel=1e-9)


def test_sigma_and_r2_equal_direct_computation() -> None:
    x, y, _, _ = _noisy_pair(800 + 400, 10, 6, noise=0.3, seed=3)
    train, heldout = _stats(x[:800], y[:800], chunk=100), _stats(x[800:], y[800:], chunk=100)
    fit = fit_affine(train, heldout)
    resid = y[800:] - (x[800:] @ fit.A.double().T + fit.c.double())  # (400, 6)
    sigma = float(resid.square().mean().sqrt())
    sst = float((y[800:] - y[800:].mean(0)).square().sum())
    r2 = 1.0 - float(resid.square().sum()) / sst
    assert fit.sigma == pytest.approx(sigma, rel=1e-6)
    assert fit.r2 == pytest.approx(r2, rel=1e-6)
    assert 0.5 < fit.r2 < 1.0


def test_streaming_equals_batch_and_merge_equals_whole() -> None:
    x, y, _, _ = _noisy_pair(1000, 9, 7, noise=0.1, seed=4)
    whole = _stats(x, y)
    _assert_same_stats(_stats(x, y, chunk=37), whole)
    merged = _stats(x[:411], y[:411]).merge(_stats(x[411:], y[411:], chunk=100))
    _assert_same_stats(merged, whole)
    _assert_same_stats(AffineStats(9, 7).merge(whole), whole)
    torch.testing.assert_close(whole.sum_x, x.sum(0))
    torch.testing.assert_close(whole.sxx, (x - x.mean(0)).T @ (x - x.mean(0)))


def test_low_precision_inputs_are_accepted() -> None:
    x, y, _, _ = _noisy_pair(200, 6, 4, noise=0.1, seed=5)
    ref = _stats(x.float().double(), y.float().double())
    _assert_same_stats(_stats(x.float(), y.float(), chunk=50), ref, rtol=1e-9)
    assert _stats(x.bfloat16(), y.bfloat16()).n == 200


def test_update_rejects_bad_shapes_and_values() -> None:
    stats = AffineStats(4, 3)
    with pytest.raises(AffineFitError, match=r"x has shape \(5, 6\); expected \(N, 4\)"):
        stats.update(torch.zeros(5, 6), torch.zeros(5, 3))
    with pytest.raises(AffineFitError, match=r"y has shape \(5, 2\); expected \(N, 3\)"):
        stats.update(torch.zeros(5, 4), torch.zeros(5, 2))
    with pytest.raises(AffineFitError, match="x has 5 rows but y has 4"):
        stats.update(torch.zeros(5, 4), torch.zeros(4, 3))
    bad = torch.zeros(5, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(AffineFitError, match="y contains NaN"):
        stats.update(torch.zeros(5, 4), bad)
    assert stats.n == 0
    with pytest.raises(AffineFitError, match="expected equal dimensions"):
        stats.merge(AffineStats(4, 4))


def test_fit_rejects_too_few_tokens_and_bad_grids() -> None:
    x, y, _, _ = _noisy_pair(10, 3, 2, noise=0.1, seed=6)
    one, empty, ok = _stats(x[:1], y[:1]), AffineStats(3, 2), _stats(x, y)
    with pytest.raises(AffineFitError, match="train stats hold n=1 tokens"):
        fit_affine(one, ok)
    with pytest.raises(AffineFitError, match="held-out stats hold n=0 tokens"):
        fit_affine(ok, empty)
    with pytest.raises(AffineFitError, match="rel_lambdas is empty"):
        fit_affine(ok, ok, rel_lambdas=())
    with pytest.raises(AffineFitError, match=r"rel_lambdas contains \[-0.1\]"):
        fit_affine(ok, ok, rel_lambdas=(0.0, -0.1))


def test_singular_covariance_gives_min_norm_solution() -> None:
    x, y, _, _ = _noisy_pair(40, 6, 3, noise=0.0, seed=7)
    x = torch.cat([x, x[:, :1]], dim=1)  # duplicated column: C_xx is singular
    fit = fit_affine(_stats(x[:30], y[:30]), _stats(x[30:], y[30:]), rel_lambdas=(0.0,))
    assert torch.isfinite(fit.A).all()
    torch.testing.assert_close(fit.A[:, 0], fit.A[:, 6])  # min-norm splits the weight evenly
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)


def test_large_d_holds_only_quadratic_statistics() -> None:
    d = 2048
    stats = AffineStats(d, d)
    g = torch.Generator().manual_seed(8)
    stats.update(torch.randn(4, d, generator=g), torch.randn(4, d, generator=g))
    shapes = {name: tuple(getattr(stats, name).shape) for name in STAT_FIELDS}
    assert shapes == {"mean_x": (d,), "mean_y": (d,), "sxx": (d, d), "sxy": (d, d), "syy": (d,)}
    tensors = [v for v in vars(stats).values() if isinstance(v, Tensor)]
    assert all(t.dtype == torch.float64 for t in tensors)
    assert sum(t.numel() for t in tensors) == 2 * d * d + 3 * d
    assert stats.n == 4


def test_scale_stats_rms() -> None:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(300, 16, generator=g) * 3.0 + 1.0
    scale = ScaleStats()
    for part in x.split(70):
        scale.update(part)
    assert scale.n == 300
    assert scale.rms == pytest.approx(float(x.double().square().mean().sqrt()), rel=1e-12)
    half = ScaleStats(16)
    half.update(x[:100])
    rest = ScaleStats()
    rest.update(x[100:])
    assert half.merge(rest).rms == pytest.approx(scale.rms, rel=1e-12)
    with pytest.raises(AffineFitError, match="n=0"):
        _ = ScaleStats().rms
    with pytest.raises(AffineFitError, match=r"expected \(N, 16\)"):
        scale.update(torch.zeros(2, 8))
