"""Per-layer reconstruction metrics on held-out activations (docs/ARCHITECTURE.md §2).

For every dictionary layer: activation-space FVE (through the chain in resae mode); the local
FVE of a ReSAE (``A_m h_{m−1} + c_m + σ_m D_m(z_m)`` from the true previous layer: the
residual SAE's own error in activation units); FVE of the SAE's own input; residual-space
FVE; MSE, cosine, L0, dead and dense fractions and shrinkage ``‖x̂‖ / ‖x‖``. Residual space
is ``r_m = h_m − A_m h_{m−1} − c_m``: a ReSAE reconstructs it as ``σ_m · D_m(z_m)``; a
layerwise dictionary, given a ReSAE's affine maps (``affine_from``), as
``x̂_m − A_m h_{m−1} − c_m``, i.e. how much of what is new at layer m its reconstruction
keeps. Sums are float64 and pooled, so batching does not change a number.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch

from resae_serve.evaluation.chain import inference_resae, local_reconstruction, teacher_forced
from resae_serve.metrics import ReconstructionStats
from resae_serve.resae import ReSAE
from resae_serve.train import rebatch


class LayerMetrics(NamedTuple):
    """Held-out reconstruction metrics of one dictionary layer."""

    layer: int
    """Model block index."""
    fve: float
    """Activation-space FVE, pooled (through the chain for a ReSAE)."""
    residual_fve: float | None
    """FVE of ``r_m = h_m − A_m h_{m−1} − c_m`` (None for the first layer or without maps)."""
    local_fve: float | None
    """Activation-space FVE of the local reconstruction (resae mode, not the first layer)."""
    input_fve: float
    """FVE of the SAE's own (normalised) input."""
    mse: float
    """Activation-space mean squared error per element."""
    cosine: float
    """Mean cosine between ``x`` and ``x̂`` per token."""
    l0: float
    """Mean number of active latents per token."""
    dead_fraction: float
    """Fraction of latents that never fired on these tokens."""
    dense_fraction: float
    """Fraction of latents active on more than 10 % of tokens."""
    shrinkage: float
    """Mean ``‖x̂‖ / ‖x‖`` per token (1 = no shrinkage)."""
    n_tokens: int
    """Held-out tokens measured."""


class ReconstructionOutput(NamedTuple):
    """Metrics per layer plus what later evaluations reuse."""

    layers: list[LayerMetrics]
    """One entry per dictionary layer, in layer order."""
    means: dict[int, torch.Tensor]
    """(d,) float32 mean activation per layer: the mean-ablation baseline of splicing."""
    density: dict[int, torch.Tensor]
    """(d_sae,) float64 fraction of tokens on which each latent fired."""


def _residual_maps(resae: ReSAE, affine_from: ReSAE | None) -> ReSAE | None:
    if resae.mode == "resae":
        return resae
    if affine_from is not None and affine_from.mode == "resae":
        if affine_from.layers != resae.layers:
            raise ValueError(f"affine maps for layers {list(affine_from.layers)} cannot serve a "
                             f"dictionary over layers {list(resae.layers)}")
        return affine_from
    return None


@torch.no_grad()
def evaluate_layers(resae: ReSAE, stream: Iterable[torch.Tensor], *,
                    affine_from: ReSAE | None = None, batch_size: int = 4096,
                    ) -> ReconstructionOutput:
    """Metrics over a stream of activations ``(N, n_layers, d)`` in :attr:`ReSAE.layers` order.

    ``affine_from``: a ReSAE over the same layers whose maps define residual space for a
    layerwise ``resae`` (ignored in resae mode, which uses its own).
    """
    resae = inference_resae(resae)
    maps = _residual_maps(resae, affine_from)
    n_layers = len(resae.layers)
    act = [ReconstructionStats(sae.config.d_sae) for sae in resae.saes]
    inp = [ReconstructionStats(sae.config.d_sae) for sae in resae.saes]
    res = [ReconstructionStats(sae.config.d_sae) for sae in resae.saes]
    loc = [ReconstructionStats(sae.config.d_sae) for sae in resae.saes]
    shrink = [0.0] * n_layers
    for batch in rebatch(stream, batch_size):
        batch = batch.float()
        hs = [batch[:, i] for i in range(n_layers)]
        steps = teacher_forced(resae, hs)
        for i, (h, step) in enumerate(zip(hs, steps, strict=True)):
            active = step.codes > 0
            act[i].update(h, step.x_hat, active)
            inp[i].update(step.sae_input, step.sae_output, active)
            norms = step.x_hat.norm(dim=-1) / h.norm(dim=-1).clamp_min(1e-12)
            shrink[i] += float(norms.double().sum())
            if resae.mode == "resae" and i > 0:
                loc[i].update(h, local_reconstruction(resae, i, step, hs[i - 1]), active)
            if maps is not None and i > 0:
                predicted = maps.predict(i, hs[i - 1])
                r_hat = (resae.scales[i] * step.sae_output if resae.mode == "resae"
                         else step.x_hat - predicted)
                res[i].update(h - predicted, r_hat, active)
    if act[0].n == 0:
        raise ValueError("the activation stream was empty")
    rows = []
    for i, layer in enumerate(resae.layers):
        summary = act[i].summary()
        rows.append(LayerMetrics(
            layer=layer, fve=summary["fve"],
            residual_fve=res[i].fve if res[i].n else None,
            local_fve=loc[i].fve if loc[i].n else None, input_fve=inp[i].fve,
            mse=summary["mse"], cosine=summary["cosine"], l0=summary["l0"],
            dead_fraction=summary["dead_fraction"], dense_fraction=summary["dense_fraction"],
            shrinkage=shrink[i] / act[i].n, n_tokens=act[i].n,
        ))
    means = {layer: (s.sum_x / s.n).float() for layer, s in zip(resae.layers, act, strict=True)
             if s.sum_x is not None}
    density = {layer: s.fired_count / s.n for layer, s in zip(resae.layers, act, strict=True)}
    return ReconstructionOutput(rows, means, density)
