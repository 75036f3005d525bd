"""The op's encoder GEMM, ``pre = u @ W_enc + c``, with weights packed once for the CPU.

On CPU it uses vLLM's prepacked oneDNN matmul (``create_onednn_mm`` / ``onednn_mm``, what vLLM's
own linear layers run on CPU, weights reordered once into oneDNN's blocked layout): at decode
sizes (32 rows against four 576 × 4608 encoders) it takes about half the time of
``torch.matmul`` (``benchmarks/RESULTS.md``). Elsewhere, or without vLLM's CPU kernels,
``torch.addmm``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from resae_serve.resae import ReSAE
from resae_serve.saes.base import SAE

logger = logging.getLogger(__name__)


def onednn_ops() -> Any:
    """vLLM's CPU ops module when it has oneDNN matmul, else ``None``."""
    try:
        from vllm import _custom_ops as ops
    except ImportError:
        return None
    return ops if getattr(ops, "_supports_onednn", False) else None


class PackedLinear:
    """``x -> x @ weight + bias`` for a fixed ``weight`` (in, out), packed once for oneDNN.

    ``packed`` uses vLLM's oneDNN matmul on CPU. Only the model's own thread may: it keeps
    per-thread-number scratch memory, and a second thread running it at the same time crashes
    the worker (seen as a segfault), so the monitor thread passes ``False`` (``torch.addmm``).
    """

    @torch.no_grad()
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, *, packed: bool = True) -> None:
        self.weight, self.bias, self.dtype = weight.detach(), bias.detach(), weight.dtype
        self._ops: Any = onednn_ops() if packed and weight.device.type == "cpu" else None
        self._handler: Any = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in) in ``dtype`` -> (N, out)."""
        if self._ops is not None and self._handler is None:
            self._pack()                       # on first use: a second copy of the weight
        if self._handler is not None:
            return self._ops.onednn_mm(self._handler, x, self.bias)
        return torch.addmm(self.bias, x, self.weight)

    def _pack(self) -> None:
        try:
            self._handler = self._ops.create_onednn_mm(self.weight.contiguous(), 32)
        except RuntimeError as err:
            logger.warning("no oneDNN matmul for a %s weight (%s); using torch",
                           tuple(self.weight.shape), err)
            self._ops = None


class EncoderGemm(PackedLinear):
    """``u -> (u - b_dec) @ W_enc + b_enc``: the SAE's pre-activations in one GEMM with a bias
    (``b_dec`` folded in, ``c = b_enc - b_dec @ W_enc`` in float64)."""

    @torch.no_grad()
    def __init__(self, sae: SAE, *, packed: bool = True) -> None:
        W_enc = sae.W_enc.detach()
        bias = (sae.b_enc.double() - sae.b_dec.double() @ W_enc.double()).to(W_enc.dtype)
        super().__init__(W_enc, bias, packed=packed)


class SaeInputs:
    """The op's SAE inputs, ``ReSAE.sae_input`` with the affine prediction ``A h_prev + c`` as a
    packed matmul (one per residual layer)."""

    @torch.no_grad()
    def __init__(self, resae: ReSAE) -> None:
        self.resae = resae
        self._predict = [None] + [
            PackedLinear(A.detach().float().t().contiguous(), c.detach().float())
            for A, c in (resae.affine_map(i) for i in range(1, len(resae.layers)))
        ] if resae.mode == "resae" else [None] * len(resae.layers)
        self._scales = [float(s) for s in resae.scales]

    def __call__(self, i: int, h: torch.Tensor, h_prev: torch.Tensor | None) -> torch.Tensor:
        """``u_i`` (N, d) in float32 from block outputs ``h`` and ``h_prev`` (N, d)."""
        predict = self._predict[i]
        if predict is None:
            return h.float() / self._scales[i]
        if h_prev is None:
            return self.resae.sae_input(i, h.float(), None)       # raises the clear error
        return (h.float() - predict(h_prev.float())).div_(self._scales[i])
