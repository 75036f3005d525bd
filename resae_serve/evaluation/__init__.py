"""Evaluation of dictionaries: reconstruction, splicing, redundancy, linear propagation, reports.

Each module holds one measurement; :mod:`~resae_serve.evaluation.report` runs them all for
``resae eval``. Definitions follow docs/ARCHITECTURE.md §1.6 and §2.
"""

from resae_serve.evaluation.chain import ChainStep, chain_step, inference_resae, teacher_forced
from resae_serve.evaluation.propagation import PropagationResult, linear_propagation
from resae_serve.evaluation.reconstruction import (
    LayerMetrics,
    ReconstructionOutput,
    evaluate_layers,
)
from resae_serve.evaluation.redundancy import LayerRedundancy, max_abs_cosine, redundancy
from resae_serve.evaluation.splice import (
    SPLICE_MODES,
    CEResult,
    SpliceReport,
    error_preserving_hooks,
    evaluate_splicing,
    online_hooks,
)

__all__ = [
    "SPLICE_MODES",
    "CEResult",
    "ChainStep",
    "LayerMetrics",
    "LayerRedundancy",
    "PropagationResult",
    "ReconstructionOutput",
    "SpliceReport",
    "chain_step",
    "error_preserving_hooks",
    "evaluate_layers",
    "evaluate_splicing",
    "inference_resae",
    "linear_propagation",
    "max_abs_cosine",
    "online_hooks",
    "redundancy",
    "teacher_forced",
]
