"""Registry of SAE architectures keyed by the ``architecture`` string of :class:`SAEConfig`."""

from __future__ import annotations

import torch
from torch import Tensor

from resae_serve.saes.base import SAE
from resae_serve.saes.batchtopk import BatchTopKSAE
from resae_serve.saes.config import SAEConfig
from resae_serve.saes.jumprelu import JumpReLUSAE
from resae_serve.saes.relu import ReLUSAE
from resae_serve.saes.topk import TopKSAE

SAE_REGISTRY: dict[str, type[SAE]] = {
    cls.architecture: cls for cls in (TopKSAE, BatchTopKSAE, JumpReLUSAE, ReLUSAE)
}


def sae_class(architecture: str) -> type[SAE]:
    """The class registered for ``architecture``; unknown names raise ``ValueError``."""
    try:
        return SAE_REGISTRY[architecture]
    except KeyError:
        raise ValueError(f"architecture={architecture!r} is unknown; allowed: "
                         f"{', '.join(SAE_REGISTRY)}") from None


def build_sae(config: SAEConfig, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> SAE:
    """A freshly initialised SAE of ``config.architecture``."""
    return sae_class(config.architecture)(config, dtype=dtype, device=device)


def sae_from_tensors(config: SAEConfig, tensors: dict[str, Tensor]) -> SAE:
    """An SAE of ``config.architecture`` holding ``tensors`` (strict, see ``SAE.from_tensors``)."""
    return sae_class(config.architecture).from_tensors(config, tensors)
