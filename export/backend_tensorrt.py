"""The ``tensorrt`` feature-runtime backend: engines from :mod:`export.trt_engine` on CUDA.

Inputs and outputs are torch CUDA tensors whose addresses are handed to the execution
context; work is enqueued on torch's current stream. Untested in CI (no GPU there).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .errors import ExportError, require
from .folder import ExportManifest, GraphEntry
from .runtime import FeatureRuntime, RuntimeConfig
from .trt_engine import TokenProfile, build_engine


class TensorRTRuntime(FeatureRuntime):
    """One engine and execution context per graph, built or loaded on first use."""

    backend = "tensorrt"
    min_axis = 1  # optimisation profiles start at 1 on the watch / edit axes

    def __init__(self, manifest: ExportManifest, config: RuntimeConfig) -> None:
        self.trt = require("tensorrt", purpose="the tensorrt feature runtime")
        if not config.device.startswith("cuda") or not torch.cuda.is_available():
            raise ExportError(f"the tensorrt backend needs a CUDA device; device="
                              f"{config.device!r}, torch.cuda.is_available()="
                              f"{torch.cuda.is_available()}")
        super().__init__(manifest.layout, config.device, config.precision)
        self.manifest, self.config = manifest, config
        self.profile = TokenProfile(max_tokens=config.max_tokens,
                                    opt_tokens=min(256, config.max_tokens))
        self.engines: dict[tuple[str, int | None], tuple[Any, Any, GraphEntry]] = {}

    def _engine(self, graph: str, layer: int | None = None) -> tuple[Any, Any, GraphEntry]:
        if (graph, layer) not in self.engines:
            entry = self.manifest.graph(graph, self.precision, layer)
            path = build_engine(self.manifest, entry, profile=self.profile,
                                cache=self.config.engine_cache)
            runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise ExportError(f"TensorRT could not load {path}; delete it to rebuild")
            self.engines[graph, layer] = (engine, engine.create_execution_context(), entry)
        return self.engines[graph, layer]

    def run(self, graph: str, inputs: list[Tensor], layer: int | None = None) -> list[Tensor]:
        engine, context, entry = self._engine(graph, layer)
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream()
            for spec, x in zip(entry.spec.inputs, inputs, strict=True):
                context.set_input_shape(spec.name, tuple(x.shape))
                context.set_tensor_address(spec.name, x.data_ptr())
            outputs = []
            for spec in entry.spec.outputs:
                shape = tuple(context.get_tensor_shape(spec.name))
                dtype = torch.int32 if engine.get_tensor_dtype(spec.name) == \
                    self.trt.DataType.INT32 else _TORCH[spec.dtype]
                out = torch.empty(shape, dtype=dtype, device=self.device)
                context.set_tensor_address(spec.name, out.data_ptr())
                outputs.append(out)
            if not context.execute_async_v3(stream.cuda_stream):
                raise ExportError(f"TensorRT execution of {entry.file} failed")
        return [o.long() if o.dtype == torch.int32 else o for o in outputs]


_TORCH = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}
