"""The op's encoder GEMM, ``pre = u @ W_enc + c``, with weights packed once for the CPU.

On CPU it uses vLLM's prepacked oneDNN matmul (``create_onednn_mm`` / ``onednn_mm``, what vLLM's
own linear layers run on CPU): at decode sizes (tens of rows against a 576 × 4608 encoder) it
takes about half the time of ``torch.matmul``, which repacks the weight on every call
(``benchmarks/RESULTS.md``). Elsewhere, or without vLLM's CPU kernels, ``torch.addmm``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from resae_serve.saes.base import SAE

logger = logging.getLogger(__name__)

PreActs = Callable[[torch.Tensor], torch.Tensor]


def _onednn() -> object | None:
    try:
        from vllm import _custom_ops as ops
    except ImportError:
        return None
    return ops if getattr(ops, "_supports_onednn", False) else None


@torch.no_grad()
def pre_acts_fn(sae: SAE) -> PreActs:
    """``u -> (u - b_dec) @ W_enc + b_enc`` for ``u`` (N, d_in) in ``W_enc``'s dtype.

    ``b_dec`` is folded into the bias (``c = b_enc - b_dec @ W_enc``, in float64), so the call
    is one GEMM with a bias.
    """
    W_enc = sae.W_enc.detach()
    bias = (sae.b_enc.double() - sae.b_dec.double() @ W_enc.double()).to(W_enc.dtype)
    ops = _onednn() if W_enc.device.type == "cpu" else None
    if ops is not None:
        try:
            handler = ops.create_onednn_mm(W_enc.contiguous(), 32)  # type: ignore[attr-defined]
        except RuntimeError as err:
            logger.warning("oneDNN matmul unavailable for the SAE encoder (%s); torch.addmm", err)
        else:
            return lambda u: ops.onednn_mm(handler, u, bias)  # type: ignore[attr-defined]
    return lambda u: torch.addmm(bias, u, W_enc)
