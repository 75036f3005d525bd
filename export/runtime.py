"""The feature runtime: encode, intervention deltas and decode behind one small interface.

``encode_layer`` encodes one layer at a time with the caller's own tokens (the per-layer
``encode_layer`` graphs): the engine's monitor runs on it
(:mod:`resae_serve.engine.encoders`).

Backends (chosen by :class:`RuntimeConfig`): ``torch`` (eager, CPU or CUDA; the graph modules
of :mod:`export.graphs`), ``onnxruntime`` (the exported graphs; CPU, CUDA or TensorRT
execution providers, with IO binding on GPU so tensors stay on the device) and ``tensorrt``
(engines built from the graphs by :mod:`export.trt_engine`). Every backend takes and returns
torch tensors in the order and shapes of :mod:`export.spec`; inputs are checked here once, so
a bad layer, feature id or shape fails the same way whatever runs underneath.

Default backend per device (``backend="auto"``): on CPU ``onnxruntime`` when installed: it
encoded the SmolLM2 dictionary (4 layers, 576 -> 4608, k 32) 1.3-1.8x faster than torch eager
at 512-4096 tokens and 3.6-15x faster at 16-256 (benchmarks/RESULTS.md, "Feature runtime encode
throughput, CPU"). On CUDA ``torch``: no GPU was available to measure onnxruntime-CUDA or
TensorRT against it, torch is present wherever the model runs, and it needs no engine build;
choose ``onnxruntime`` or ``tensorrt`` explicitly there.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from resae_serve.interventions import EditOp, EditTable, InterventionError
from resae_serve.saes import SparseCodes

from .errors import ExportError
from .spec import PRECISIONS, DictionaryLayout, Precision

Backend = Literal["auto", "torch", "onnxruntime", "tensorrt"]
BACKENDS: tuple[str, ...] = get_args(Backend)
Provider = Literal["auto", "cpu", "cuda", "tensorrt"]
PROVIDERS: tuple[str, ...] = get_args(Provider)
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class RuntimeConfig:
    """Which backend runs the dictionary, where, and in which precision (set at start-up)."""

    backend: Backend = "auto"
    """``auto`` picks :func:`default_backend` for the device."""
    device: str = "cpu"
    """``cpu``, ``cuda`` or ``cuda:N``."""
    precision: Precision = "float32"
    """Graph precision; float16 needs graphs exported with ``--fp16`` (not for ``torch``)."""
    provider: Provider = "auto"
    """onnxruntime execution provider; ``auto``: CPU on CPU, TensorRT then CUDA on a GPU."""
    threads: int = 0
    """Intra-op threads for CPU backends; 0 leaves the runtime's default."""
    allow_spinning: bool = True
    """onnxruntime: intra-op threads spin-wait for work between runs (its default). Off for
    a caller that runs now and then beside other busy threads (the engine's monitor)."""
    engine_cache: Path | None = None
    """TensorRT engine folder; ``None``: ``<resae cache>/tensorrt``."""
    max_tokens: int = 4096
    """Largest token batch a TensorRT optimisation profile covers."""

    def __post_init__(self) -> None:
        for name, value, allowed in (("backend", self.backend, BACKENDS),
                                     ("precision", self.precision, PRECISIONS),
                                     ("provider", self.provider, PROVIDERS)):
            if value not in allowed:
                raise ExportError(f"{name}={value!r}; allowed: {', '.join(allowed)}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ExportError(f"device={self.device!r}; allowed: cpu, cuda, cuda:N")
        if self.threads < 0 or self.max_tokens < 1:
            raise ExportError(f"threads={self.threads}, max_tokens={self.max_tokens}; need "
                              "threads >= 0 and max_tokens >= 1")


def default_backend(device: str) -> str:
    """The backend ``auto`` means on ``device`` (see the module docstring for why)."""
    if device == "cpu" and importlib.util.find_spec("onnxruntime") is not None:
        return "onnxruntime"
    return "torch"


class EncodeOutput(NamedTuple):
    """What :meth:`FeatureRuntime.encode` returns."""

    codes: dict[int, SparseCodes]
    """Per layer: ``(tokens, k)`` int64 indices and values, values descending."""
    watched: dict[int, Tensor]
    """Per layer: ``(tokens, len(watch[layer]))`` dense codes of the watched features."""


class LayerCodes(NamedTuple):
    """What :meth:`FeatureRuntime.encode_layer` returns."""

    codes: SparseCodes
    """``(tokens, k)`` int64 indices and values, values descending."""
    watched: Tensor
    """``(tokens, len(watch))`` dense codes of the watched features."""


class FeatureRuntime(ABC):
    """Encode / intervention deltas / decode of one dictionary on one backend and device."""

    backend: str = ""
    min_axis: int = 0
    """Smallest size the backend accepts on watch / edit axes (TensorRT profiles need 1)."""

    def __init__(self, layout: DictionaryLayout, device: str, precision: str) -> None:
        self.layout = layout
        self.layers = layout.layers
        self.device = torch.device(device)
        self.precision = precision
        self.dtype = FLOAT_DTYPES[precision]

    @abstractmethod
    def run(self, graph: str, inputs: list[Tensor], layer: int | None = None) -> list[Tensor]:
        """Run ``graph`` (of ``layer``, for ``encode_layer``) on inputs in spec order (checked,
        on the device); outputs in order."""

    # ------------------------------------------------------------------ checks

    def _acts(self, acts: Mapping[int, Tensor]) -> list[Tensor]:
        missing = [L for L in self.layers if L not in acts]
        if missing:
            raise InterventionError(f"activations for layers {missing} are missing; this "
                                    f"dictionary needs {list(self.layers)}")
        shapes = {L: tuple(acts[L].shape) for L in self.layers}
        n = shapes[self.layers[0]][0] if shapes[self.layers[0]] else -1
        if any(len(s) != 2 or s != (n, self.layout.d_model) for s in shapes.values()):
            raise InterventionError(f"activations have shapes {shapes}; every layer needs the "
                                    f"same (tokens, {self.layout.d_model})")
        return [self._float(acts[L]) for L in self.layers]

    def _float(self, t: Tensor) -> Tensor:
        return t.to(self.device, self.dtype).contiguous()

    def _ids(self, t: Tensor | Sequence[int], i: int, what: str) -> Tensor:
        ids = torch.as_tensor(t, dtype=torch.int64).to(self.device).contiguous()
        d_sae = self.layout.d_sae[i]
        if ids.numel() and not (int(ids.min()) >= 0 and int(ids.max()) < d_sae):
            raise InterventionError(f"{what} at layer {self.layers[i]} must lie in "
                                    f"0..{d_sae - 1}; got {int(ids.min())}..{int(ids.max())}")
        return ids

    # ------------------------------------------------------------------ the interface

    def encode(self, acts: Mapping[int, Tensor],
               watch: Mapping[int, Tensor | Sequence[int]] | None = None) -> EncodeOutput:
        """Top-k codes per layer from clean activations ``{layer: (tokens, d_model)}``, and
        the dense codes of the feature ids in ``watch[layer]`` (none where not given)."""
        watch = watch or {}
        unknown = sorted(set(watch) - set(self.layers))
        if unknown:
            raise InterventionError(f"watch names layers {unknown}; this dictionary has "
                                    f"{list(self.layers)}")
        ids = [self._ids(watch.get(L, []), i, "watched feature ids").reshape(-1)
               for i, L in enumerate(self.layers)]
        widths = [len(w) for w in ids]
        ids = [w if len(w) >= self.min_axis else torch.zeros(self.min_axis, dtype=torch.int64,
                                                              device=self.device)
               for w in ids]
        out = self.run("encode", self._acts(acts) + ids)
        codes, watched = {}, {}
        for i, L in enumerate(self.layers):
            indices, values, seen = out[3 * i: 3 * i + 3]
            codes[L] = SparseCodes(indices.long(), values)
            watched[L] = seen[:, : widths[i]]
        return EncodeOutput(codes, watched)

    def encode_layer(self, layer: int, h: Tensor, h_prev: Tensor | None = None,
                     watch: Tensor | Sequence[int] = ()) -> LayerCodes:
        """Top-k codes of one layer from its block outputs ``h`` (tokens, d_model) and, for a
        residualized layer, the previous dictionary layer's ``h_prev`` of the same tokens; and
        the dense codes of the feature ids ``watch`` (the ``encode_layer`` graph)."""
        if layer not in self.layers:
            raise InterventionError(f"layer={layer}; this dictionary has {list(self.layers)}")
        i = self.layers.index(layer)
        d = self.layout.d_model
        if h.ndim != 2 or h.shape[1] != d:
            raise InterventionError(f"h of layer {layer} has shape {tuple(h.shape)}; need "
                                    f"(tokens, {d})")
        inputs = [self._float(h)]
        if self.layout.mode == "resae" and i > 0:
            if h_prev is None or tuple(h_prev.shape) != tuple(h.shape):
                raise InterventionError(
                    f"layer {layer} is residualized: h_prev (the block output of layer "
                    f"{self.layers[i - 1]}) must have the shape of h, {tuple(h.shape)}; got "
                    f"{None if h_prev is None else tuple(h_prev.shape)}")
            inputs.append(self._float(h_prev))
        ids = self._ids(watch, i, "watched feature ids").reshape(-1)
        width = len(ids)
        if width < self.min_axis:
            ids = torch.zeros(self.min_axis, dtype=torch.int64, device=self.device)
        indices, values, watched = self.run("encode_layer", [*inputs, ids], layer)
        return LayerCodes(SparseCodes(indices.long(), values), watched[:, :width])

    def intervention_deltas(self, acts: Mapping[int, Tensor],
                            tables: Mapping[int, EditTable]) -> dict[int, Tensor]:
        """Deltas ``{layer: (tokens, d_model)}`` for per-token edit tables (layers without a
        table get zeros). ``acts`` are the block outputs each layer sees in the same pass
        before its own edit; a residualized layer reads the previous layer as this pass's edits
        left it (``h + δ``; :meth:`ReSAE.intervention_deltas`)."""
        h = self._acts(acts)
        n = h[0].shape[0]
        unknown = sorted(set(tables) - set(self.layers))
        if unknown:
            raise InterventionError(f"edit tables name layers {unknown}; this dictionary has "
                                    f"{list(self.layers)}")
        flat: list[Tensor] = []
        for i, L in enumerate(self.layers):
            width = max(self.min_axis, 1)
            table = tables.get(L) or EditTable(*(torch.zeros(n, width, dtype=torch.int64),) * 2,
                                               torch.zeros(n, width))
            if not (table.feature.shape == table.op.shape == table.value.shape
                    and table.feature.ndim == 2 and table.feature.shape[0] == n):
                raise InterventionError(f"edit table of layer {L}: feature / op / value shapes "
                                        f"{[tuple(t.shape) for t in table]}; need equal "
                                        f"(tokens={n}, edits)")
            if table.feature.shape[1] < self.min_axis:  # pad with no-op slots
                pad = self.min_axis - table.feature.shape[1]
                table = EditTable(*(torch.cat([t, torch.zeros(n, pad, dtype=t.dtype,
                                                              device=t.device)], dim=1)
                                    for t in table))
            op = table.op.to(self.device, torch.int64).contiguous()
            if op.numel() and not (int(op.min()) >= 0 and int(op.max()) <= max(EditOp)):
                raise InterventionError(f"edit op codes at layer {L} must be EditOp values "
                                        f"0..{int(max(EditOp))}")
            flat += [self._ids(table.feature, i, "edited feature ids"), op,
                     self._float(table.value)]
        return dict(zip(self.layers, self.run("intervention", h + flat), strict=True))

    def decode(self, codes: Mapping[int, SparseCodes]) -> dict[int, Tensor]:
        """Reconstructions ``{layer: (tokens, d_model)}`` through the chain from sparse codes."""
        missing = [L for L in self.layers if L not in codes]
        if missing:
            raise InterventionError(f"codes for layers {missing} are missing")
        flat: list[Tensor] = []
        for i, L in enumerate(self.layers):
            indices, values = codes[L]
            if indices.shape != values.shape or indices.ndim != 2:
                raise InterventionError(f"codes of layer {L}: indices {tuple(indices.shape)} "
                                        f"and values {tuple(values.shape)}; need equal "
                                        "(tokens, slots)")
            flat += [self._ids(indices, i, "code indices"), self._float(values)]
        return dict(zip(self.layers, self.run("decode", flat), strict=True))


def open_runtime(export_dir: Path, config: RuntimeConfig | None = None) -> FeatureRuntime:
    """The runtime ``config`` asks for, over the export folder ``export_dir``."""
    from .folder import read_export_manifest

    config = config or RuntimeConfig()
    manifest = read_export_manifest(export_dir)
    backend = default_backend(config.device) if config.backend == "auto" else config.backend
    if backend == "torch":
        from .backend_torch import TorchRuntime

        return TorchRuntime.from_manifest(manifest, config)
    if backend == "onnxruntime":
        from .backend_onnxruntime import OnnxRuntime

        return OnnxRuntime(manifest, config)
    from .backend_tensorrt import TensorRTRuntime

    return TensorRTRuntime(manifest, config)


def resolve_shape(dims: Sequence[int | str], sizes: Mapping[str, int]) -> tuple[int, ...]:
    """Concrete shape of a spec tensor, given the sizes of its named axes."""
    return tuple(d if isinstance(d, int) else sizes[d] for d in dims)


def axis_sizes(specs: Sequence[object], inputs: Sequence[Tensor]) -> dict[str, int]:
    """Sizes of the named axes, read from inputs matching their specs (``TensorSpec``)."""
    sizes: dict[str, int] = {}
    for spec, t in zip(specs, inputs, strict=True):
        for d, n in zip(spec.dims, t.shape, strict=True):  # type: ignore[attr-defined]
            if isinstance(d, str):
                sizes[d] = int(n)
    return sizes


__all__ = ["BACKENDS", "EncodeOutput", "FeatureRuntime", "LayerCodes", "RuntimeConfig",
           "default_backend", "open_runtime"]
