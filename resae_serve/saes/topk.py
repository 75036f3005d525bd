"""TopK SAE (Gao et al. 2024), the default architecture."""

from __future__ import annotations

import torch
from torch import Tensor

from resae_serve.saes.base import SAE, SparseCodes, TrainStepOutput
from resae_serve.saes.losses import mse_loss


class TopKSAE(SAE):
    """Keeps the k largest ReLU activations of each token.

    ``z = TopK_k(relu((x - b_dec) @ W_enc + b_enc))``; ``x_hat = z @ W_dec + b_dec``.
    Loss ``mse(x, x_hat) + aux_coefficient * AuxK`` where AuxK asks the top ``aux_k`` dead
    latents to reconstruct the detached error ``x - x_hat`` (zero when none is dead).
    """

    architecture = "topk"

    def activate_sparse(self, pre: Tensor) -> SparseCodes:
        """(N, d_sae) -> (N, k) codes; values 0 where fewer than k pre-activations are > 0."""
        return self._topk(pre)

    def activate(self, pre: Tensor) -> Tensor:
        """(N, d_sae) -> dense (N, d_sae) with at most k nonzeros per token."""
        codes = self.activate_sparse(pre)
        z = torch.zeros(*codes.values.shape[:-1], self.config.d_sae,
                        dtype=codes.values.dtype, device=codes.values.device)
        return z.scatter_(-1, codes.indices, codes.values)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction through the sparse path: (N, d_in) -> (N, d_in)."""
        return self.decode_sparse(self.encode_sparse(x))

    def training_step(self, x: Tensor, dead_mask: Tensor | None = None) -> TrainStepOutput:
        """See :meth:`SAE.training_step`; decodes sparsely (gather of k rows per token)."""
        pre = self.pre_acts(x)  # (N, d_sae)
        codes = self._topk(pre)  # (N, k)
        x_hat = self.decode_sparse(codes)  # (N, d_in)
        mse = mse_loss(x, x_hat)
        aux = self.auxk_term(pre, x.to(x_hat.dtype) - x_hat, dead_mask)
        loss = mse + self.config.aux_coefficient * aux
        active = codes.values > 0  # (N, k)
        fired = torch.zeros(self.config.d_sae, dtype=torch.bool, device=x_hat.device)
        fired[codes.indices[active]] = True
        metrics = {
            "loss": loss.item(), "mse": mse.item(), "aux": aux.item(),
            "l0": active.sum(dim=-1).float().mean().item(),
        }
        return TrainStepOutput(loss, x_hat, metrics, fired)

    def _topk(self, pre: Tensor) -> SparseCodes:
        values, indices = pre.topk(self.config.k, dim=-1, sorted=False)
        return SparseCodes(indices, values.relu())
