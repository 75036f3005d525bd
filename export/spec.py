"""What an export is: graph names, named inputs and outputs, dynamic axes, opset, tolerances.

The spec is the contract between the exporter, the validation and every runtime (and any
consumer that never imports this project). Per dictionary layer ``L``, all tensors 2-D with the
token axis first::

    encode        h_L [tokens, d_model], watch_L [watch_L] int64
                  -> indices_L [tokens, k] int64, values_L [tokens, k], watched_L [tokens, watch_L]
    intervention  h_L [tokens, d_model], edit_feature_L / edit_op_L [tokens, edits_L] int64,
                  edit_value_L [tokens, edits_L]  ->  delta_L [tokens, d_model]
    decode        indices_L [tokens, slots_L] int64, values_L [tokens, slots_L]
                  -> reconstruction_L [tokens, d_model]

and one ``encode_layer`` graph per layer ``L`` (file ``encode_layer.L<L>.onnx``), what the
``encode`` graph computes for that layer alone, for callers that encode one layer at a time
with their own tokens (the engine's monitor)::

    encode_layer  h [tokens, d_model], h_prev [tokens, d_model] (residualized layers only),
                  watch [watch] int64  ->  indices [tokens, k] int64, values [tokens, k],
                  watched [tokens, watch]

``h_prev`` is the previous dictionary layer's block output of the same tokens.

``values_L`` are sorted in descending order; slots whose value is 0 carry an arbitrary index.
``watched_L`` holds the dense code (``ReSAE.encode_dense``) of the feature ids in ``watch_L``,
an input so that each request may watch its own features (``watch_L`` may be empty). Edit op
codes are :class:`resae_serve.interventions.EditOp`. Float tensors are float32 or float16 as
the graph's precision says; the affine prediction, residual and scaling happen in the graph.

Edits at several layers of one pass: ``h_L`` is the block output layer ``L`` sees before its
own edit, and a residualized layer reads the previous layer **as this pass's edits left it**,
``h_{L−1} + delta_{L−1}`` (the serving engine's meaning, :meth:`ReSAE.intervention_deltas`).
Exports made before this was stated read the clean ``h_{L−1}``; they differ only where a
residualized layer's clamp / scale / ablate follows an edit at the previous layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

from .errors import ExportError

Precision = Literal["float32", "float16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
GraphName = Literal["encode", "intervention", "decode", "encode_layer"]
GRAPHS: tuple[str, ...] = get_args(GraphName)

EXPORT_MANIFEST = "export_manifest.json"
EXPORT_SCHEMA_VERSION = 2
"""Version of the export folder layout and of the graph I/O contract above (2: the per-layer
``encode_layer`` graphs)."""
MIN_OPSET = 18
TOKENS = "tokens"
_T = TypeVar("_T")


@dataclass(frozen=True)
class TensorSpec:
    """One named graph input or output."""

    name: str
    dtype: str
    """numpy name: ``float32``, ``float16`` or ``int64``."""
    dims: tuple[int | str, ...]
    """Sizes; a string names a dynamic axis."""

    def to_dict(self) -> dict[str, object]:
        """JSON form for ``export_manifest.json``."""
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}


@dataclass(frozen=True)
class DictionaryLayout:
    """The sizes of a dictionary that graph signatures depend on."""

    mode: str
    """``resae`` or ``layerwise``."""
    layers: tuple[int, ...]
    d_model: int
    d_sae: tuple[int, ...]
    """Latents per layer."""
    k: tuple[int, ...]
    """Top-k slots per layer (the ``k`` of each SAE config)."""
    architectures: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        """JSON form."""
        return {"mode": self.mode, "layers": list(self.layers), "d_model": self.d_model,
                "d_sae": list(self.d_sae), "k": list(self.k),
                "architectures": list(self.architectures)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DictionaryLayout:
        """Inverse of :meth:`to_dict`."""
        return cls(str(data["mode"]), tuple(data["layers"]), int(data["d_model"]),
                   tuple(data["d_sae"]), tuple(data["k"]), tuple(data["architectures"]))


@dataclass(frozen=True)
class GraphSpec:
    """Names, dtypes and shapes of one exported graph."""

    name: GraphName
    precision: Precision
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    layer: int | None = None
    """The dictionary layer of a per-layer graph (``encode_layer``); ``None`` for the others."""

    @property
    def file(self) -> str:
        """File name inside the export folder: ``encode.onnx``, ``encode.fp16.onnx``,
        ``encode_layer.L6.onnx``, …"""
        stem = self.name if self.layer is None else f"{self.name}.L{self.layer}"
        return f"{stem}.onnx" if self.precision == "float32" else f"{stem}.fp16.onnx"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def graph_specs(name: str, layout: DictionaryLayout, precision: str = "float32",
                opset: int = MIN_OPSET) -> list[GraphSpec]:
    """The specs of graph ``name``: one per layer for ``encode_layer``, else one."""
    if name == "encode_layer":
        return [graph_spec(name, layout, precision, opset, layer=L) for L in layout.layers]
    return [graph_spec(name, layout, precision, opset)]


def layer_graph_spec(layout: DictionaryLayout, layer: int, precision: str = "float32",
                     opset: int = MIN_OPSET) -> GraphSpec:
    """The ``encode_layer`` spec of dictionary layer ``layer`` (see the module docstring)."""
    if layer not in layout.layers:
        raise ExportError(f"layer={layer!r}; the dictionary's layers are {list(layout.layers)}")
    i = layout.layers.index(layer)
    f, d, k = precision, layout.d_model, layout.k[i]
    inputs = [TensorSpec("h", f, (TOKENS, d))]
    if layout.mode == "resae" and i > 0:
        inputs.append(TensorSpec("h_prev", f, (TOKENS, d)))
    inputs.append(TensorSpec("watch", "int64", ("watch",)))
    outputs = (TensorSpec("indices", "int64", (TOKENS, k)), TensorSpec("values", f, (TOKENS, k)),
               TensorSpec("watched", f, (TOKENS, "watch")))
    return GraphSpec("encode_layer", precision, opset, tuple(inputs), outputs,  # type: ignore[arg-type]
                     layer=layer)


def graph_spec(name: str, layout: DictionaryLayout, precision: str = "float32",
               opset: int = MIN_OPSET, layer: int | None = None) -> GraphSpec:
    """The spec of graph ``name`` for a dictionary of this layout (``layer``: which one, for
    the per-layer ``encode_layer`` graph)."""
    if name not in GRAPHS:
        raise ExportError(f"graph={name!r}; allowed: {', '.join(GRAPHS)}")
    if precision not in PRECISIONS:
        raise ExportError(f"precision={precision!r}; allowed: {', '.join(PRECISIONS)}")
    if (name == "encode_layer") != (layer is not None):
        raise ExportError(f"graph={name!r} with layer={layer!r}: a layer goes with "
                          "encode_layer, and only with it")
    if layer is not None:
        return layer_graph_spec(layout, layer, precision, opset)
    f, d = precision, layout.d_model
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    if name in ("encode", "intervention"):
        inputs += [TensorSpec(f"h_{L}", f, (TOKENS, d)) for L in layout.layers]
    for L, k in zip(layout.layers, layout.k, strict=True):
        if name == "encode":
            inputs.append(TensorSpec(f"watch_{L}", "int64", (f"watch_{L}",)))
            outputs += [TensorSpec(f"indices_{L}", "int64", (TOKENS, k)),
                        TensorSpec(f"values_{L}", f, (TOKENS, k)),
                        TensorSpec(f"watched_{L}", f, (TOKENS, f"watch_{L}"))]
        elif name == "intervention":
            edits = (TOKENS, f"edits_{L}")
            inputs += [TensorSpec(f"edit_feature_{L}", "int64", edits),
                       TensorSpec(f"edit_op_{L}", "int64", edits),
                       TensorSpec(f"edit_value_{L}", f, edits)]
            outputs.append(TensorSpec(f"delta_{L}", f, (TOKENS, d)))
        else:
            slots = (TOKENS, f"slots_{L}")
            inputs += [TensorSpec(f"indices_{L}", "int64", slots),
                       TensorSpec(f"values_{L}", f, slots)]
            outputs.append(TensorSpec(f"reconstruction_{L}", f, (TOKENS, d)))
    return GraphSpec(name, precision, opset, tuple(inputs), tuple(outputs))  # type: ignore[arg-type]


def layer_feeds(spec: GraphSpec, layout: DictionaryLayout,
                feeds: Mapping[str, _T]) -> dict[str, _T]:
    """The inputs of the ``encode_layer`` graph ``spec`` taken from ``encode`` graph feeds
    (``h_L``, ``watch_L`` and the previous layer's ``h`` as ``h_prev``), in spec order."""
    L = spec.layer
    if spec.name != "encode_layer" or L is None:
        raise ExportError(f"layer_feeds needs an encode_layer spec, not {spec.name!r}")
    i = layout.layers.index(L)
    named = {"h": f"h_{L}", "watch": f"watch_{L}",
             "h_prev": f"h_{layout.layers[i - 1]}" if i else ""}
    return {name: feeds[named[name]] for name in spec.input_names}


def layer_outputs(spec: GraphSpec, outputs: Mapping[str, _T]) -> dict[str, _T]:
    """Outputs of an ``encode_layer`` graph under the ``encode`` graph's names
    (``indices`` -> ``indices_L``, …)."""
    return {f"{name}_{spec.layer}": value for name, value in outputs.items()}


@dataclass(frozen=True)
class Tolerance:
    """How far a graph may differ from the torch ``ReSAE`` (float64 comparison).

    An output passes when ``max|ours − torch| ≤ atol + rtol · max|torch|`` (``rtol`` is relative
    to the output's largest magnitude, so it scales with activations of any size). Top-k
    indices must be identical, except for a latent whose torch score lies within
    ``tie_window`` of the token's k-th score or of its activation cut-off (0, or the JumpReLU
    threshold): there a rounding difference legitimately picks another latent.
    """

    atol: float
    rtol: float
    tie_window: float | None = None
    """``None``: the value tolerance ``atol + rtol · max|score|``; ``0``: exact ties only."""

    def __post_init__(self) -> None:
        for name in ("atol", "rtol", "tie_window"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and value != float("inf")):
                raise ExportError(f"tolerance {name}={value!r}; must be a finite number >= 0")

    def allowed(self, scale: float) -> float:
        """The largest accepted absolute difference for an output of magnitude ``scale``."""
        return self.atol + self.rtol * scale


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    # float32: rounding of 576-long dot products in another summation order stays near 1e-6
    # relative; 1e-5 leaves room for the affine chain's amplification.
    "float32": Tolerance(atol=1e-4, rtol=1e-5),
    # float16 (10-bit mantissa, unit roundoff 4.9e-4): inputs and weights are rounded before
    # any arithmetic, so errors of a few units of 1e-3 of an output's scale are expected.
    "float16": Tolerance(atol=1e-2, rtol=1e-2),
}


@dataclass(frozen=True)
class ExportConfig:
    """What to export from a dictionary artifact."""

    precisions: tuple[Precision, ...] = ("float32",)
    """Graph precisions; float32 is always exported (it is the portable reference)."""
    graphs: tuple[GraphName, ...] = ("encode", "intervention", "decode", "encode_layer")
    opset: int = MIN_OPSET
    """ONNX opset of the default domain (at least 18)."""
    external_data: bool | None = None
    """Weights in a ``.onnx.data`` file beside each graph; ``None``: when they exceed
    :attr:`external_data_threshold`."""
    external_data_threshold: int = 100 * 2**20
    """Bytes of weights above which ``external_data=None`` stores them externally."""
    reference_tokens: int = 16
    """Tokens of stored reference inputs/outputs (``reference/<graph>/*.npy``); 0: none."""
    seed: int = 0
    """Seed of the example and reference inputs."""
    tolerances: dict[str, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))

    def __post_init__(self) -> None:
        for p in self.precisions:
            if p not in PRECISIONS:
                raise ExportError(f"precision={p!r}; allowed: {', '.join(PRECISIONS)}")
        if "float32" not in self.precisions:
            raise ExportError(f"precisions={list(self.precisions)}; float32 must be included "
                              "(it is the portable reference variant)")
        for g in self.graphs:
            if g not in GRAPHS:
                raise ExportError(f"graph={g!r}; allowed: {', '.join(GRAPHS)}")
        if not self.graphs:
            raise ExportError("graphs is empty; allowed: any of " + ", ".join(GRAPHS))
        if not isinstance(self.opset, int) or self.opset < MIN_OPSET:
            raise ExportError(f"opset={self.opset!r}; must be an integer >= {MIN_OPSET}")
        if self.reference_tokens < 0 or self.external_data_threshold < 0:
            raise ExportError("reference_tokens and external_data_threshold must be >= 0")
