"""The ``onnxruntime`` feature-runtime backend: the exported graphs on CPU, CUDA or TensorRT.

On CPU, tensors cross as numpy views (no copy). On a GPU, inputs and preallocated outputs are
bound with IO binding to the torch tensors' device memory, so nothing visits the host. The
TensorRT execution provider caches its engines (keyed by graph file) under the engine cache.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor

from resae_serve.cache import cache_dir

from .errors import ExportError, MissingDependencyError, require
from .folder import ExportManifest, GraphEntry
from .runtime import FeatureRuntime, RuntimeConfig, axis_sizes, resolve_shape
from .spec import GraphSpec
from .trt_engine import TokenProfile

logger = logging.getLogger(__name__)

_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
          "tensorrt": "TensorrtExecutionProvider"}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}
_NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


class OnnxRuntime(FeatureRuntime):
    """One lazily created ``InferenceSession`` per graph."""

    backend = "onnxruntime"

    def __init__(self, manifest: ExportManifest, config: RuntimeConfig) -> None:
        super().__init__(manifest.layout, config.device, config.precision)
        self.ort = require("onnxruntime", purpose="the onnxruntime feature runtime")
        self.manifest, self.config = manifest, config
        self.provider = self._provider()
        if self.provider == "tensorrt":
            self.min_axis = 1  # its optimisation profiles start at 1 on watch / edit axes
        self.sessions: dict[tuple[str, int | None], tuple[Any, GraphEntry]] = {}

    def _provider(self) -> str:
        config, gpu = self.config, self.device.type == "cuda"
        wanted = config.provider if config.provider != "auto" else "cpu"
        if config.provider == "auto" and gpu:
            available = self.ort.get_available_providers()
            wanted = "tensorrt" if _NAMES["tensorrt"] in available else "cuda"
        if (wanted == "cpu") == gpu:
            raise ExportError(f"provider={wanted!r} does not run on "
                              f"device={config.device!r}; use provider=auto")
        if _NAMES[wanted] not in self.ort.get_available_providers():
            raise MissingDependencyError(
                f"onnxruntime has no {_NAMES[wanted]} here (available: "
                f"{self.ort.get_available_providers()}); install it with: "
                "pip install 'resae-serve[gpu]' (onnxruntime-gpu, tensorrt)")
        return wanted

    def _providers(self, spec: GraphSpec) -> list[Any]:
        device_id = {"device_id": self.device.index or 0}
        cuda = (_NAMES["cuda"], device_id)
        if self.provider == "cpu":
            return [_NAMES["cpu"]]
        if self.provider == "cuda":
            return [cuda, _NAMES["cpu"]]
        # Explicit profiles over the token axis, so the engine is built once, not per new size.
        shapes = TokenProfile(max_tokens=self.config.max_tokens,
                              opt_tokens=min(256, self.config.max_tokens)).shapes(spec)
        profile = {key: ",".join(f"{name}:{'x'.join(map(str, s[i]))}"
                                 for name, s in shapes.items())
                   for i, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes",
                                            "trt_profile_max_shapes"))}
        trt = {**device_id, **profile, "trt_engine_cache_enable": True,
               "trt_engine_cache_path": str(self.config.engine_cache or cache_dir("tensorrt")),
               "trt_fp16_enable": self.precision == "float16"}
        return [(_NAMES["tensorrt"], trt), cuda, _NAMES["cpu"]]

    def session(self, graph: str, layer: int | None = None) -> tuple[Any, GraphEntry]:
        """The session of ``graph`` (of ``layer``, for ``encode_layer``) in this runtime's
        precision (created on first use)."""
        key = (graph, layer)
        if key not in self.sessions:
            entry = self.manifest.graph(graph, self.precision, layer)
            options = self.ort.SessionOptions()
            options.log_severity_level = 3
            if self.config.threads:
                options.intra_op_num_threads = self.config.threads
            if not self.config.allow_spinning:
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            path = str(self.manifest.path(entry))
            providers = self._providers(entry.spec)
            self.sessions[key] = (
                self.ort.InferenceSession(path, options, providers=providers), entry)
            logger.info("onnxruntime session for %s on %s", entry.file, self.provider)
        return self.sessions[key]

    def run(self, graph: str, inputs: list[Tensor], layer: int | None = None) -> list[Tensor]:
        session, entry = self.session(graph, layer)
        if self.device.type == "cpu":
            feeds = {t.name: x.numpy() for t, x in zip(entry.spec.inputs, inputs, strict=True)}
            return [torch.from_numpy(o) for o in session.run(entry.spec.output_names, feeds)]
        return self._run_bound(session, entry, inputs)

    def _run_bound(self, session: Any, entry: GraphEntry, inputs: list[Tensor]) -> list[Tensor]:
        """IO binding: inputs and outputs stay in the torch tensors' GPU memory."""
        device_id = self.device.index or 0
        binding = session.io_binding()
        for spec, x in zip(entry.spec.inputs, inputs, strict=True):
            binding.bind_input(spec.name, "cuda", device_id, _NUMPY[spec.dtype],
                               list(x.shape), x.data_ptr())
        sizes = axis_sizes(entry.spec.inputs, inputs)
        outputs = []
        for spec in entry.spec.outputs:
            out = torch.empty(resolve_shape(spec.dims, sizes), dtype=_TORCH[spec.dtype],
                              device=self.device)
            binding.bind_output(spec.name, "cuda", device_id, _NUMPY[spec.dtype],
                                list(out.shape), out.data_ptr())
            outputs.append(out)
        # onnxruntime runs on its own stream: the inputs must be complete before it reads them.
        torch.cuda.current_stream(self.device).synchronize()
        session.run_with_iobinding(binding)
        return outputs
