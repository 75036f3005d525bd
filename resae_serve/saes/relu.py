"""ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, April 2024 update)."""

from __future__ import annotations

from torch import Tensor

from resae_serve.saes.base import SAE, TrainStepOutput
from resae_serve.saes.losses import l1_loss, mean_l0, mse_loss


class ReLUSAE(SAE):
    """Plain ReLU codes, made sparse by an L1 penalty.

    ``z = relu((x - b_dec) @ W_enc + b_enc)``; ``x_hat = z @ W_dec + b_dec``.
    Loss ``mse(x, x_hat) + l1_coefficient * mean_tokens(sum_i z_i ||W_dec_i||) / d_in``
    (the penalty shares the MSE's ``1 / d_in`` so ``l1_coefficient = 5`` means what it means
    in Anthropic's recipe). :meth:`~SAE.encode_sparse` keeps the ``k`` largest codes only.
    """

    architecture = "relu"

    def activate(self, pre: Tensor) -> Tensor:
        """(N, d_sae) -> dense (N, d_sae) ReLU codes."""
        return pre.relu()

    def training_step(self, x: Tensor, dead_mask: Tensor | None = None, *,
                      n_dead: int | None = None) -> TrainStepOutput:
        """See :meth:`SAE.training_step`; ``dead_mask`` and ``n_dead`` are ignored (no AuxK)."""
        z = self.encode(x)  # (N, d_sae)
        x_hat = self.decode(z)  # (N, d_in)
        mse = mse_loss(x, x_hat)
        l1 = l1_loss(z, self.W_dec)
        loss = mse + self.config.l1_coefficient * l1
        metrics = {"loss": loss.detach(), "mse": mse.detach(), "l1": l1.detach(),
                   "l0": mean_l0(z)}
        return TrainStepOutput(loss, x_hat, metrics, (z > 0).any(dim=0))
