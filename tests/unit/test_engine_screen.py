"""The bfloat16 screen of edited TopK features against the float32 encode."""

from __future__ import annotations

import pytest
import torch

from resae_serve.engine.gemm import EncoderGemm
from resae_serve.engine.screen import TopKScreen
from resae_serve.engine.tables import activate, codes_at
from resae_serve.saes import SAEConfig, build_sae
from resae_serve.saes.base import SAE

D_IN, D_SAE, K, N = 96, 768, 16, 256


def _screen(seed: int = 0) -> tuple[TopKScreen, EncoderGemm, SAE]:
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(architecture="topk", d_in=D_IN, d_sae=D_SAE, k=K))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    gemm = EncoderGemm(sae)
    screen = TopKScreen.for_sae(sae, gemm)
    if screen is None:
        pytest.skip("no oneDNN bfloat16 matmul on this CPU")
    return screen, gemm, sae


def _exact(sae: SAE, gemm: EncoderGemm, u: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return codes_at(activate(sae, gemm(u)), feature)


def test_screened_codes_equal_the_float32_encode_also_at_the_threshold() -> None:
    screen, gemm, sae = _screen()
    u = 3 * torch.randn(N, D_IN)
    with torch.no_grad():
        ranks = gemm(u).argsort(dim=1, descending=True)                  # exact order
    feature = torch.randint(0, D_SAE, (N, 4))
    feature[:, 0] = ranks[:, 0]                                          # fires
    half = N // 2                       # first half: features right at the k-th value
    feature[:half, 1], feature[:half, 2] = ranks[:half, K - 1], ranks[:half, K]
    got = screen.codes_at(u, feature)
    torch.testing.assert_close(got, _exact(sae, gemm, u, feature), atol=1e-5, rtol=1e-6)
    assert (got[:, 0] > 0).all()
    assert screen.reads == 4 * N
    # the features at the threshold are resolved exactly; the screen decides most others
    assert half <= screen.reads_resolved_exactly < half * 2 + N // 4


def test_the_bound_holds_for_every_pre_activation() -> None:
    screen, gemm, _ = _screen(1)
    for scale in (0.1, 3.0, 100.0):
        u = scale * torch.randn(N, D_IN)
        with torch.no_grad():
            exact = gemm(u)
            approx = screen._ops.onednn_mm(screen._handler, u.bfloat16(), None).float() \
                + screen.bias
        bound = screen.bound_scale * u.norm(dim=1, keepdim=True) + screen.bound_floor
        assert ((approx - exact).abs() <= bound).all()
        assert (approx - exact).abs().max() > 0.01 * bound.min()          # not vacuous
