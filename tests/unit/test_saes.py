"""SAE architectures: sparsity contracts, sparse/dense parity, training, registry, tensor I/O."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from resae_serve.saes import (
    ARCHITECTURES,
    SAE,
    SAE_REGISTRY,
    BatchTopKSAE,
    JumpReLUSAE,
    ReLUSAE,
    SAEConfig,
    SparseCodes,
    TopKSAE,
    build_sae,
    sae_class,
    sae_from_tensors,
)
from resae_serve.saes.sparse_ops import select_pre_acts, select_pre_acts_dense, sparse_decode

D_IN, D_SAE, K = 16, 64, 4


def _config(architecture: str = "topk", **overrides: object) -> SAEConfig:
    return SAEConfig(architecture=architecture, d_in=D_IN, d_sae=D_SAE, k=K,  # type: ignore[arg-type]
                     **overrides)  # type: ignore[arg-type]


def _sparse_data(n: int = 512, n_true: int = 32, active: int = 3, seed: int = 0) -> torch.Tensor:
    """Tokens that are sums of a few of ``n_true`` ground-truth directions, unit per-element RMS."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_true, D_IN, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    ids = torch.rand(n, n_true, generator=g).argsort(dim=1)[:, :active]  # (n, active)
    coefs = torch.rand(n, active, generator=g) + 0.5
    x = (coefs[..., None] * dictionary[ids]).sum(dim=1) + 0.3  # (n, D_IN), nonzero mean
    return x / x.pow(2).mean().sqrt()


def _dense(codes: SparseCodes) -> torch.Tensor:
    z = torch.zeros(codes.indices.shape[0], D_SAE, dtype=codes.values.dtype)
    return z.scatter(1, codes.indices, codes.values)


def _train(sae: SAE, x: torch.Tensor, steps: int = 50) -> list[float]:
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        batch = x[(step * 64) % len(x):][:64]
        out = sae.training_step(batch)
        optimizer.zero_grad()
        out.loss.backward()
        sae.remove_parallel_grad()
        optimizer.step()
        sae.normalize_decoder()
        losses.append(float(out.metrics["loss"]))
    return losses


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------------- TopK
def _positive_topk() -> TopKSAE:
    sae = TopKSAE(_config())
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive: exactly k active per token
    return sae


def test_topk_encode_has_exactly_k_nonzeros_per_token() -> None:
    z = _positive_topk().encode(torch.randn(32, D_IN))
    assert z.shape == (32, D_SAE)
    assert ((z != 0).sum(dim=1) == K).all()


def test_topk_encode_sparse_agrees_with_encode() -> None:
    sae, x = _positive_topk(), torch.randn(32, D_IN)
    codes = sae.encode_sparse(x)
    assert codes.indices.shape == codes.values.shape == (32, K)
    assert codes.indices.dtype == torch.int64
    torch.testing.assert_close(_dense(codes), sae.encode(x), rtol=0, atol=0)


def test_topk_pads_with_zero_values_when_fewer_than_k_are_active() -> None:
    sae = TopKSAE(_config())
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)
    codes = sae.encode_sparse(torch.randn(8, D_IN))
    assert (codes.values == 0).all()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_decode_sparse_equals_dense_decode(architecture: str) -> None:
    sae, x = build_sae(_config(architecture)), torch.randn(32, D_IN)
    codes = sae.encode_sparse(x)
    torch.testing.assert_close(sae.decode_sparse(codes), sae.decode(_dense(codes)),
                               rtol=0, atol=1e-6)


def test_topk_forward_equals_dense_decode_of_encode() -> None:
    sae, x = _positive_topk(), torch.randn(32, D_IN)
    torch.testing.assert_close(sae(x), sae.decode(sae.encode(x)), rtol=0, atol=1e-5)


def test_decoder_rows_stay_unit_norm_and_loss_decreases() -> None:
    x = _sparse_data()
    sae = TopKSAE(_config())
    sae.init_from_data(x)
    losses = _train(sae, x)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE), rtol=0, atol=1e-5)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_remove_parallel_grad_leaves_gradient_orthogonal_to_rows() -> None:
    sae = TopKSAE(_config())
    sae.training_step(torch.randn(32, D_IN)).loss.backward()
    assert sae.W_dec.grad is not None
    sae.remove_parallel_grad()
    along = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    torch.testing.assert_close(along, torch.zeros(D_SAE), rtol=0, atol=1e-6)


def test_auxk_term_is_positive_with_dead_latents_and_zero_without() -> None:
    sae, x = TopKSAE(_config()), _sparse_data(64)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    assert sae.training_step(x, None).metrics["aux"] == 0.0
    assert sae.training_step(x, dead).metrics["aux"] == 0.0
    dead[: D_SAE // 2] = True
    out = sae.training_step(x, dead)
    assert out.metrics["aux"] > 0.0
    assert out.loss.item() > out.metrics["mse"]


def _fast_and_dense(dtype: torch.dtype, dead: torch.Tensor | None) -> tuple[
    tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]
]:
    """Loss, x_hat, fired, metrics and parameter gradients of both TopK training paths."""
    x = _sparse_data(128).to(dtype)
    sae = TopKSAE(_config(aux_k=8), dtype=dtype)
    sae.init_from_data(x)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)  # some tokens with fewer than k positive pre-activations
    twin = copy.deepcopy(sae)
    results = []
    for model, out in ((sae, sae.training_step(x, dead)),
                       (twin, twin.training_step_dense(x, dead))):
        out.loss.backward()
        results.append((out.loss.detach(), out.x_hat.detach(), out.fired,
                        torch.stack(list(out.metrics.values())),
                        *(p.grad for p in (model.W_enc, model.b_enc, model.W_dec, model.b_dec))))
    return tuple(results[0]), tuple(results[1])  # type: ignore[arg-type]


@pytest.mark.parametrize("n_dead", [0, 3, 22])  # none, fewer than aux_k=8, more
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_topk_sparse_training_step_matches_the_dense_oracle(
    n_dead: int, dtype: torch.dtype, tol: float,
) -> None:
    """The sparse encoder backward (and AuxK through it) equals plain autograd through the
    dense pre-activations: to 1e-12 in float64, 2e-5 (relative to each tensor's largest
    entry) in float32, where only the summation order differs."""
    dead = (torch.arange(D_SAE) % 3 == 0) & (torch.arange(D_SAE) < 3 * n_dead) if n_dead else None
    fast, dense = _fast_and_dense(dtype, dead)
    for name, a, b in zip(("loss", "x_hat", "fired", "metrics", "W_enc.grad", "b_enc.grad",
                           "W_dec.grad", "b_dec.grad"), fast, dense, strict=True):
        assert a is not None and b is not None, name
        if a.dtype == torch.bool:
            assert torch.equal(a, b), name
            continue
        scale = float(b.abs().max()) or 1.0
        torch.testing.assert_close(a, b, rtol=0, atol=tol * scale, msg=name)
    if n_dead:
        assert dead is not None and int(dead.sum()) == n_dead
        assert float(fast[3][2]) > 0  # metrics["aux"]: AuxK ran


def test_select_pre_acts_backward_passes_gradcheck() -> None:
    g = torch.Generator().manual_seed(1)
    x, W = torch.randn(6, D_IN, generator=g, dtype=torch.float64), torch.randn(
        D_IN, D_SAE, generator=g, dtype=torch.float64)
    b_enc, b_dec = torch.randn(D_SAE, dtype=torch.float64), torch.randn(D_IN, dtype=torch.float64)
    indices = torch.randint(0, D_SAE, (6, 5), generator=g)

    def selected(x: torch.Tensor, W: torch.Tensor, b_enc: torch.Tensor,
                 b_dec: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            xc = x - b_dec
            pre = xc @ W + b_enc
        return select_pre_acts(x, W, b_enc, b_dec, indices, xc, pre)

    inputs = tuple(t.requires_grad_() for t in (x, W, b_enc, b_dec))
    assert torch.autograd.gradcheck(selected, inputs)
    torch.testing.assert_close(selected(*inputs),
                               select_pre_acts_dense(*inputs, indices), rtol=0, atol=1e-12)


def test_sparse_decode_backward_passes_gradcheck_and_equals_decode_rows() -> None:
    g = torch.Generator().manual_seed(2)
    sae = TopKSAE(_config(), dtype=torch.float64)
    indices = torch.randint(0, D_SAE, (6, 5), generator=g)
    indices[0, 1] = indices[0, 0]  # a latent twice in one token (AuxK and TopK may overlap)
    values = torch.rand(6, 5, generator=g, dtype=torch.float64).requires_grad_()
    W_dec = sae.W_dec.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v, W: sparse_decode(indices, v, W), (values, W_dec))
    torch.testing.assert_close(sparse_decode(indices, values, sae.W_dec),
                               sae.decode_rows(SparseCodes(indices, values)), rtol=0, atol=1e-12)


def test_training_step_reports_fired_latents() -> None:
    sae, x = _positive_topk(), torch.randn(32, D_IN)
    out = sae.training_step(x)
    assert out.fired.dtype == torch.bool and out.fired.shape == (D_SAE,)
    assert torch.equal(out.fired, (sae.encode(x) > 0).any(dim=0))
    assert out.metrics["l0"] == K


def test_init_from_data_sets_median_and_tied_encoder() -> None:
    x = _sparse_data(256)
    sae = TopKSAE(_config())
    with torch.no_grad():
        sae.b_enc.fill_(3.0)
    sae.init_from_data(x)
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert (sae.b_enc == 0).all()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    # The geometric median minimises the summed distance: it beats the mean.
    def spread(center: torch.Tensor) -> float:
        return (x - center).norm(dim=1).sum().item()
    assert spread(sae.b_dec.detach()) <= spread(x.mean(dim=0)) + 1e-4


# --------------------------------------------------------------------------------- BatchTopK
def test_batchtopk_keeps_k_times_n_activations_per_batch() -> None:
    sae = BatchTopKSAE(_config("batchtopk"))
    with torch.no_grad():
        sae.b_enc.fill_(10.0)
    x = torch.randn(32, D_IN)
    assert int((sae.encode_batch(x) != 0).sum()) == K * 32
    assert sae.training_step(x).metrics["l0"] == K


def test_batchtopk_inference_is_batch_independent_jumprelu() -> None:
    x = _sparse_data()
    sae = BatchTopKSAE(_config("batchtopk"))
    sae.init_from_data(x)
    _train(sae, x, steps=20)
    assert float(sae.threshold[0]) > 0
    jumprelu = sae.inference_sae()
    assert type(jumprelu) is JumpReLUSAE
    assert jumprelu.config == dataclasses.replace(sae.config, architecture="jumprelu")
    assert torch.equal(jumprelu.threshold, sae.threshold)
    assert torch.equal(jumprelu.threshold, sae.threshold[0].expand(D_SAE))
    batch = x[:16]
    together = jumprelu.encode(batch)
    torch.testing.assert_close(together, sae.encode(batch), rtol=0, atol=0)
    for i in range(len(batch)):
        alone = jumprelu.encode(batch[i : i + 1])[0]
        assert torch.equal(alone != 0, together[i] != 0)
        torch.testing.assert_close(alone, together[i], rtol=1e-6, atol=1e-6)


def test_batchtopk_inference_sae_is_a_copy() -> None:
    sae = BatchTopKSAE(_config("batchtopk"))
    jumprelu = sae.inference_sae()
    with torch.no_grad():
        sae.W_dec.zero_()
    assert not torch.equal(jumprelu.W_dec, sae.W_dec)


def test_jumprelu_encode_applies_threshold() -> None:
    sae = JumpReLUSAE(_config("jumprelu"))
    x = torch.randn(32, D_IN)
    with torch.no_grad():
        sae.threshold.fill_(0.5)
    pre = sae.pre_acts(x)
    torch.testing.assert_close(sae.encode(x), torch.where(pre > 0.5, pre, 0.0))


def test_jumprelu_training_is_refused_with_a_pointer_to_batchtopk() -> None:
    with pytest.raises(NotImplementedError, match="batchtopk"):
        JumpReLUSAE(_config("jumprelu")).training_step(torch.randn(4, D_IN))


# --------------------------------------------------------------------------------- ReLU
def test_relu_l1_term_is_present_and_loss_decreases() -> None:
    x = _sparse_data()
    sae = ReLUSAE(_config("relu", l1_coefficient=1.0))
    sae.init_from_data(x)
    out = sae.training_step(x[:64])
    assert out.metrics["l1"] > 0
    torch.testing.assert_close(out.loss.detach(), out.metrics["mse"] + out.metrics["l1"])
    losses = _train(sae, x)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_relu_encode_sparse_truncates_to_k() -> None:
    sae = ReLUSAE(_config("relu"))
    with torch.no_grad():
        sae.b_enc.fill_(10.0)
    x = torch.randn(8, D_IN)
    codes = sae.encode_sparse(x)
    assert codes.values.shape == (8, K)
    torch.testing.assert_close(codes.values, sae.encode(x).topk(K, dim=1).values)


# --------------------------------------------------------------------------------- config
def test_config_round_trips_through_json() -> None:
    config = _config("batchtopk", aux_k=8, lr=1e-3, l1_coefficient=2.0)
    assert SAEConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert SAEConfig.from_dict(_config().to_dict()) == _config()


def test_config_defaults() -> None:
    config = SAEConfig(d_in=576, d_sae=2**14)
    assert config.architecture == "topk"
    assert config.effective_aux_k() == 288
    assert config.effective_lr() == pytest.approx(2e-4)
    assert SAEConfig(d_in=576, d_sae=4 * 2**14).effective_lr() == pytest.approx(1e-4)
    assert SAEConfig(d_in=576, d_sae=100, aux_k=None, k=10).effective_aux_k() == 100


def test_config_rejects_unknown_keys_by_name() -> None:
    with pytest.raises(ValueError, match="bogus"):
        SAEConfig.from_dict({**_config().to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="d_sae"):
        SAEConfig.from_dict({"d_in": 4})


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"architecture": "gated"}, "topk, batchtopk, jumprelu, relu"), ({"k": 0}, "k="),
     ({"k": D_SAE + 1}, "k="), ({"aux_k": D_SAE + 1}, "aux_k="), ({"lr": 0.0}, "lr="),
     ({"aux_coefficient": -1.0}, "aux_coefficient="), ({"d_in": True}, "d_in=")],
)
def test_config_rejects_bad_values(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SAEConfig.from_dict({**_config().to_dict(), **overrides})


# --------------------------------------------------------------------------------- registry
def test_registry_covers_every_architecture() -> None:
    assert set(SAE_REGISTRY) == set(ARCHITECTURES)
    with pytest.raises(ValueError, match="allowed: topk, batchtopk, jumprelu, relu"):
        sae_class("gated")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_architecture_builds_and_reconstructs(architecture: str) -> None:
    sae = build_sae(_config(architecture))
    assert type(sae) is SAE_REGISTRY[architecture]
    assert sae.W_enc.shape == (D_IN, D_SAE) and sae.b_enc.shape == (D_SAE,)
    assert sae.W_dec.shape == (D_SAE, D_IN) and sae.b_dec.shape == (D_IN,)
    assert sae(torch.randn(8, D_IN)).shape == (8, D_IN)


def test_class_refuses_a_config_of_another_architecture() -> None:
    with pytest.raises(ValueError, match="'relu'"):
        TopKSAE(_config("relu"))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_inference_tensors_round_trip_bitwise(architecture: str) -> None:
    sae = build_sae(_config(architecture))
    with torch.no_grad():
        for tensor in sae.inference_tensors().values():
            assert tensor.dtype == torch.float32
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    tensors = sae.inference_tensors()
    assert list(tensors) == list(type(sae).tensor_names)
    loaded = sae_from_tensors(sae.config, tensors)
    assert type(loaded) is type(sae)
    for name, tensor in loaded.inference_tensors().items():
        assert torch.equal(tensor, tensors[name]), name
    saved = sae.inference_sae()
    reloaded = sae_from_tensors(saved.config, saved.inference_tensors())
    x = torch.randn(8, D_IN)
    assert torch.equal(reloaded.encode(x), saved.encode(x))


def test_from_tensors_names_the_bad_tensor() -> None:
    config = _config("jumprelu")
    tensors = build_sae(config).inference_tensors()
    with pytest.raises(ValueError, match=r"'W_enc' has shape \[16, 32\], expected \[16, 64\]"):
        sae_from_tensors(config, {**tensors, "W_enc": torch.zeros(D_IN, 32)})
    with pytest.raises(ValueError, match="threshold"):
        sae_from_tensors(config, {k: v for k, v in tensors.items() if k != "threshold"})
    with pytest.raises(ValueError, match="extra_bias"):
        sae_from_tensors(config, {**tensors, "extra_bias": torch.zeros(D_IN)})
    with pytest.raises(ValueError, match="'b_dec'"):
        sae_from_tensors(config, {**tensors, "b_dec": torch.full((D_IN,), float("nan"))})
    with pytest.raises(ValueError, match="'b_enc' has dtype"):
        sae_from_tensors(config, {**tensors, "b_enc": tensors["b_enc"].double()})


# --------------------------------------------------------------------------------- bfloat16
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_bfloat16_encode_decode_smoke(architecture: str) -> None:
    sae = build_sae(_config(architecture), dtype=torch.bfloat16)
    x = torch.randn(8, D_IN, dtype=torch.bfloat16)
    z = sae.encode(x)
    codes = sae.encode_sparse(x)
    assert z.dtype == codes.values.dtype == torch.bfloat16
    assert sae.decode(z).dtype == sae.decode_sparse(codes).dtype == torch.bfloat16
    torch.testing.assert_close(sae.decode_sparse(codes), sae.decode(_dense(codes)),
                               rtol=2e-2, atol=2e-2)
    assert torch.isfinite(sae(x).float()).all()
