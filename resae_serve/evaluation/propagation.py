"""Linear-propagation check: does a feature added at layer m reach layer m+1 as ``A_{m+1} δ``?

For a sample of features of dictionary layer ``m`` (those that fired on the batch), add
``δ = α · s_m · d_{m,i}`` to the block output at ``m`` in the live model (kept positions only;
``α`` is the layer's mean active code, a typical steering strength) and measure, at the next
dictionary layer, the actual change ``Δh = h'_{m+1} − h_{m+1}`` against the affine
prediction ``A_{m+1} δ``: per-token cosine and norm ratio ``‖Δh‖ / ‖A δ‖`` and the pooled
``R² = 1 − Σ‖Δh − A δ‖² / Σ‖Δh‖²``. Then how much of the change the next SAE encodes as new
features: ``new_fraction = sqrt(Σ‖s_{m+1} (D(z') − D(z))‖² / Σ‖Δh‖²)`` and the mean number of
latents that switch on. A ReSAE's residual encoder subtracts ``A h_m``, so a change carried
forward linearly should not re-appear there; a layerwise SAE has to re-encode it.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from resae_serve.evaluation.chain import inference_resae, teacher_forced
from resae_serve.evaluation.hooks import BlockFn, forward_until, recorder, replace_at
from resae_serve.resae import ReSAE
from resae_serve.windows import TokenWindows

logger = logging.getLogger(__name__)


class PropagationResult(NamedTuple):
    """Linear-propagation statistics of one pair of consecutive dictionary layers."""

    layer: int
    """Layer ``m`` where features are added."""
    next_layer: int
    """Layer ``m+1`` where the change is measured."""
    n_features: int
    """Features sampled (each its own forward pass)."""
    alpha: float
    """Code strength added (the layer's mean active code)."""
    cosine: float
    """Mean cos(Δh, A δ) over features and tokens."""
    norm_ratio: float
    """Mean ‖Δh‖ / ‖A δ‖ over features and tokens."""
    linear_r2: float
    """Pooled ``1 − Σ‖Δh − A δ‖² / Σ‖Δh‖²``."""
    new_fraction: float
    """Pooled norm of the next SAE's decoded change relative to ‖Δh‖."""
    new_latents: float
    """Mean number of next-layer latents that switch on per token."""


class _Sums:
    def __init__(self) -> None:
        self.cos = self.ratio = self.new_on = 0.0
        self.err = self.change = self.new = 0.0
        self.n = 0

    def add(self, delta: torch.Tensor, predicted: torch.Tensor, new: torch.Tensor,
            switched_on: torch.Tensor) -> None:
        d64, p64 = delta.double(), predicted.double().expand_as(delta)
        self.cos += float(F.cosine_similarity(d64, p64, dim=-1, eps=1e-12).sum())
        self.ratio += float((d64.norm(dim=-1) / p64.norm(dim=-1).clamp_min(1e-12)).sum())
        self.err += float((d64 - p64).pow(2).sum())
        self.change += float(d64.pow(2).sum())
        self.new += float(new.double().pow(2).sum())
        self.new_on += float(switched_on.sum())
        self.n += len(delta)


def _add_at(keep: torch.Tensor, delta: torch.Tensor) -> BlockFn:
    def fn(hidden: torch.Tensor) -> torch.Tensor:
        return replace_at(hidden, keep, hidden[keep] + delta)
    return fn


@torch.no_grad()
def linear_propagation(
    model: nn.Module, windows: TokenWindows, resae: ReSAE, *, affine_from: ReSAE | None = None,
    n_features: int = 8, seed: int = 0,
) -> list[PropagationResult]:
    """Check every pair of consecutive layers (see module docstring); [] without affine maps.

    ``affine_from``: a resae-mode dictionary over the same layers whose ``A`` serves as the
    prediction for a layerwise ``resae``.
    """
    resae = inference_resae(resae)
    maps = resae if resae.mode == "resae" else affine_from
    if maps is None or len(resae.layers) < 2:
        return []
    if maps.mode != "resae" or maps.layers != resae.layers:
        raise ValueError(f"affine_from must be a resae-mode dictionary over layers "
                         f"{list(resae.layers)}; got {maps.mode} over {list(maps.layers)}")
    device = next(model.parameters()).device
    ids, attn = windows.input_ids.to(device), windows.attention_mask.to(device)
    keep = windows.keep.to(device)
    clean: dict[int, torch.Tensor] = {}
    forward_until(model, ids, attn, {layer: recorder(clean, layer) for layer in resae.layers},
                  stop_after=resae.layers[-1])
    acts = [clean[layer][keep].float() for layer in resae.layers]
    steps = teacher_forced(resae, acts)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(len(resae.layers) - 1):
        layer, nxt = resae.layers[i], resae.layers[i + 1]
        codes = steps[i].codes
        alive = (codes > 0).any(dim=0).nonzero().flatten().cpu()
        if not len(alive):
            logger.warning("no feature of layer %d fired on the batch; skipped", layer)
            continue
        chosen = alive[torch.randperm(len(alive), generator=g)[:n_features]]
        alpha = float(codes[codes > 0].mean())
        sae_next, scale_next = resae.saes[i + 1], resae.scales[i + 1]
        z_clean = steps[i + 1].codes
        A, _ = maps.affine_map(i + 1)
        sums = _Sums()
        for feature in chosen.tolist():
            delta = alpha * resae.scales[i] * resae.saes[i].W_dec[feature]          # (d,)
            after: dict[int, torch.Tensor] = {}
            forward_until(model, ids, attn, {layer: _add_at(keep, delta),
                                             nxt: recorder(after, nxt)}, stop_after=nxt)
            h_next = after[nxt][keep].float()
            change = h_next - acts[i + 1]                                            # (N, d)
            predicted = delta[None] @ A.to(delta.dtype).T                            # (1, d)
            z_after = sae_next.encode(resae.sae_input(i + 1, h_next, acts[i] + delta))
            new = scale_next * (sae_next.decode(z_after) - sae_next.decode(z_clean))
            sums.add(change, predicted, new, (z_after > 0) & ~(z_clean > 0))
        result = PropagationResult(
            layer, nxt, len(chosen), alpha, sums.cos / sums.n, sums.ratio / sums.n,
            1 - sums.err / max(sums.change, 1e-30), (sums.new / max(sums.change, 1e-30)) ** 0.5,
            sums.new_on / sums.n,
        )
        logger.info("propagation %d -> %d: cos %.3f, norm ratio %.3f, R2 %.3f, new %.3f",
                    layer, nxt, result.cosine, result.norm_ratio, result.linear_r2,
                    result.new_fraction)
        out.append(result)
    return out
