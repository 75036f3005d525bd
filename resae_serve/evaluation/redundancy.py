"""Decoder redundancy between consecutive dictionary layers (docs/ARCHITECTURE.md §2).

For each latent of layer m ≥ 1: the largest ``|cos|`` between its decoder row and the rows of
layer m − 1, raw and after mapping those rows forward by ``A_m`` (``A_m d_{m−1,j}``: where a
feature of the previous layer lands at layer m if the stream carried it linearly). High values
mean layer m spends latents on directions layer m − 1 already has. A layerwise dictionary has
no maps of its own; pass a ReSAE over the same layers as ``affine_from`` to get the mapped
numbers for it too.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from resae_serve.resae import ReSAE

THRESHOLDS = (0.7, 0.9)
"""Cut-offs whose exceedance fractions are reported."""


class LayerRedundancy(NamedTuple):
    """Redundancy of one later layer against the layer before it."""

    layer: int
    """Model block index of the later layer."""
    previous: int
    """Model block index of the layer before it in the dictionary."""
    raw: torch.Tensor
    """(d_sae,) max |cos| of each decoder row to the previous layer's rows."""
    mapped: torch.Tensor | None
    """(d_sae,) the same against ``A_m`` times the previous rows (None without maps)."""

    def fractions(self) -> dict[str, float | None]:
        """Fraction of latents above each of :data:`THRESHOLDS`, raw and mapped."""
        out: dict[str, float | None] = {}
        for t in THRESHOLDS:
            out[f"raw>{t}"] = float((self.raw > t).double().mean())
            out[f"mapped>{t}"] = (None if self.mapped is None
                                  else float((self.mapped > t).double().mean()))
        return out


def max_abs_cosine(rows: torch.Tensor, others: torch.Tensor, *, chunk: int = 4096,
                   ) -> torch.Tensor:
    """For each row of ``rows (n, d)`` the largest |cos| to any row of ``others (m, d)``."""
    a = rows.float() / rows.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = others.float() / others.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.cat([(a[i:i + chunk] @ b.T).abs().amax(dim=1) for i in range(0, len(a), chunk)])


@torch.no_grad()
def redundancy(resae: ReSAE, *, affine_from: ReSAE | None = None) -> list[LayerRedundancy]:
    """Redundancy of every layer after the first (see module docstring)."""
    maps = resae if resae.mode == "resae" else affine_from
    if maps is not None and (maps.mode != "resae" or maps.layers != resae.layers):
        raise ValueError(f"affine_from must be a resae-mode dictionary over layers "
                         f"{list(resae.layers)}; got {maps.mode} over {list(maps.layers)}")
    out = []
    for i in range(1, len(resae.layers)):
        current, previous = resae.saes[i].W_dec, resae.saes[i - 1].W_dec      # (n, d), (m, d)
        mapped = None
        if maps is not None:
            A, _ = maps.affine_map(i)
            mapped = max_abs_cosine(current, previous.float() @ A.float().T)
        out.append(LayerRedundancy(resae.layers[i], resae.layers[i - 1],
                                   max_abs_cosine(current, previous), mapped))
    return out
