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

``values_L`` are sorted in descending order; slots whose value is 0 carry an arbitrary index.
``watched_L`` holds the dense code (``ReSAE.encode_dense``) of the feature ids in ``watch_L``,
an input so that each request may watch its own features (``watch_L`` may be empty). Edit op
codes are :class:`resae_serve.interventions.EditOp`. Float tensors are float32 or float16 as
the graph's precision says; the affine prediction, residual and scaling happen in the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .errors import ExportError

Precision = Literal["float32", "float16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
GraphName = Literal["encode", "intervention", "decode"]
GRAPHS: tuple[str, ...] = get_args(GraphName)

EXPORT_MANIFEST = "export_manifest.json"
EXPORT_SCHEMA_VERSION = 1
"""Version of the export folder layout and of the graph I/O contract above."""
MIN_OPSET = 18
TOKENS = "tokens"


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

    @property
    def file(self) -> str:
        """File name inside the export folder: ``encode.onnx``, ``encode.fp16.onnx``, …"""
        return f"{self.name}.onnx" if self.precision == "float32" else f"{self.name}.fp16.onnx"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def graph_spec(name: str, layout: DictionaryLayout, precision: str = "float32",
               opset: int = MIN_OPSET) -> GraphSpec:
    """The spec of graph ``name`` for a dictionary of this layout."""
    if name not in GRAPHS:
        raise ExportError(f"graph={name!r}; allowed: {', '.join(GRAPHS)}")
    if precision not in PRECISIONS:
        raise ExportError(f"precision={precision!r}; allowed: {', '.join(PRECISIONS)}")
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
    graphs: tuple[GraphName, ...] = ("encode", "intervention", "decode")
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
