"""One step of a dictionary's reconstruction chain, shared by every evaluation.

At dictionary layer ``i`` with block output ``h`` and the previous dictionary layer's value
``h_prev`` in the same residual stream (clean in teacher-forced mode, already spliced in online
mode)::

    z_i  = SAE_i.encode(u_i)        u_i = h / s_i   or   (h − A_i h_prev − c_i) / σ_i
    x̂_i = s_i · D_i(z_i)  [+ A_i x̂_{i−1} + c_i  in resae mode, i ≥ 1]

``x̂_{i−1}`` is the previous layer's reconstruction, so the chain carries upstream errors the
way :meth:`ReSAE.decode` does. The *local* reconstruction ``A_i h_prev + c_i + σ_i D_i(z_i)``
(:func:`local_reconstruction`) predicts from the true previous layer instead, so its error is
the residual SAE's own. Dense codes are used, so JumpReLU and ReLU SAEs keep every active
latent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from resae_serve.resae import ReSAE


class ChainStep(NamedTuple):
    """Codes and reconstruction of one dictionary layer."""

    codes: torch.Tensor
    """(N, d_sae) dense codes of the layer's SAE."""
    x_hat: torch.Tensor
    """(N, d) reconstruction in activation space (through the chain in resae mode)."""
    sae_input: torch.Tensor
    """(N, d) the SAE's normalised input ``u``."""
    sae_output: torch.Tensor
    """(N, d) the SAE's reconstruction of ``u`` (``D(z)``, in input units)."""


def inference_resae(resae: ReSAE) -> ReSAE:
    """The dictionary as used at inference (BatchTopK SAEs become JumpReLU); often ``resae``."""
    saes = [sae.inference_sae() for sae in resae.saes]
    if all(a is b for a, b in zip(saes, resae.saes, strict=True)):
        return resae
    affine = ([None, *(resae.affine_map(i) for i in range(1, len(resae.layers)))]
              if resae.mode == "resae" else None)
    return ReSAE(resae.layers, saes, resae.scales, mode=resae.mode, affine=affine)


@torch.no_grad()
def chain_step(resae: ReSAE, i: int, h: torch.Tensor, h_prev: torch.Tensor | None,
               x_hat_prev: torch.Tensor | None) -> ChainStep:
    """Encode ``h (N, d)`` at dictionary position ``i`` and reconstruct it (module docstring)."""
    sae = resae.saes[i]
    u = resae.sae_input(i, h, h_prev)
    z = sae.encode(u)                                     # (N, d_sae)
    u_hat = sae.decode(z)                                 # (N, d)
    x_hat = resae.scales[i].to(u_hat.dtype) * u_hat
    if resae.mode == "resae" and i > 0:
        if x_hat_prev is None:
            raise ValueError(f"layer {resae.layers[i]} decodes through the chain: pass the "
                             f"reconstruction of layer {resae.layers[i - 1]}")
        x_hat = x_hat + resae.predict(i, x_hat_prev)
    return ChainStep(z, x_hat, u, u_hat)


def teacher_forced(resae: ReSAE, acts: Sequence[torch.Tensor]) -> list[ChainStep]:
    """Every layer encoded from clean activations ``acts[i] (N, d)``; decoded through the chain."""
    steps: list[ChainStep] = []
    for i, h in enumerate(acts):
        prev = steps[-1].x_hat if steps else None
        steps.append(chain_step(resae, i, h, acts[i - 1] if i else None, prev))
    return steps


def local_reconstruction(resae: ReSAE, i: int, step: ChainStep, h_prev: torch.Tensor | None,
                         ) -> torch.Tensor:
    """``A_i h_prev + c_i + σ_i D_i(z_i)``: layer ``i`` rebuilt from the *given* previous layer
    (clean in teacher-forced use) rather than from its reconstruction; equals ``step.x_hat``
    for a layerwise dictionary and for the first layer."""
    if resae.mode != "resae" or i == 0:
        return step.x_hat
    if h_prev is None:
        raise ValueError(f"the local reconstruction of layer {resae.layers[i]} needs the "
                         f"activations of layer {resae.layers[i - 1]}")
    scale = resae.scales[i].to(step.sae_output.dtype)
    return resae.predict(i, h_prev) + scale * step.sae_output
