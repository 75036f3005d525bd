"""ONNX and TensorRT export of ReSAE dictionaries, parity validation, feature runtimes.

Installed as ``resae_serve.export``: the top-level folder ``export/`` is mapped into the package
by ``pyproject.toml``, so no generic ``export`` module lands in site-packages.

    spec        graph names, named inputs/outputs, dynamic axes, opset, tolerances
    graphs      the torch modules graphs are traced from (and the torch runtime backend)
    convert     artifact -> ONNX graphs (torch.onnx dynamo exporter) + export_manifest.json
    validate    strict parity against the torch ReSAE, ParityError
    trt_engine  TensorRT engines with token-axis profiles, cached by fingerprint
    runtime     FeatureRuntime (encode / encode_layer / intervention deltas / decode) and
                its backends
    cache       exports built on demand for serving, keyed by the dictionary's fingerprint

    from resae_serve.export import export_artifact, validate_export, open_runtime
    export_artifact(Path("runs/dict"), Path("runs/dict.onnx"))
    validate_export(Path("runs/dict.onnx"))            # raises ParityError on a mismatch
    runtime = open_runtime(Path("runs/dict.onnx"))     # onnxruntime on CPU by default
"""

from .convert import export_artifact, export_resae
from .errors import ExportError, MissingDependencyError, ParityError
from .folder import ExportManifest, read_export_manifest
from .runtime import EncodeOutput, FeatureRuntime, LayerCodes, RuntimeConfig, open_runtime
from .spec import ExportConfig, GraphSpec, Tolerance, graph_spec
from .validate import ValidationReport, validate_export

__all__ = [
    "EncodeOutput",
    "ExportConfig",
    "ExportError",
    "ExportManifest",
    "FeatureRuntime",
    "GraphSpec",
    "LayerCodes",
    "MissingDependencyError",
    "ParityError",
    "RuntimeConfig",
    "Tolerance",
    "ValidationReport",
    "export_artifact",
    "export_resae",
    "graph_spec",
    "open_runtime",
    "read_export_manifest",
    "validate_export",
]
