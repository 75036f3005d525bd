"""TopK SAE (Gao et al. 2024), the default architecture."""

from __future__ import annotations

import torch
from torch import Tensor

from resae_serve.saes.base import SAE, SparseCodes, TrainStepOutput
from resae_serve.saes.losses import auxk_loss, mse_loss
from resae_serve.saes.sparse_ops import select_pre_acts, sparse_decode


class TopKSAE(SAE):
    """Keeps the k largest ReLU activations of each token.

    ``z = TopK_k(relu((x - b_dec) @ W_enc + b_enc))``; ``x_hat = z @ W_dec + b_dec``.
    Loss ``mse(x, x_hat) + aux_coefficient * AuxK`` where AuxK asks the top ``aux_k`` dead
    latents to reconstruct the detached error ``x - x_hat`` (zero when none is dead).

    :meth:`training_step` never builds an ``(N, d_sae)`` gradient: the pre-activations are
    computed without autograd, and only the ``k`` (plus ``aux_k``) selected ones per token
    carry a gradient, into the encoder and the decoder rows they pick
    (``resae_serve/saes/sparse_ops.py``). :meth:`training_step_dense` is the plain autograd
    version it is tested against.
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

    def training_step(self, x: Tensor, dead_mask: Tensor | None = None, *,
                      n_dead: int | None = None) -> TrainStepOutput:
        """See :meth:`SAE.training_step`; sparse encoder backward and sparse decode."""
        k = self.config.k
        x = x.to(self.W_enc.dtype)
        with torch.no_grad():
            xc = x - self.b_dec  # (N, d_in)
            pre = torch.addmm(self.b_enc, xc, self.W_enc)  # (N, d_sae)
            indices = pre.topk(k, dim=-1, sorted=False).indices  # (N, k)
            aux_indices, aux_scale = self._aux_indices(pre, dead_mask, n_dead)  # (N, aux_k)
        if aux_indices is not None:
            indices = torch.cat([indices, aux_indices], dim=1)  # (N, k + aux_k)
        selected = select_pre_acts(x, self.W_enc, self.b_enc, self.b_dec, indices, xc, pre)
        codes = SparseCodes(indices[:, :k], selected[:, :k].relu())  # (N, k)
        x_hat = sparse_decode(codes.indices, codes.values, self.W_dec) + self.b_dec  # (N, d_in)
        mse = mse_loss(x, x_hat)
        if aux_indices is None:
            aux = mse.new_zeros(())
        else:
            error_hat = sparse_decode(aux_indices, selected[:, k:].relu(), self.W_dec)
            aux = aux_scale * auxk_loss((x.to(x_hat.dtype) - x_hat).detach(), error_hat)
        return self._output(mse, aux, x_hat, codes)

    def training_step_dense(self, x: Tensor, dead_mask: Tensor | None = None, *,
                            n_dead: int | None = None) -> TrainStepOutput:
        """:meth:`training_step` by plain autograd through dense pre-activations (the oracle)."""
        pre = self.pre_acts(x)  # (N, d_sae)
        codes = self._topk(pre)  # (N, k)
        x_hat = self.decode_sparse(codes)  # (N, d_in)
        mse = mse_loss(x, x_hat)
        aux = self.auxk_term(pre, x.to(x_hat.dtype) - x_hat, dead_mask, n_dead=n_dead)
        return self._output(mse, aux, x_hat, codes)

    def _aux_indices(self, pre: Tensor, dead_mask: Tensor | None,
                     n_dead: int | None) -> tuple[Tensor | None, float]:
        """Top ``aux_k`` dead latents per token (N, aux_k) and the AuxK scale; None if none."""
        if dead_mask is None:
            return None, 0.0
        n_dead = int(dead_mask.sum()) if n_dead is None else n_dead
        if n_dead == 0:
            return None, 0.0
        aux_k = self.config.effective_aux_k()
        scale = min(n_dead / aux_k, 1.0)
        dead_pre = pre.masked_fill(~dead_mask.to(pre.device), float("-inf"))
        return dead_pre.topk(min(aux_k, n_dead), dim=-1, sorted=False).indices, scale

    def _output(self, mse: Tensor, aux: Tensor, x_hat: Tensor,
                codes: SparseCodes) -> TrainStepOutput:
        loss = mse + self.config.aux_coefficient * aux
        active = codes.values > 0  # (N, k)
        hits = torch.zeros(self.config.d_sae, dtype=torch.int32, device=x_hat.device)
        hits.index_add_(0, codes.indices.reshape(-1), active.reshape(-1).to(torch.int32))
        metrics = {"loss": loss.detach(), "mse": mse.detach(), "aux": aux.detach(),
                   "l0": active.sum(dim=-1).float().mean()}
        return TrainStepOutput(loss, x_hat, metrics, hits > 0)

    def _topk(self, pre: Tensor) -> SparseCodes:
        values, indices = pre.topk(self.config.k, dim=-1, sorted=False)
        return SparseCodes(indices, values.relu())
