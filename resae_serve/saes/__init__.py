"""Sparse autoencoders: TopK (default), BatchTopK, JumpReLU (inference form), ReLU + L1.

Parameters use the SAELens names and layout (``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, ``threshold [d_sae]``); build one from an
:class:`SAEConfig` with :func:`build_sae`, or from saved tensors with :func:`sae_from_tensors`.
"""

from resae_serve.saes.base import SAE, SparseCodes, TrainStepOutput
from resae_serve.saes.batchtopk import BatchTopKSAE
from resae_serve.saes.config import ARCHITECTURES, Architecture, SAEConfig
from resae_serve.saes.jumprelu import JumpReLUSAE
from resae_serve.saes.registry import SAE_REGISTRY, build_sae, sae_class, sae_from_tensors
from resae_serve.saes.relu import ReLUSAE
from resae_serve.saes.topk import TopKSAE

__all__ = [
    "ARCHITECTURES",
    "SAE",
    "SAE_REGISTRY",
    "Architecture",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "ReLUSAE",
    "SAEConfig",
    "SparseCodes",
    "TopKSAE",
    "TrainStepOutput",
    "build_sae",
    "sae_class",
    "sae_from_tensors",
]
