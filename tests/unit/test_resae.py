"""The ReSAE module against hand computations of docs/ARCHITECTURE.md §1."""

from __future__ import annotations

import pytest
import torch

from resae_serve.context import TrainingContext
from resae_serve.interventions import (
    EditOp,
    EditTable,
    FeatureEdit,
    Gate,
    GatedEdit,
    InterventionError,
    edit_coefficients,
    edit_line,
    edit_table,
)
from tests.unit.resae_fixtures import D_MODEL, D_SAE, LAYERS, K, tiny_acts, tiny_resae

ATOL = 1e-5


def test_residual_input_and_chain_decode_by_hand() -> None:
    resae = tiny_resae("resae")
    acts = tiny_acts()
    h0, h1 = acts[1], acts[3]
    sae0, sae1 = resae.saes
    A, c = resae.affine_map(1)
    s0, s1 = resae.scales.tolist()
    u0, u1 = h0 / s0, (h1 - h0 @ A.T - c) / s1
    torch.testing.assert_close(resae.sae_input(0, h0, None), u0, atol=ATOL, rtol=0)
    torch.testing.assert_close(resae.sae_input(1, h1, h0), u1, atol=ATOL, rtol=0)
    z0, z1 = sae0.encode(u0), sae1.encode(u1)
    x0 = s0 * (z0 @ sae0.W_dec + sae0.b_dec)
    x1 = x0 @ A.T + c + s1 * (z1 @ sae1.W_dec + sae1.b_dec)
    out = resae(acts)
    torch.testing.assert_close(out[1], x0, atol=ATOL, rtol=0)
    torch.testing.assert_close(out[3], x1, atol=ATOL, rtol=0)
    # sparse and dense codes decode alike
    dense = resae.decode(resae.encode_dense(acts))
    torch.testing.assert_close(dense[3], out[3], atol=ATOL, rtol=0)


def test_layerwise_mode_reads_raw_activations() -> None:
    resae = tiny_resae("layerwise")
    acts = tiny_acts()
    for i, layer in enumerate(LAYERS):
        sae, s = resae.saes[i], float(resae.scales[i])
        want = s * sae.decode(sae.encode(acts[layer] / s))
        torch.testing.assert_close(resae(acts)[layer], want, atol=ATOL, rtol=0)


def test_encode_gives_k_codes_per_token_per_layer() -> None:
    codes = tiny_resae().encode(tiny_acts())
    assert set(codes) == set(LAYERS)
    for code in codes.values():
        assert code.indices.shape == code.values.shape == (6, K)


@pytest.mark.parametrize("mode", ["resae", "layerwise"])
def test_intervention_deltas_equal_hand_computation(mode: str) -> None:
    resae = tiny_resae(mode)  # type: ignore[arg-type]
    acts = tiny_acts()
    h_prev, h = acts[1], acts[3]
    # different edits per token: token t edits features (t, t + 7) with mode cycling
    n = len(h)
    feature = torch.stack([torch.arange(n), torch.arange(n) + 7], 1)
    op = torch.tensor([[1 + t % 4, 1 + (t + 1) % 4] for t in range(n)])
    value = torch.tensor([[1.5, -0.5]] * n)
    delta = resae.intervention_delta(3, h, h_prev, EditTable(feature, op, value))

    sae, sigma = resae.saes[1], float(resae.scales[1])
    z = sae.encode(resae.sae_input(1, h, h_prev))
    want = torch.zeros(n, D_MODEL)
    for t in range(n):
        for slot in range(2):
            i, v = int(feature[t, slot]), float(value[t, slot])
            zi = float(z[t, i].detach())
            coef = {EditOp.ADD: v, EditOp.CLAMP: v - zi, EditOp.SCALE: (v - 1) * zi,
                    EditOp.ABLATE: -zi}[EditOp(int(op[t, slot]))]
            want[t] += sigma * coef * sae.W_dec[i]
    torch.testing.assert_close(delta, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["resae", "layerwise"])
def test_chained_deltas_read_the_edited_previous_layer(mode: str) -> None:
    """Edits at two layers of one pass: a residualized layer reads ``h_prev + δ_prev``."""
    resae = tiny_resae(mode)  # type: ignore[arg-type]
    acts = tiny_acts()
    n = len(acts[1])
    t0 = edit_table([FeatureEdit(1, 3, "add", 4.0)], n, d_sae=D_SAE)
    d0 = resae.intervention_delta(1, acts[1], None, t0)
    with torch.no_grad():  # ablate each token's strongest latent of layer 3 after the edit
        top = resae.saes[1].encode(resae.sae_input(1, acts[3], acts[1] + d0)).argmax(1)
    t1 = EditTable(top[:, None], torch.full((n, 1), int(EditOp.ABLATE)), torch.zeros(n, 1))
    deltas = resae.intervention_deltas(acts, {1: t0, 3: t1})
    d1 = resae.intervention_delta(3, acts[3], acts[1] + d0, t1)
    torch.testing.assert_close(deltas[1], d0, atol=0, rtol=0)
    torch.testing.assert_close(deltas[3], d1, atol=0, rtol=0)
    clean = resae.intervention_delta(3, acts[3], acts[1], t1)
    assert (mode == "resae") == (not torch.allclose(clean, d1, atol=1e-3))
    only_first = resae.intervention_deltas(acts, {1: t0})
    assert torch.count_nonzero(only_first[3]) == 0
    with pytest.raises(InterventionError, match=r"edit tables name layers \[2\]"):
        resae.intervention_deltas(acts, {2: t0})


def test_clamp_pins_the_feature_when_reencoded() -> None:
    """Clamp is error-preserving: after the edit the feature reads the pinned value."""
    resae = tiny_resae("layerwise", architecture="relu")
    with torch.no_grad():  # tied encoder: d_i · W_enc[:, i] = ‖d_i‖² = 1
        resae.saes[0].W_enc.copy_(resae.saes[0].W_dec.T)
    h = tiny_acts()[1]
    z = resae.saes[0].encode(h / resae.scales[0])
    feature = int(z.sum(0).argmax())  # a feature active on most tokens
    table = edit_table([FeatureEdit(1, feature, "clamp", 3.0)], len(h), d_sae=D_SAE)
    edited = h + resae.intervention_delta(1, h, None, table)
    z_new = resae.saes[0].encode(edited / resae.scales[0])
    # a ReLU latent is linear in h while active: it moves by (3 − z)·‖d_i‖², to 3 exactly
    active = z[:, feature] > 0
    torch.testing.assert_close(z_new[active, feature], torch.full((int(active.sum()),), 3.0),
                               atol=1e-4, rtol=0)


def test_bfloat16_matches_float32_loosely() -> None:
    resae = tiny_resae()
    acts = tiny_acts()
    ref = resae(acts)
    out = resae.to(torch.bfloat16)({k: v.bfloat16() for k, v in acts.items()})
    for layer in LAYERS:
        assert out[layer].dtype == torch.bfloat16
        rel = (out[layer].float() - ref[layer]).norm() / ref[layer].norm()
        assert rel < 0.1


def test_errors_name_layer_and_feature() -> None:
    resae = tiny_resae()
    acts = tiny_acts()
    table = edit_table([FeatureEdit(3, 5, "add", 1.0)], 6, d_sae=D_SAE)
    with pytest.raises(InterventionError, match=r"layer=2 is not in this dictionary.*\[1, 3\]"):
        resae.intervention_delta(2, acts[3], acts[1], table)
    with pytest.raises(InterventionError, match=r"feature=99 at layer 3; allowed 0\.\.31"):
        edit_table([FeatureEdit(3, 99, "add", 1.0)], 6, d_sae=D_SAE)
    with pytest.raises(InterventionError, match="mode='boost'"):
        FeatureEdit(3, 1, "boost", 1.0)  # type: ignore[arg-type]
    with pytest.raises(InterventionError, match="must be a finite number"):
        FeatureEdit(3, 1, "add", float("nan"))
    with pytest.raises(InterventionError, match=r"layers \[3\] are missing"):
        resae.encode({1: acts[1]})
    with pytest.raises(InterventionError, match="also needs the activations of layer 1"):
        resae.intervention_delta(3, acts[3], None, table)


def test_edit_line_equals_edit_coefficients() -> None:
    """The engine's per-slot line ``a·z + b`` is each edit mode's coefficient."""
    z = torch.tensor([[-1.5, 0.0, 0.25, 3.0]])
    for op in EditOp:
        value = 1.75
        a, b = edit_line(op, value)
        want = edit_coefficients(z, torch.full_like(z, int(op), dtype=torch.long),
                                 torch.full_like(z, value))
        assert torch.equal(a * z + b, want), op


@pytest.mark.parametrize("mode", ["resae", "layerwise"])
def test_gated_edits_apply_where_their_gate_holds(mode: str) -> None:
    """A gated edit is the ungated one masked by ``z[feature] >= value`` of the input its
    gate layer reads (the edited previous layer included); sticky gates latch on."""
    resae = tiny_resae(mode)  # type: ignore[arg-type]
    acts = tiny_acts(12, seed=3)
    n = 12
    t0 = edit_table([FeatureEdit(1, 3, "add", 4.0)], n, d_sae=D_SAE)
    d0 = resae.intervention_delta(1, acts[1], None, t0)
    with torch.no_grad():
        z1 = resae.saes[1].encode(resae.sae_input(1, acts[3], acts[1] + d0))
    feature = int((z1 > 0).sum(0).argmax())            # the feature firing on most tokens
    value = float(z1[:, feature][z1[:, feature] > 0].median())
    holds = z1[:, feature] >= value
    assert 0 < int(holds.sum()) < n
    clamp = edit_table([FeatureEdit(3, 5, "clamp", 2.0)], n, d_sae=D_SAE)
    vector = torch.linspace(-1, 1, D_MODEL)
    gate = Gate(3, feature, value)
    gated = [GatedEdit(gate, 3, clamp, vector)]
    deltas = resae.intervention_deltas(acts, {1: t0}, gated=gated)
    full = resae.intervention_delta(3, acts[3], acts[1] + d0, clamp) + vector
    torch.testing.assert_close(deltas[3], holds[:, None] * full, atol=ATOL, rtol=0)
    torch.testing.assert_close(deltas[1], d0, atol=0, rtol=0)
    # sticky: from the first token where it holds on; out of distribution: position 0 never
    sticky = resae.intervention_deltas(acts, {1: t0}, gated=[
        GatedEdit(gate._replace(sticky=True), 3, clamp, vector)])
    latched = holds.long().cumsum(0) > 0
    torch.testing.assert_close(sticky[3], latched[:, None] * full, atol=ATOL, rtol=0)
    ctx = TrainingContext.unknown()
    skipped = resae.intervention_deltas(acts, {1: t0}, gated=gated, context=ctx,
                                        positions=list(range(n)))
    mask = holds.clone()
    mask[0] = False
    torch.testing.assert_close(skipped[3], mask[:, None] * full, atol=ATOL, rtol=0)
    with pytest.raises(InterventionError, match="at or before"):
        resae.intervention_deltas(acts, {}, gated=[GatedEdit(gate, 1, t0)])
