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

from resae_serve.saes.base import SAE

logger = logging.getLogger(__name__)


def onednn_ops() -> Any:
    """vLLM's CPU ops module when it has oneDNN matmul, else ``None``."""
    try:
        from vllm import _custom_ops as ops
    except ImportError:
        return None
    return ops if getattr(ops, "_supports_onednn", False) else None


class EncoderGemm:
    """``u -> (u - b_dec) @ W_enc + b_enc`` (the SAE's pre-activations) and ``v -> v @ W_enc``.

    ``b_dec`` is folded into the bias (``c = b_enc - b_dec @ W_enc``, in float64), so the
    pre-activations are one GEMM with a bias.
    """

    @torch.no_grad()
    def __init__(self, sae: SAE, *, packed: bool = True) -> None:
        """``packed`` uses vLLM's oneDNN matmul on CPU. Only the model's own thread may: it
        keeps per-thread-number scratch memory, and a second thread running it at the same time
        crashes the worker (seen as a segfault), so the monitor thread passes ``False``."""
        self.W_enc = sae.W_enc.detach()
        self.dtype = self.W_enc.dtype
        self.bias = (sae.b_enc.double() - sae.b_dec.double() @ self.W_enc.double()
                     ).to(self.dtype)
        self._ops: Any = onednn_ops() if packed and self.W_enc.device.type == "cpu" else None
        self._handler: Any = None
        if self._ops is not None:
            try:
                self._handler = self._ops.create_onednn_mm(self.W_enc.contiguous(), 32)
            except RuntimeError as err:
                logger.warning("no oneDNN matmul for the SAE encoder (%s); using torch", err)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        """Pre-activations (N, d_sae) of SAE inputs ``u`` (N, d_in) in ``dtype``."""
        if self._handler is not None:
            return self._ops.onednn_mm(self._handler, u, self.bias)
        return torch.addmm(self.bias, u, self.W_enc)

    def linear(self, v: torch.Tensor) -> torch.Tensor:
        """``v @ W_enc`` (no bias): how pre-activations move when the input moves by ``v``."""
        if self._handler is not None:
            return self._ops.onednn_mm(self._handler, v, None)
        return v @ self.W_enc
