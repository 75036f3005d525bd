"""Codes of a TopK SAE at a few features, from a bfloat16 GEMM with a certified error bound.

Clamp, scale and ablate read ``z_f`` of the edited features only, and for a TopK SAE
``z_f = relu(pre_f)`` when ``pre_f`` is among the ``k`` largest pre-activations of the token,
else 0. So the op needs the exact ``pre_f`` (E dot products) and the k-th largest value ``t``,
but not ``t`` exactly: only which side of it ``pre_f`` lies on. A bfloat16 GEMM (about twice
the speed of float32 on AVX-512 BF16 cores) gives every pre-activation to within a bound ``B``
per token (below), hence ``t`` to within ``B`` (order statistics move no more than the values).
``pre_f > t̃ + B`` means selected, ``pre_f < t̃ − B`` means not (and ``pre_f <= 0`` means a code
of 0 either way). For the rare feature in between, ``f`` is selected when fewer than ``k``
features have a larger pre-activation: those whose screened value is above ``pre_f`` by more than
``B`` surely do, those below by more than ``B`` surely do not, and the few within ``B`` of it are
computed exactly. So every code equals the float32 encode's (up to float32 rounding).

Bound, for ``pre_j = u·W_j + c_j`` with ``u`` and ``W`` rounded to bfloat16 (relative error
``2^-8`` each), products summed in float32 over ``d`` terms and the sum rounded to bfloat16::

    |pre~_j − pre_j| <= ((1 + 2^-8)^2 − 1 + 1.01·d·2^-24 + 2^-8·(1 + 2^-6)) Σ_d |u_d W_dj|
                     <= β · ||u|| · max_j ||W_j||          (Cauchy–Schwarz; β ≈ 0.0118 at d=576)

plus ``2^-23 (||u|| max_j ||W_j|| + max_j |c_j|)`` for the float32 bias add, and as much again as
the float32 accumulation for the exact ``pre_f`` (``1.01·d·2^-24``). Only used where the GEMM
accumulates in float32 (oneDNN on CPU); on other devices the op stays in float32.

Memory: a bfloat16 copy of ``W_enc`` and a float32 copy of its transpose (whose rows gather fast
for the exact ``pre_f``).
"""

from __future__ import annotations

from typing import Any

import torch

from resae_serve.engine.gemm import EncoderGemm, onednn_ops
from resae_serve.saes.topk import TopKSAE

SAFETY = 1.05
"""Margin on top of the derived bound ``β`` (module docstring)."""


def bound_factor(d_in: int) -> float:
    """``β`` for inputs of width ``d_in``, times :data:`SAFETY`."""
    return SAFETY * ((1 + 2**-8) ** 2 - 1 + 2.02 * d_in * 2**-24 + 2**-8 * (1 + 2**-6)
                     + 2**-23)


class TopKScreen:
    """``z`` at chosen features of a TopK SAE: bfloat16 screening, float32 where undecided."""

    @torch.no_grad()
    def __init__(self, sae: TopKSAE, bias: torch.Tensor, ops: Any) -> None:
        """``bias``: the pre-activations' bias with ``b_dec`` folded in (``EncoderGemm.bias``)."""
        W = sae.W_enc.detach().float()
        self.k = sae.config.k
        self.bias = bias.float()
        self.columns = W.t().contiguous()                                  # (d_sae, d_in)
        self.bound_scale = bound_factor(W.shape[0]) * float(W.norm(dim=0).max())
        self.bound_floor = SAFETY * 2**-23 * float(self.bias.abs().max())
        self._ops = ops
        self._handler = ops.create_onednn_mm(W.bfloat16().contiguous(), 32)
        self.reads = 0
        self.reads_resolved_exactly = 0

    @classmethod
    def for_sae(cls, sae: Any, gemm: EncoderGemm) -> TopKScreen | None:
        """A screen when it applies: a TopK SAE (not a subclass), float32 weights on a CPU with
        vLLM's oneDNN kernels and bfloat16 support; otherwise ``None`` (float32 encode)."""
        ops = onednn_ops()
        if (type(sae) is not TopKSAE or ops is None or sae.W_enc.dtype != torch.float32
                or sae.W_enc.device.type != "cpu" or not torch.backends.mkldnn.is_available()
                or not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return None
        try:
            return cls(sae, gemm.bias, ops)
        except RuntimeError:
            return None

    @torch.no_grad()
    def codes_at(self, u: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """``z[n, feature[n, e]]`` (N, E) for SAE inputs ``u`` (N, d_in) in float32."""
        approx = self._ops.onednn_mm(self._handler, u.bfloat16(), None).float().add_(self.bias)
        kth = approx.topk(self.k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)  # (N, 1)
        pre = torch.bmm(self.columns[feature], u.unsqueeze(2)).squeeze(2) + self.bias[feature]
        bound = self.bound_scale * u.norm(dim=1, keepdim=True) + self.bound_floor   # (N, 1)
        selected = pre - kth > bound
        undecided = (pre > 0) & ~selected & (pre - kth >= -bound)
        z = torch.where(selected, pre.relu(), torch.zeros_like(pre))
        self.reads += pre.numel()
        for n, e in undecided.nonzero().tolist():                               # rare
            z[n, e] = self._resolve(u[n], approx[n], float(bound[n]), int(feature[n, e]),
                                    float(pre[n, e]))
        return z

    def _resolve(self, u: torch.Tensor, approx: torch.Tensor, bound: float, f: int,
                 pre_f: float) -> float:
        """``z_f`` of one token: ``pre_f`` if fewer than ``k`` pre-activations exceed it."""
        self.reads_resolved_exactly += 1
        above = int((approx - bound > pre_f).sum())
        band = ((approx - bound <= pre_f) & (approx + bound >= pre_f)).nonzero().squeeze(1)
        band = band[band != f]
        exact = self.columns[band] @ u + self.bias[band]
        above += int((exact > pre_f).sum())
        return max(pre_f, 0.0) if above < self.k else 0.0
