"""JumpReLU SAE, inference form (the saved shape of a trained BatchTopK SAE)."""

from __future__ import annotations

import torch
from torch import Tensor

from resae_serve.saes.base import SAE, TrainStepOutput
from resae_serve.saes.config import SAEConfig


def jump_relu(pre: Tensor, threshold: Tensor) -> Tensor:
    """``relu(pre) * (pre > threshold)`` as SAELens: ``pre`` (N, d_sae), ``threshold`` (d_sae,)."""
    return pre.relu() * (pre > threshold)


class JumpReLUSAE(SAE):
    """Each latent fires when its pre-activation exceeds its own threshold.

    ``pre = (x - b_dec) @ W_enc + b_enc``; ``z = relu(pre) * (pre > threshold)``;
    ``x_hat = z @ W_dec + b_dec``. Extra tensor ``threshold`` (d_sae,). Encoding is per token.
    Inference only: train ``"batchtopk"`` and save its :meth:`~SAE.inference_sae`.
    """

    architecture = "jumprelu"
    tensor_names = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")

    threshold: Tensor

    def __init__(self, config: SAEConfig, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(config, dtype=dtype, device=device)
        self.register_buffer("threshold", torch.zeros(config.d_sae, dtype=dtype, device=device))

    def activate(self, pre: Tensor) -> Tensor:
        """(N, d_sae) -> dense (N, d_sae), nonzero where ``pre > threshold``."""
        return jump_relu(pre, self.threshold)

    def training_step(self, x: Tensor, dead_mask: Tensor | None = None, *,
                      n_dead: int | None = None) -> TrainStepOutput:
        """Not supported: JumpReLU is the inference form here."""
        raise NotImplementedError(
            "JumpReLU SAEs are inference-only in resae_serve; train architecture='batchtopk' "
            "and save its inference_sae(), which is a JumpReLU SAE with the learned threshold"
        )
