"""The ``torch`` feature-runtime backend: the graph modules of :mod:`export.graphs`, eager.

Runs wherever torch runs (CPU or CUDA) and needs no exported file: it is built from the
``ReSAE`` itself, or from the artifact an export folder names (checked by fingerprint).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from resae_serve.artifact import load_artifact
from resae_serve.resae import ReSAE

from .errors import ExportError
from .folder import ExportManifest, dictionary_fingerprint
from .graphs import as_float32, dictionary_layout, graph_module, nest_inputs
from .runtime import FeatureRuntime, RuntimeConfig
from .spec import GRAPHS


class TorchRuntime(FeatureRuntime):
    """Eager torch on ``config.device``; the same math the ONNX graphs were traced from."""

    backend = "torch"

    def __init__(self, resae: ReSAE, config: RuntimeConfig | None = None) -> None:
        config = config or RuntimeConfig(backend="torch")
        super().__init__(dictionary_layout(resae), config.device, config.precision)
        if config.device == "cpu" and config.threads:
            torch.set_num_threads(config.threads)
        resae = as_float32(resae)
        self.modules: dict[tuple[str, int | None], nn.Module] = {
            (name, None): graph_module(name, resae, config.precision).to(self.device)
            for name in GRAPHS if name != "encode_layer"}
        self.modules.update({("encode_layer", L): graph_module(
            "encode_layer", resae, config.precision, L).to(self.device) for L in resae.layers})

    @classmethod
    def from_manifest(cls, manifest: ExportManifest, config: RuntimeConfig) -> TorchRuntime:
        """Load the artifact the export was made from, refusing one that changed since."""
        source = manifest.artifact.get("path")
        if not source:
            raise ExportError(f"{manifest.folder}: the manifest names no source artifact; "
                              "build TorchRuntime(resae) directly")
        resae, _ = load_artifact(Path(source))
        if (found := dictionary_fingerprint(resae)) != manifest.fingerprint:
            raise ExportError(f"{source} now holds dictionary {found}, but {manifest.folder} "
                              f"was exported from {manifest.fingerprint}; export it again")
        return cls(resae, config)

    def run(self, graph: str, inputs: list[Tensor], layer: int | None = None) -> list[Tensor]:
        module = self.modules[graph, layer]
        with torch.inference_mode():
            return list(module(*nest_inputs(graph, inputs, len(self.layers))))
