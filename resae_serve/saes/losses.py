"""SAE training losses as small pure functions (computed in float32 whatever the input dtype).

Inputs are normalised by the caller to roughly unit per-element RMS, so :func:`mse_loss` is
close to the fraction of variance unexplained.
"""

from __future__ import annotations

from torch import Tensor

_EPS = 1e-12


def mse_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean over tokens of ``||x - x_hat||² / d_in``; ``x``, ``x_hat``: (N, d_in) -> scalar."""
    return (x.float() - x_hat.float()).pow(2).mean()


def auxk_loss(error: Tensor, error_hat: Tensor) -> Tensor:
    """AuxK loss of Gao et al. (2024): how well dead latents reconstruct the main error.

    ``sum ||e - ê||² / sum ||e||²`` pooled over the batch; ``error`` ``e = x - x_hat`` (detached
    by the caller) and its reconstruction ``ê`` from dead latents only, both (N, d_in) -> scalar.
    """
    error = error.float()
    return (error - error_hat.float()).pow(2).sum() / error.pow(2).sum().clamp_min(_EPS)


def l1_loss(z: Tensor, W_dec: Tensor) -> Tensor:
    """Decoder-norm-weighted L1: mean over tokens of ``sum_i z_i ||W_dec_i|| / d_in``.

    ``z``: (N, d_sae) non-negative codes; ``W_dec``: (d_sae, d_in) -> scalar. Divided by
    ``d_in`` so that it shares the scale of :func:`mse_loss` (Anthropic's loss divided by d_in).
    """
    norms = W_dec.float().norm(dim=1)  # (d_sae,)
    return (z.float() @ norms).mean() / W_dec.shape[1]


def mean_l0(z: Tensor) -> Tensor:
    """Mean number of nonzero latents per token; ``z``: (N, d_sae) -> scalar."""
    return (z != 0).sum(dim=-1).float().mean()


__all__ = ["auxk_loss", "l1_loss", "mean_l0", "mse_loss"]
