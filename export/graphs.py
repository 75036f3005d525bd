"""Torch modules the ONNX graphs are traced from: export-friendly twins of ``ReSAE``.

They compute what :class:`resae_serve.resae.ReSAE` computes (``encode`` / ``encode_dense`` /
``intervention_deltas`` / ``decode``) with ops every runtime has: MatMul, TopK, Gather, Where.
Differences in form, not in math: top-k values come sorted (descending); a TopK layer's code
of a given feature is looked up among its k slots instead of in a scattered dense code; sparse
decoding gathers decoder rows and contracts them with one batched matmul (no embedding_bag).
Each module takes and returns flat tuples in the order of :func:`export.spec.graph_spec`, and
is also the ``torch`` feature-runtime backend. :mod:`export.validate` checks the exported
graphs against ``ReSAE`` itself, never against these modules.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resae_serve.interventions import edit_coefficients
from resae_serve.resae import ReSAE
from resae_serve.saes import SAE

from .errors import ExportError
from .spec import GRAPHS, DictionaryLayout

_ACTIVATIONS = {"topk": "topk", "relu": "relu", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def as_float32(resae: ReSAE) -> ReSAE:
    """``resae`` itself when all its tensors are float32, else a float32 copy (never in place)."""
    if all(t.dtype == torch.float32 for t in resae.state_dict().values() if t.is_floating_point()):
        return resae
    return copy.deepcopy(resae).float()


def dictionary_layout(resae: ReSAE) -> DictionaryLayout:
    """The sizes of ``resae`` that graph signatures depend on."""
    saes = resae.saes
    return DictionaryLayout(resae.mode, resae.layers, resae.d_model,
                            tuple(s.config.d_sae for s in saes), tuple(s.config.k for s in saes),
                            tuple(s.config.architecture for s in saes))


class LayerWeights(nn.Module):
    """One layer's tensors in the graph's dtype, and the per-layer ops of every graph."""

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    threshold: Tensor
    scale: Tensor
    """() ``s_0`` or ``σ_m``."""
    A_T: Tensor
    """(d, d) the transposed affine map (residualized layers only)."""
    c: Tensor

    def __init__(self, sae: SAE, scale: Tensor, affine: tuple[Tensor, Tensor] | None,
                 dtype: torch.dtype) -> None:
        super().__init__()
        arch = sae.config.architecture
        if arch not in _ACTIVATIONS:
            raise ExportError(f"SAE architecture={arch!r} cannot be exported; allowed: "
                              f"{', '.join(_ACTIVATIONS)}")
        self.activation = _ACTIVATIONS[arch]
        self.k = sae.config.k

        def buffer(name: str, t: Tensor) -> None:
            self.register_buffer(name, t.detach().to(dtype).clone().contiguous())

        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            buffer(name, getattr(sae, name))
        buffer("threshold", getattr(sae, "threshold", torch.zeros(sae.config.d_sae)))
        buffer("scale", scale.reshape(()))
        self.residualized = affine is not None
        if affine is not None:
            buffer("A_T", affine[0].T)  # (d, d): h_prev @ A_T == h_prev @ A.T
            buffer("c", affine[1])

    def sae_input(self, h: Tensor, h_prev: Tensor | None) -> Tensor:
        """``h / s`` or ``(h − A h_prev − c) / σ``: (N, d) -> (N, d)."""
        if not self.residualized:
            return h / self.scale
        assert h_prev is not None  # the chain always passes the previous layer here
        return (h - (h_prev @ self.A_T + self.c)) / self.scale

    def top_k(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Top-k ``(indices, values)`` (N, k), sorted descending, and the dense code (N, d_sae)
        where the architecture computes one anyway (ReLU, JumpReLU; ``None`` for TopK)."""
        pre = (u - self.b_dec) @ self.W_enc + self.b_enc  # (N, d_sae)
        if self.activation == "topk":
            values, indices = pre.topk(self.k, dim=-1)
            return indices, values.relu(), None
        dense = pre.relu() if self.activation == "relu" else pre.relu() * (pre > self.threshold)
        values, indices = dense.topk(self.k, dim=-1)
        return indices, values, dense

    def encode(self, u: Tensor, watch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(indices, values, watched)`` of SAE input ``u`` (N, d): the top-k slots and the
        dense codes of the latents ``watch`` (W,)."""
        indices, values, dense = self.top_k(u)
        ids = watch[None, :].expand(u.shape[0], -1)  # (N, W)
        return indices, values, self.code_at(indices, values, dense, ids)

    @staticmethod
    def code_at(indices: Tensor, values: Tensor, dense: Tensor | None, ids: Tensor) -> Tensor:
        """Dense code of latents ``ids`` (N, E): a gather, or a match among the k slots."""
        if dense is not None:
            return dense.gather(1, ids)
        match = (ids[:, :, None] == indices[:, None, :]).to(values.dtype)  # (N, E, k)
        return (match * values[:, None, :]).sum(-1)

    def rows_times(self, coef: Tensor, ids: Tensor) -> Tensor:
        """``Σ_e coef[:, e] · W_dec[ids[:, e]]``: (N, E) -> (N, d), via one batched matmul."""
        rows = F.embedding(ids, self.W_dec)  # (N, E, d)
        return (coef[:, None, :] @ rows).squeeze(1)


class _Chain(nn.Module):
    def __init__(self, resae: ReSAE, precision: str = "float32") -> None:
        super().__init__()
        if precision not in DTYPES:
            raise ExportError(f"precision={precision!r}; allowed: {', '.join(DTYPES)}")
        dtype = DTYPES[precision]
        self.layers = resae.layers
        self.blocks = nn.ModuleList(
            LayerWeights(sae, resae.scales[i],
                         resae.affine_map(i) if resae.mode == "resae" and i > 0 else None, dtype)
            for i, sae in enumerate(resae.saes)
        )
        self.eval()

    def block(self, i: int) -> LayerWeights:
        return self.blocks[i]  # type: ignore[return-value]

    def inputs(self, h: tuple[Tensor, ...]) -> list[Tensor]:
        return [self.block(i).sae_input(h[i], h[i - 1] if i else None)
                for i in range(len(self.layers))]


class EncodeGraph(_Chain):
    """``(h_L…, watch_L…) -> (indices_L, values_L, watched_L)…`` (see :mod:`export.spec`)."""

    def forward(self, h: tuple[Tensor, ...], watch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        out: list[Tensor] = []
        for i, u in enumerate(self.inputs(h)):
            out += self.block(i).encode(u, watch[i])
        return tuple(out)


class InterventionGraph(_Chain):
    """``(h_L…, (edit_feature_L, edit_op_L, edit_value_L)…) -> delta_L…``.

    ``h_L`` is the block output layer ``L`` sees in the pass before its own edit. A
    residualized layer reads the previous layer as this pass's edits left it,
    ``h_{L−1} + delta_{L−1}`` (the engine's meaning; :meth:`ReSAE.intervention_deltas`)."""

    def forward(self, h: tuple[Tensor, ...],
                edits: tuple[tuple[Tensor, Tensor, Tensor], ...]) -> tuple[Tensor, ...]:
        out: list[Tensor] = []
        for i in range(len(self.layers)):
            block = self.block(i)
            u = block.sae_input(h[i], h[i - 1] + out[i - 1] if i else None)
            feature, op, value = edits[i]
            indices, values, dense = block.top_k(u)
            coef = edit_coefficients(block.code_at(indices, values, dense, feature), op, value)
            out.append(block.scale * block.rows_times(coef, feature))
        return tuple(out)


class DecodeGraph(_Chain):
    """``((indices_L, values_L)…) -> reconstruction_L…`` through the affine chain."""

    def forward(self, codes: tuple[tuple[Tensor, Tensor], ...]) -> tuple[Tensor, ...]:
        out: list[Tensor] = []
        for i, (indices, values) in enumerate(codes):
            block = self.block(i)
            x_hat = block.scale * (block.rows_times(values, indices) + block.b_dec)
            if block.residualized:
                x_hat = x_hat + (out[-1] @ block.A_T + block.c)
            out.append(x_hat)
        return tuple(out)


class LayerEncodeGraph(nn.Module):
    """``(h, [h_prev,] watch) -> (indices, values, watched)`` of one layer: the ``encode``
    graph's math for that layer alone (``encode_layer``; ``h_prev`` for residualized layers).

    Holds that layer's weights only, so each per-layer file carries one encoder (and its
    affine map)."""

    def __init__(self, resae: ReSAE, layer: int, precision: str = "float32") -> None:
        super().__init__()
        if precision not in DTYPES:
            raise ExportError(f"precision={precision!r}; allowed: {', '.join(DTYPES)}")
        if layer not in resae.layers:
            raise ExportError(f"layer={layer!r}; the dictionary's layers are "
                              f"{list(resae.layers)}")
        i = resae.layers.index(layer)
        self.layer = layer
        self.block = LayerWeights(
            resae.saes[i], resae.scales[i],
            resae.affine_map(i) if resae.mode == "resae" and i > 0 else None, DTYPES[precision])
        self.eval()

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``inputs``: ``(h, h_prev, watch)`` for a residualized layer, else ``(h, watch)``."""
        h, watch = inputs[0], inputs[-1]
        h_prev = inputs[1] if self.block.residualized else None
        return self.block.encode(self.block.sae_input(h, h_prev), watch)


GRAPH_MODULES: dict[str, type[_Chain]] = {
    "encode": EncodeGraph, "intervention": InterventionGraph, "decode": DecodeGraph,
}


def graph_module(name: str, resae: ReSAE, precision: str = "float32",
                 layer: int | None = None) -> nn.Module:
    """The torch module of graph ``name`` for ``resae`` in ``precision`` (``layer``: of the
    per-layer ``encode_layer`` graph)."""
    if name == "encode_layer":
        if layer is None:
            raise ExportError("graph='encode_layer' needs a layer")
        return LayerEncodeGraph(resae, layer, precision)
    if name not in GRAPH_MODULES:
        raise ExportError(f"graph={name!r}; allowed: {', '.join(GRAPHS)}")
    return GRAPH_MODULES[name](resae, precision)


def nest_inputs(name: str, flat: list[Tensor], n_layers: int) -> tuple[object, ...]:
    """Flat inputs in spec order -> the argument structure of the graph module's ``forward``."""
    if name == "encode_layer":
        return tuple(flat)
    if name == "encode":
        return (tuple(flat[:n_layers]), tuple(flat[n_layers:]))
    if name == "intervention":
        rest = flat[n_layers:]
        return (tuple(flat[:n_layers]),
                tuple((rest[3 * i], rest[3 * i + 1], rest[3 * i + 2]) for i in range(n_layers)))
    return (tuple((flat[2 * i], flat[2 * i + 1]) for i in range(n_layers)),)
