"""Which output tokens a feature's decoder direction promotes, through the unembedding.

The direction of feature ``f`` at dictionary layer ``i`` is its decoder row; in resae mode it
is carried to the last dictionary layer by the chain ``A_M ⋯ A_{i+1}`` first (how the stream
carries a change linearly, and how :meth:`ReSAE.decode` composes layers). It then goes
through the final norm's elementwise weight (centred first for a LayerNorm; the norm's
rescaling is positive and does not change the ranking) and the unembedding ``W_U``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from resae_serve.resae import ReSAE

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
"""Attribute of the base model holding the final norm, across Hugging Face families."""


class PromotedTokens(NamedTuple):
    """Top output tokens per feature of one layer."""

    promoted: torch.Tensor
    """(d_sae, k) token ids with the largest logit change, largest first."""
    suppressed: torch.Tensor
    """(d_sae, k) token ids with the most negative logit change, most negative first."""


def feature_directions(resae: ReSAE, i: int) -> torch.Tensor:
    """Decoder rows of layer ``i`` carried to the last dictionary layer: (d_sae, d)."""
    directions = resae.saes[i].W_dec.detach().float()
    if resae.mode == "resae":
        for j in range(i + 1, len(resae.layers)):
            A, _ = resae.affine_map(j)
            directions = directions @ A.float().T
    return directions


def _final_norm(model: nn.Module) -> tuple[torch.Tensor | None, bool]:
    """The final norm's elementwise weight (None if not found) and whether it centres."""
    base = getattr(model, "base_model", model)
    for name in FINAL_NORM_NAMES:
        module = getattr(base, name, None)
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Module) and isinstance(weight, torch.Tensor):
            return weight, isinstance(module, nn.LayerNorm)
    return None, False


def logit_effects(model: nn.Module, directions: torch.Tensor) -> torch.Tensor:
    """Logit change per token ``(n, V)`` of residual directions ``(n, d)`` at the last layer."""
    getter = getattr(model, "get_output_embeddings", None)
    weight = getattr(getter(), "weight", None) if callable(getter) else None
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{type(model).__name__} has no output embedding to unembed through")
    W_U = weight.detach().float()                                             # (V, d)
    directions = directions.to(W_U.device)
    gamma, centres = _final_norm(model)
    if centres:
        directions = directions - directions.mean(dim=-1, keepdim=True)
    if gamma is not None:
        directions = directions * gamma.detach().float()
    return directions @ W_U.T


@torch.no_grad()
def promoted_tokens(model: nn.Module, resae: ReSAE, i: int, k: int, *, chunk: int = 512,
                    ) -> PromotedTokens:
    """Top ``k`` promoted and suppressed tokens of every feature of dictionary layer ``i``."""
    directions = feature_directions(resae, i)
    promoted, suppressed = [], []
    for start in range(0, len(directions), chunk):
        logits = logit_effects(model, directions[start:start + chunk])       # (c, V)
        promoted.append(logits.topk(k, dim=1).indices.cpu())
        suppressed.append((-logits).topk(k, dim=1).indices.cpu())
    return PromotedTokens(torch.cat(promoted), torch.cat(suppressed))
