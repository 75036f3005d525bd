"""Linear-propagation check on a tiny model whose blocks between the layers are identities."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from resae_serve.evaluation.propagation import linear_propagation
from tests.unit.test_eval_support import D, random_dictionary, tiny_windows

LAYERS = (1, 3)


def _identity_blocks(model: PreTrainedModel, blocks: tuple[int, ...]) -> PreTrainedModel:
    with torch.no_grad():
        for b in blocks:
            model.model.layers[b].self_attn.o_proj.weight.zero_()
            model.model.layers[b].mlp.down_proj.weight.zero_()
    return model


def test_identity_stream_propagates_exactly(
    tiny_llama: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    """Blocks 2 and 3 add nothing, so Δh₃ = δ: with A = I the prediction is exact and a
    residual encoder sees no change; with A = 2I the cosine stays 1 and the norm ratio is ½."""
    model = _identity_blocks(tiny_llama, (2, 3))
    win = tiny_windows(tiny_tokenizer, n_windows=2)[0]
    resae = random_dictionary(LAYERS, "resae", seed=0)
    with torch.no_grad():
        resae.A[0].copy_(torch.eye(D))
    (row,) = linear_propagation(model, win, resae, n_features=4)
    assert (row.layer, row.next_layer, row.n_features) == (1, 3, 4)
    assert row.cosine == pytest.approx(1, abs=1e-5)
    assert row.norm_ratio == pytest.approx(1, abs=1e-4)
    assert row.linear_r2 == pytest.approx(1, abs=1e-6)
    assert row.new_fraction == pytest.approx(0, abs=1e-4)
    assert row.new_latents == 0
    assert row.alpha > 0
    # a layerwise SAE must re-encode the carried change: its decoded change is non-zero
    layerwise = random_dictionary(LAYERS, "layerwise", seed=0)
    (lw,) = linear_propagation(model, win, layerwise, affine_from=resae, n_features=4)
    assert lw.cosine == pytest.approx(1, abs=1e-5)
    assert lw.new_fraction > 0.01
    assert linear_propagation(model, win, layerwise) == []           # no maps: skipped
    with torch.no_grad():
        resae.A[0].copy_(2 * torch.eye(D))
    (doubled,) = linear_propagation(model, win, resae, n_features=4)
    assert doubled.cosine == pytest.approx(1, abs=1e-5)
    assert doubled.norm_ratio == pytest.approx(0.5, abs=1e-4)
    assert doubled.linear_r2 == pytest.approx(0.0, abs=1e-4)         # 1 − ‖δ − 2δ‖²/‖δ‖²


def test_real_blocks_give_partial_agreement(
    tiny_llama: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    win = tiny_windows(tiny_tokenizer, n_windows=2)[0]
    rows = linear_propagation(tiny_llama, win, random_dictionary((0, 1, 3), "resae"),
                              n_features=3, seed=1)
    assert [(r.layer, r.next_layer) for r in rows] == [(0, 1), (1, 3)]
    for r in rows:
        assert -1 <= r.cosine <= 1 and r.norm_ratio > 0 and r.new_fraction >= 0
