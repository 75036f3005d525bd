"""Small dictionaries built in memory for ReSAE, artifact and export tests."""

from __future__ import annotations

import torch

from resae_serve.artifact import ModelIdentity
from resae_serve.resae import Mode, ReSAE
from resae_serve.saes import SAEConfig, build_sae

D_MODEL, D_SAE, K = 8, 32, 4
LAYERS = (1, 3)
IDENTITY = ModelIdentity(name="tiny", fingerprint="sha256:tiny", model_type="llama",
                         n_layers=4, d_model=D_MODEL)


def tiny_resae(mode: Mode = "resae", architecture: str = "topk", seed: int = 0) -> ReSAE:
    """Random SAEs (biases non-zero), random affine map, non-trivial scales."""
    torch.manual_seed(seed)
    config = SAEConfig(architecture=architecture, d_in=D_MODEL, d_sae=D_SAE,  # type: ignore[arg-type]
                       k=K)
    saes = [build_sae(config) for _ in LAYERS]
    with torch.no_grad():
        for sae in saes:
            sae.b_enc.normal_(0, 0.1)
            sae.b_dec.normal_(0, 0.1)
            sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
    affine = [None, (torch.eye(D_MODEL) + 0.2 * torch.randn(D_MODEL, D_MODEL),
                     0.1 * torch.randn(D_MODEL))] if mode == "resae" else None
    return ReSAE(LAYERS, saes, [2.0, 0.5], mode=mode, affine=affine)


def tiny_acts(n: int = 6, seed: int = 1) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {layer: 2 * torch.randn(n, D_MODEL, generator=g) for layer in LAYERS}
