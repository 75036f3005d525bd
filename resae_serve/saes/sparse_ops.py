"""Sparse encoder and decoder ops with sparse backward passes (the TopK training fast path).

A TopK SAE only ever uses ``K`` pre-activations per token (its ``k`` codes, plus the AuxK
candidates), so every gradient it produces is sparse: ``N·K`` entries out of ``N·d_sae``.
Autograd through the dense ``(x - b_dec) @ W_enc + b_enc`` would still scatter them into an
``(N, d_sae)`` tensor and run two dense GEMMs (the weight and input gradients).
:class:`SelectedPreActs` computes the same gradients from the ``N·K`` entries alone, as
EleutherAI sparsify's ``FusedEncoder`` does, and :class:`SparseDecode` does the same for the
decoder rows. Weight gradients are ``embedding_bag`` sums over the tokens of each latent
(entries grouped by :func:`group_by_latent`), so their cost and memory stay at ``N·K·d_in``
even with AuxK's larger ``K``, and no parallel sort runs on a CPU (it stalls when another
process holds a core).

With ``xc = x - b_dec``, ``pre = xc @ W_enc + b_enc``, selected ``values = pre[n, idx[n, j]]``
and ``g = ∂L/∂values`` (N, K)::

    ∂L/∂b_enc[m]    = Σ_{(n,j): idx[n,j]=m} g[n,j]
    ∂L/∂W_enc[:, m] = Σ_{(n,j): idx[n,j]=m} g[n,j] · xc[n]
    ∂L/∂b_dec       = -W_enc @ ∂L/∂b_enc
    ∂L/∂x[n]        = Σ_j g[n,j] · W_enc[:, idx[n,j]]          (only when x needs a gradient)

and for ``out[n] = Σ_j v[n,j] · W_dec[idx[n,j]]`` with ``h = ∂L/∂out`` (N, d_in)::

    ∂L/∂W_dec[m] = Σ_{(n,j): idx[n,j]=m} v[n,j] · h[n],    ∂L/∂v[n,j] = h[n] · W_dec[idx[n,j]]

:func:`select_pre_acts_dense` is the eager twin of the encoder op (plain autograd through the
dense product) and ``SAE.decode_rows`` that of the decoder op; ``tests/unit/test_saes.py``
checks each pair agrees.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def group_by_latent(indices: Tensor, d_sae: int) -> tuple[Tensor, Tensor]:
    """Entries of ``indices`` (N, K) grouped by latent: their flat positions, stably sorted by
    latent id (N·K,), and each latent's start in that order (d_sae,), as ``embedding_bag``
    offsets. On a CPU the sort is NumPy's single-threaded radix sort of 16-bit keys."""
    flat = indices.reshape(-1)
    if flat.device.type == "cpu":
        keys = flat.numpy().astype(np.uint16 if d_sae <= 1 << 16 else np.int64)
        order = torch.from_numpy(np.argsort(keys, kind="stable"))
    else:
        order = flat.sort(stable=True).indices
    starts = torch.searchsorted(flat[order], torch.arange(d_sae, device=flat.device))
    return order, starts


def bag_rows(indices: Tensor, weights: Tensor, rows: Tensor, d_sae: int) -> Tensor:
    """``out[m] = Σ_{(n,j): indices[n,j]=m} weights[n,j] · rows[n]``: (N, K) ids and weights,
    (N, d) rows -> (d_sae, d)."""
    order, starts = group_by_latent(indices, d_sae)
    token = torch.div(order, indices.shape[1], rounding_mode="floor")  # (N·K,)
    return F.embedding_bag(token, rows, starts, mode="sum",
                           per_sample_weights=weights.reshape(-1)[order].to(rows.dtype))


class SelectedPreActs(torch.autograd.Function):
    """``pre.gather(1, indices)`` for ``pre = (x - b_dec) @ W_enc + b_enc``, sparse backward.

    ``xc`` (N, d_in) and ``pre`` (N, d_sae) are the already computed, gradient-free centred
    input and pre-activations (the caller needed ``pre`` to choose ``indices``); ``x``,
    ``W_enc``, ``b_enc`` and ``b_dec`` are the tensors gradients flow to.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
                indices: Tensor, xc: Tensor, pre: Tensor) -> Tensor:
        ctx.save_for_backward(W_enc, indices, xc)
        return pre.gather(1, indices)  # (N, K)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        W_enc, indices, xc = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        g = grad.to(W_enc.dtype)  # (N, K)
        grad_b_enc = torch.zeros(d_sae, dtype=W_enc.dtype, device=W_enc.device)
        grad_b_enc.index_add_(0, indices.reshape(-1), g.reshape(-1))  # (d_sae,)
        grad_x = grad_W = grad_b_dec = None
        if ctx.needs_input_grad[1]:
            grad_W = bag_rows(indices, g, xc.to(W_enc.dtype), d_sae).T.contiguous()
        if ctx.needs_input_grad[3]:
            grad_b_dec = -(W_enc @ grad_b_enc)  # (d_in,)
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, W_enc.T.contiguous(), mode="sum",
                                     per_sample_weights=g)  # (N, d_in)
        grad_b = grad_b_enc if ctx.needs_input_grad[2] else None
        return grad_x, grad_W, grad_b, grad_b_dec, None, None, None


class SparseDecode(torch.autograd.Function):
    """``Σ_j values[:, j] · W_dec[indices[:, j]]`` (N, d_in), sparse backward."""

    @staticmethod
    def forward(ctx: Any, indices: Tensor, values: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(indices, values, W_dec)
        return F.embedding_bag(indices, W_dec, mode="sum",
                               per_sample_weights=values.to(W_dec.dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        indices, values, W_dec = ctx.saved_tensors
        grad_values = grad_W = None
        if ctx.needs_input_grad[1]:  # torch's own kernel, without a gradient for W_dec
            with torch.enable_grad():
                v = values.detach().requires_grad_()
                out = F.embedding_bag(indices, W_dec.detach(), mode="sum",
                                      per_sample_weights=v.to(W_dec.dtype))
                (grad_values,) = torch.autograd.grad(out, v, grad)
        if ctx.needs_input_grad[2]:
            grad_W = bag_rows(indices, values.detach(), grad.to(W_dec.dtype), W_dec.shape[0])
        return None, grad_values, grad_W


def select_pre_acts(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, indices: Tensor,
                    xc: Tensor, pre: Tensor) -> Tensor:
    """Pre-activations at ``indices`` (N, K) with the sparse backward of :class:`SelectedPreActs`.

    ``xc = x - b_dec`` (N, d_in) and ``pre = xc @ W_enc + b_enc`` (N, d_sae) must have been
    computed without gradient from the same tensors.
    """
    out: Tensor = SelectedPreActs.apply(x, W_enc, b_enc, b_dec, indices, xc.detach(),
                                        pre.detach())
    return out


def select_pre_acts_dense(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
                          indices: Tensor) -> Tensor:
    """The eager twin of :func:`select_pre_acts`: autograd through the dense product."""
    pre = (x.to(W_enc.dtype) - b_dec) @ W_enc + b_enc  # (N, d_sae)
    return pre.gather(1, indices)


def sparse_decode(indices: Tensor, values: Tensor, W_dec: Tensor) -> Tensor:
    """``Σ_j values[:, j] · W_dec[indices[:, j]]``: (N, K) -> (N, d_in), sparse backward
    (:class:`SparseDecode`); equals ``SAE.decode_rows``."""
    out: Tensor = SparseDecode.apply(indices, values, W_dec)
    return out
