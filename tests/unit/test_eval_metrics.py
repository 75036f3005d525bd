"""Reconstruction and redundancy metrics against hand-computed or independent values."""

from __future__ import annotations

import pytest
import torch

from resae_serve.evaluation.reconstruction import evaluate_layers
from resae_serve.evaluation.redundancy import max_abs_cosine, redundancy
from resae_serve.pipeline import evaluate_reconstruction
from resae_serve.resae import ReSAE
from resae_serve.saes import SAEConfig, build_sae
from tests.unit.test_eval_support import D, perfect_dictionary, random_dictionary

LAYERS = (1, 3)


def _acts(n: int = 400, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h0 = 1.0 + torch.randn(n, D, generator=g)
    h1 = h0 @ (torch.eye(D) + 0.3 * torch.randn(D, D, generator=g)).T + 0.5 * torch.randn(
        n, D, generator=g)
    return torch.stack([h0, h1], dim=1)                                      # (n, 2, D)


def _chunks(acts: torch.Tensor, size: int = 64) -> list[torch.Tensor]:
    return list(acts.split(size))


def test_perfect_reconstruction_scores_one() -> None:
    out = evaluate_layers(perfect_dictionary(LAYERS, "resae"), _chunks(_acts()))
    for row in out.layers:
        assert row.fve == pytest.approx(1, abs=1e-6)
        assert row.input_fve == pytest.approx(1, abs=1e-6)
        assert row.mse == pytest.approx(0, abs=1e-8)
        assert row.cosine == pytest.approx(1, abs=1e-6)
        assert row.shrinkage == pytest.approx(1, abs=1e-5)
        assert row.n_tokens == 400
    assert out.layers[0].residual_fve is None
    assert out.layers[1].residual_fve == pytest.approx(1, abs=1e-6)
    torch.testing.assert_close(out.means[1], _acts()[:, 0].mean(0))


def test_matches_the_training_pipeline_evaluation() -> None:
    """An independent implementation (pipeline.evaluate_reconstruction) gives the same numbers;
    batching does not change them."""
    acts = _acts()
    for mode in ("resae", "layerwise"):
        resae = random_dictionary(LAYERS, mode, seed=3)  # type: ignore[arg-type]
        ours = evaluate_layers(resae, _chunks(acts, 50), batch_size=128)
        theirs = evaluate_reconstruction(resae, iter(_chunks(acts, 400)))
        for row in ours.layers:
            ref = theirs[row.layer]
            for key in ("fve", "mse", "cosine", "l0", "dead_fraction", "dense_fraction",
                        "input_fve"):
                assert getattr(row, key) == pytest.approx(ref[key], rel=1e-6, abs=1e-9), key
        if mode == "resae":   # residual FVE = SAE-input FVE (FVE is scale invariant)
            assert ours.layers[1].residual_fve == pytest.approx(ours.layers[1].input_fve)
            # local FVE: the residual error σ(D(z) − u) against h's variance, by hand
            h1, h3 = acts[:, 0], acts[:, 1]
            u = resae.sae_input(1, h3, h1)
            err = resae.scales[1] * (resae.saes[1].decode(resae.saes[1].encode(u)) - u)
            total = (h3.double() - h3.double().mean(0)).pow(2).sum()
            local = 1 - float(err.detach().double().pow(2).sum() / total)
            assert ours.layers[1].local_fve == pytest.approx(local, rel=1e-5)
            assert ours.layers[0].local_fve is None
        else:
            assert all(row.local_fve is None for row in ours.layers)


def test_half_reconstruction_by_hand() -> None:
    """x̂ = x / 2: FVE = 1 − ¼Σ‖x‖² / (Σ‖x‖² − n‖x̄‖²), shrinkage ½, cosine 1; on positive
    inputs half the latents (the −x ones) are dead and the +x ones are dense."""
    resae = perfect_dictionary((1,), "layerwise", scales=[1.0])
    with torch.no_grad():
        resae.saes[0].W_dec.mul_(0.5)
    x = torch.rand(300, D) + 0.1
    row = evaluate_layers(resae, [x[:, None]]).layers[0]
    total = float(x.double().pow(2).sum())
    centred = total - 300 * float(x.double().mean(0).pow(2).sum())
    assert row.fve == pytest.approx(1 - 0.25 * total / centred, rel=1e-6)
    assert row.mse == pytest.approx(0.25 * total / (300 * D), rel=1e-6)
    assert row.shrinkage == pytest.approx(0.5, rel=1e-6)
    assert row.cosine == pytest.approx(1, abs=1e-6)
    assert row.l0 == pytest.approx(D)
    assert row.dead_fraction == pytest.approx(0.5)
    assert row.dense_fraction == pytest.approx(0.5)


def test_layerwise_residual_fve_with_borrowed_maps() -> None:
    acts = _acts()
    resae = random_dictionary(LAYERS, "resae", seed=1)
    layerwise = random_dictionary(LAYERS, "layerwise", seed=2)
    assert evaluate_layers(layerwise, [acts]).layers[1].residual_fve is None
    row = evaluate_layers(layerwise, [acts], affine_from=resae).layers[1]
    with torch.no_grad():
        x_hat = layerwise({1: acts[:, 0], 3: acts[:, 1]})[3]
    r = (acts[:, 1] - resae.predict(1, acts[:, 0])).double()
    err = float((acts[:, 1] - x_hat).double().pow(2).sum())
    expected = 1 - err / float((r - r.mean(0)).pow(2).sum())
    assert row.residual_fve == pytest.approx(expected, rel=1e-5)


def _layerwise_from_rows(rows: list[torch.Tensor]) -> ReSAE:
    saes = []
    for W_dec in rows:
        sae = build_sae(SAEConfig(architecture="topk", d_in=W_dec.shape[1],
                                  d_sae=W_dec.shape[0], k=1))
        with torch.no_grad():
            sae.W_dec.copy_(W_dec)
        saes.append(sae)
    return ReSAE(tuple(range(len(rows))), saes, [1.0] * len(rows), mode="layerwise")


def test_redundancy_by_hand() -> None:
    """2-d example: previous rows e₀, e₁·(−1); current rows at 60° to e₀ and along e₀+e₁."""
    prev = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    s = 3 ** 0.5 / 2
    current = torch.tensor([[0.5, s], [2 ** -0.5, 2 ** -0.5]])
    torch.testing.assert_close(max_abs_cosine(current, prev), torch.tensor([s, 2 ** -0.5]))
    (row,) = redundancy(_layerwise_from_rows([prev, current]))
    assert row.mapped is None
    fractions = row.fractions()
    assert fractions["raw>0.7"] == 1.0 and fractions["raw>0.9"] == 0.0
    assert fractions["mapped>0.7"] is None


def test_redundancy_mapped_by_affine() -> None:
    """Rows equal to A · (previous rows) are fully redundant after mapping, not before."""
    resae = random_dictionary(LAYERS, "resae", d_sae=16, seed=4)
    A, _ = resae.affine_map(1)
    with torch.no_grad():
        resae.saes[1].W_dec.copy_(resae.saes[0].W_dec @ A.T)
    (row,) = redundancy(resae)
    torch.testing.assert_close(row.mapped, torch.ones(16), atol=1e-5, rtol=0)
    assert float(row.raw.mean()) < 0.99
    same = random_dictionary(LAYERS, "layerwise", d_sae=16, seed=4)
    with torch.no_grad():
        same.saes[1].W_dec.copy_(-same.saes[0].W_dec)
    (row,) = redundancy(same, affine_from=resae)
    torch.testing.assert_close(row.raw, torch.ones(16), atol=1e-5, rtol=0)
    assert row.fractions()["raw>0.9"] == 1.0 and row.mapped is not None
    with pytest.raises(ValueError, match="affine_from"):
        redundancy(same, affine_from=same)
