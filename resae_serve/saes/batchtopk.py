"""BatchTopK SAE (Bussmann et al. 2024): TopK over the whole batch, saved as JumpReLU."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from resae_serve.saes.base import SAE, TrainStepOutput
from resae_serve.saes.config import SAEConfig
from resae_serve.saes.jumprelu import JumpReLUSAE, jump_relu
from resae_serve.saes.losses import mean_l0, mse_loss

THRESHOLD_EMA_RATE = 0.01
"""Weight of the newest batch in the threshold average once past the first 100 updates."""


class BatchTopKSAE(SAE):
    """Keeps the ``k * N`` largest ReLU activations of a batch of N tokens while training.

    Training: ``z = BatchTopK_{k N}(relu(pre))`` with ``pre = (x - b_dec) @ W_enc + b_enc``,
    so tokens share a budget of ``k`` active latents on average; loss as in TopK (MSE + AuxK).
    Each step also averages the smallest kept positive activation into ``threshold``
    (running mean for the first ``1 / THRESHOLD_EMA_RATE`` steps, then an EMA), one value for
    all latents. :meth:`encode` and :meth:`inference_sae` use that threshold, JumpReLU style,
    so encoding outside training never depends on the rest of the batch (before the first
    training step the threshold is 0 and encoding is a plain ReLU).
    """

    architecture = "batchtopk"
    tensor_names = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")

    threshold: Tensor
    num_threshold_updates: Tensor

    def __init__(self, config: SAEConfig, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(config, dtype=dtype, device=device)
        self.register_buffer("threshold", torch.zeros(config.d_sae, dtype=dtype, device=device))
        self.register_buffer("num_threshold_updates",
                             torch.zeros((), dtype=torch.int64, device=device))

    def activate(self, pre: Tensor) -> Tensor:
        """Per-token inference activation with the learned threshold: (N, d_sae) -> (N, d_sae)."""
        return jump_relu(pre, self.threshold)

    def encode_batch(self, x: Tensor) -> Tensor:
        """Training-time encoding: the ``k * N`` largest activations of the batch (N, d_sae)."""
        return self._batch_topk(self.pre_acts(x))

    def training_step(self, x: Tensor, dead_mask: Tensor | None = None, *,
                      n_dead: int | None = None) -> TrainStepOutput:
        """See :meth:`SAE.training_step`; also updates ``threshold``."""
        pre = self.pre_acts(x)  # (N, d_sae)
        z = self._batch_topk(pre)  # (N, d_sae), k * N nonzeros at most
        self._update_threshold(z)
        x_hat = self.decode(z)  # (N, d_in)
        mse = mse_loss(x, x_hat)
        aux = self.auxk_term(pre, x.to(x_hat.dtype) - x_hat, dead_mask, n_dead=n_dead)
        loss = mse + self.config.aux_coefficient * aux
        metrics = {"loss": loss.detach(), "mse": mse.detach(), "aux": aux.detach(),
                   "l0": mean_l0(z), "threshold": self.threshold[0].detach().clone()}
        return TrainStepOutput(loss, x_hat, metrics, (z > 0).any(dim=0))

    def inference_sae(self) -> JumpReLUSAE:
        """A JumpReLU SAE with the same weights and ``threshold`` (copies, not views)."""
        config = dataclasses.replace(self.config, architecture="jumprelu")
        return JumpReLUSAE.from_tensors(config, self.inference_tensors())

    def _batch_topk(self, pre: Tensor) -> Tensor:
        acts = pre.relu()
        flat = acts.flatten()  # (N * d_sae,)
        n_keep = min(self.config.k * acts.shape[0], flat.numel())
        values, indices = flat.topk(n_keep, sorted=False)
        return torch.zeros_like(flat).scatter_(0, indices, values).view_as(acts)

    @torch.no_grad()
    def _update_threshold(self, z: Tensor) -> None:
        """Average the smallest kept activation into ``threshold``; no device sync."""
        smallest = torch.where(z > 0, z, torch.inf).min().float()  # inf when none is kept
        kept = smallest.isfinite()
        self.num_threshold_updates += kept.to(self.num_threshold_updates.dtype)
        # The rate in float64 then rounded, as a Python float scalar would be.
        rate = (1.0 / self.num_threshold_updates.clamp_min(1).double()).clamp_min(
            THRESHOLD_EMA_RATE)
        old = self.threshold.float()
        new = (1 - rate).float() * old + rate.float() * smallest
        self.threshold.copy_(torch.where(kept, new, old).to(self.threshold.dtype))
