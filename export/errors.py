"""Errors of the exporter and the feature runtime, and lazy imports of optional packages.

onnx, onnxscript and onnxruntime come with the ``cpu`` extra; ``tensorrt`` and
``onnxruntime-gpu`` with the ``gpu`` extra. They are imported where they are used, through
:func:`require`, so a missing one fails with the package name and the command that installs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from resae_serve.errors import ResaeError

INSTALL_HINTS = {
    "onnx": "pip install 'resae-serve[cpu]'  (or: pip install onnx)",
    "onnxscript": "pip install 'resae-serve[cpu]'  (or: pip install onnxscript)",
    "onnxruntime": "pip install 'resae-serve[cpu]' on CPU machines, "
                   "pip install 'resae-serve[gpu]' on CUDA machines",
    "tensorrt": "pip install 'resae-serve[gpu]'  (needs an NVIDIA GPU and driver)",
}


class ExportError(ResaeError):
    """An export, engine build or runtime was asked for something it cannot do."""


class ParityError(ExportError):
    """An exported graph's outputs differ from the torch ``ReSAE`` beyond the tolerance."""


class MissingDependencyError(ExportError):
    """An optional package needed for this step is not installed."""


def require(module: str, *, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        hint = INSTALL_HINTS.get(top, f"pip install {top}")
        raise MissingDependencyError(
            f"{purpose} needs the Python package {top!r}, which is not installed "
            f"({exc}); install it with: {hint}"
        ) from exc
