"""The ``ReSAE`` module: a chain of per-layer SAEs linked by affine maps (the torch oracle).

Selected layers ``l_0 < … < l_M`` with block outputs ``h_m`` (docs/ARCHITECTURE.md §1). In
``resae`` mode::

    u_0 = h_0 / s_0                      r_m = h_m − A_m h_{m−1} − c_m     u_m = r_m / σ_m
    z_m = SAE_m.encode(u_m)
    x̂_0 = s_0 · D_0(z_0)                 x̂_m = A_m x̂_{m−1} + c_m + σ_m · D_m(z_m)

In ``layerwise`` mode every SAE reads ``u_m = h_m / s_m`` and ``x̂_m = s_m · D_m(z_m)``. Both
store one scale per layer (``s_0, σ_1, …`` or ``s_0, s_1, …``). Encoding reads clean
activations; decoding goes through the chain (teacher-forced joint replacement). This module is
the reference that exported graphs and the serving hook are tested against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, cast, get_args

import torch
from torch import nn

from resae_serve.context import TrainingContext
from resae_serve.interventions import (
    EditTable,
    Gate,
    GatedEdit,
    InterventionError,
    feature_delta,
)
from resae_serve.saes import SAE, SparseCodes

Mode = Literal["resae", "layerwise"]
MODES: tuple[str, ...] = get_args(Mode)


class ReSAE(nn.Module):
    """Per-layer SAEs over selected layers, residualized by affine maps (see module docstring).

    ``affine[i]`` is ``(A_i (d, d), c_i (d,))`` mapping layer ``layers[i-1]`` to
    ``layers[i]``, for ``i ≥ 1`` (``affine[0]`` is ignored and may be ``None``).
    """

    scales: torch.Tensor
    """(n_layers,) float32: ``s_0, σ_1, …`` (resae) or ``s_0, s_1, …`` (layerwise)."""

    def __init__(
        self,
        layers: Sequence[int],
        saes: Sequence[SAE],
        scales: Sequence[float] | torch.Tensor,
        *,
        mode: Mode = "resae",
        affine: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)}")
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"layers={list(layers)}; must be strictly increasing")
        if not len(layers) == len(saes) == len(scales):
            raise ValueError(f"{len(layers)} layers, {len(saes)} SAEs and {len(scales)} scales; "
                             "need one SAE and one scale per layer")
        self.layers = tuple(int(layer) for layer in layers)
        self.mode: Mode = mode
        self.sae_modules = nn.ModuleList(saes)
        d_model = saes[0].config.d_in
        if any(sae.config.d_in != d_model for sae in saes):
            raise ValueError("every SAE must have the same d_in (the model's d_model)")
        self.register_buffer("scales", torch.as_tensor(scales, dtype=torch.float32).clone())
        self.A = nn.ParameterList()  # frozen; parameters only so .to() / state_dict see them
        self.c = nn.ParameterList()
        if mode == "resae":
            if affine is None or len(affine) != len(layers):
                raise ValueError("resae mode needs one affine map per layer after the first")
            for i, pair in enumerate(affine[1:], start=1):
                if pair is None:
                    raise ValueError(f"affine map {i} (into layer {self.layers[i]}) is missing")
                A, c = pair
                if A.shape != (d_model, d_model) or c.shape != (d_model,):
                    raise ValueError(f"affine map into layer {self.layers[i]}: A {tuple(A.shape)}"
                                     f", c {tuple(c.shape)}; expected ({d_model}, {d_model}) and "
                                     f"({d_model},)")
                self.A.append(nn.Parameter(A.detach().clone().float(), requires_grad=False))
                self.c.append(nn.Parameter(c.detach().clone().float(), requires_grad=False))

    # ------------------------------------------------------------------ structure

    @property
    def saes(self) -> list[SAE]:
        """The per-layer SAEs, in layer order."""
        return [cast(SAE, module) for module in self.sae_modules]

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return self.saes[0].config.d_in

    def index(self, layer: int) -> int:
        """Position of a model layer in :attr:`layers`, with a clear error."""
        try:
            return self.layers.index(layer)
        except ValueError:
            raise InterventionError(
                f"layer={layer} is not in this dictionary; its layers are {list(self.layers)}"
            ) from None

    def affine_map(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_i, c_i)`` into ``layers[i]`` (resae mode, ``i ≥ 1``)."""
        return self.A[i - 1], self.c[i - 1]

    def predict(self, i: int, h_prev: torch.Tensor) -> torch.Tensor:
        """Affine prediction of layer ``layers[i]`` from the previous layer: ``A h + c``."""
        A, c = self.affine_map(i)
        return h_prev @ A.to(h_prev.dtype).T + c.to(h_prev.dtype)

    # ------------------------------------------------------------------ encode / decode

    def sae_input(self, i: int, h: torch.Tensor, h_prev: torch.Tensor | None) -> torch.Tensor:
        """Normalised input ``u`` of SAE ``i``: ``h/s`` or ``(h − A h_prev − c)/σ``."""
        scale = self.scales[i].to(h.dtype)
        if self.mode == "layerwise" or i == 0:
            return h / scale
        if h_prev is None:
            raise InterventionError(
                f"layer {self.layers[i]} is residualized: its encoder also needs the "
                f"activations of layer {self.layers[i - 1]}"
            )
        return (h - self.predict(i, h_prev)) / scale

    def _inputs(self, acts: Mapping[int, torch.Tensor]) -> list[torch.Tensor]:
        missing = [layer for layer in self.layers if layer not in acts]
        if missing:
            raise InterventionError(f"activations for layers {missing} are missing; "
                                    f"this dictionary needs {list(self.layers)}")
        return [
            self.sae_input(i, acts[layer], acts[self.layers[i - 1]] if i else None)
            for i, layer in enumerate(self.layers)
        ]

    def encode(self, acts: Mapping[int, torch.Tensor]) -> dict[int, SparseCodes]:
        """Sparse codes per layer from clean activations ``{layer: (N, d)}``."""
        return {layer: sae.encode_sparse(u)
                for layer, sae, u in zip(self.layers, self.saes, self._inputs(acts), strict=True)}

    def encode_dense(self, acts: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Dense codes ``{layer: (N, d_sae)}`` from clean activations."""
        return {layer: sae.encode(u)
                for layer, sae, u in zip(self.layers, self.saes, self._inputs(acts), strict=True)}

    def decode(self, codes: Mapping[int, SparseCodes | torch.Tensor]) -> dict[int, torch.Tensor]:
        """Reconstructions ``{layer: (N, d)}`` through the chain, from sparse or dense codes."""
        out: dict[int, torch.Tensor] = {}
        prev: torch.Tensor | None = None
        for i, (layer, sae) in enumerate(zip(self.layers, self.saes, strict=True)):
            code = codes[layer]
            part = sae.decode_sparse(code) if isinstance(code, SparseCodes) else sae.decode(code)
            x_hat = self.scales[i].to(part.dtype) * part
            if self.mode == "resae" and i > 0:
                assert prev is not None  # set on the previous iteration
                x_hat = x_hat + self.predict(i, prev)
            out[layer] = prev = x_hat
        return out

    def forward(self, acts: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Teacher-forced reconstruction: encode clean activations, decode through the chain.

        Uses dense codes: JumpReLU and ReLU SAEs may fire more than ``k`` latents, which the
        top-k :meth:`encode` would truncate.
        """
        return self.decode(self.encode_dense(acts))

    # ------------------------------------------------------------------ interventions

    def intervention_delta(
        self, layer: int, h: torch.Tensor, h_prev: torch.Tensor | None, table: EditTable
    ) -> torch.Tensor:
        """Delta ``(N, d)`` to add to ``h`` at ``layer`` for the per-token edit table.

        ``h`` is the block output as the pass carries it into ``layer`` (before this layer's
        own edits). ``h_prev`` is the previous dictionary layer's block output in the same pass
        **as this pass's edits left it** (``h_{m−1} + δ_{m−1}``, what the stream actually
        carried; needed in resae mode for clamp / scale / ablate, which read the feature's
        current value). The serving engine reads it that way; :meth:`intervention_deltas`
        chains the layers so.
        """
        i = self.index(layer)
        sae = self.saes[i]
        if table.feature.numel() and not (
            int(table.feature.min()) >= 0 and int(table.feature.max()) < sae.config.d_sae
        ):
            raise InterventionError(f"feature ids at layer {layer} must lie in "
                                    f"0..{sae.config.d_sae - 1}")
        z = sae.encode(self.sae_input(i, h, h_prev))
        return feature_delta(z, sae.W_dec, self.scales[i].to(h.dtype), table)

    def intervention_deltas(
        self, acts: Mapping[int, torch.Tensor], tables: Mapping[int, EditTable], *,
        gated: Sequence[GatedEdit] = (), context: TrainingContext | None = None,
        positions: Sequence[int] | torch.Tensor | None = None,
    ) -> dict[int, torch.Tensor]:
        """Deltas ``{layer: (N, d)}`` of one pass with edits at several layers (zeros where
        ``tables`` and ``gated`` have no entry), the meaning every backend shares.

        ``acts[layer]`` is the block output each layer sees in the pass before its own edit
        (upstream edits already carried forward by the transformer). A residualized layer
        reads the previous dictionary layer as this pass's edits left it,
        ``acts[prev] + δ[prev]``; only the layer's own delta is returned (the transformer
        carries it forward; adding ``A δ`` downstream as well would count it twice).
        ``gated``, ``context``, ``positions``: see :meth:`layer_delta`.
        """
        unknown = sorted(set(tables) - set(self.layers))
        if unknown:
            raise InterventionError(f"edit tables name layers {unknown}; this dictionary has "
                                    f"{list(self.layers)}")
        missing = [layer for layer in self.layers if layer not in acts]
        if missing:
            raise InterventionError(f"activations for layers {missing} are missing; "
                                    f"this dictionary needs {list(self.layers)}")
        out: dict[int, torch.Tensor] = {}
        edited: torch.Tensor | None = None
        masks: dict[Gate, torch.Tensor] = {}
        for layer in self.layers:
            h = acts[layer]
            out[layer] = self.layer_delta(layer, h, edited, tables.get(layer), gated=gated,
                                          masks=masks, context=context, positions=positions)
            edited = h + out[layer]
        return out

    def layer_delta(
        self, layer: int, h: torch.Tensor, h_prev: torch.Tensor | None,
        table: EditTable | None, *, gated: Sequence[GatedEdit] = (),
        masks: dict[Gate, torch.Tensor] | None = None, context: TrainingContext | None = None,
        positions: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Delta ``(N, d)`` at ``layer``: ``table``'s edits on every token, plus each gated
        edit at ``layer`` on the tokens where its gate holds.

        ``h``, ``h_prev`` as in :meth:`intervention_delta`. A gate at ``layer`` reads the code
        of that same input; its ``(N,)`` bool mask goes into ``masks``, which carries the masks
        from layer to layer of one pass (call this layer by layer, in order, with one dict).
        With ``context`` (and the tokens' sequence ``positions``, default ``0..N-1``) the
        positions it calls out of distribution (:meth:`TrainingContext.reasons`, from the norm
        of ``h``) never satisfy a gate unless ``include_out_of_distribution``. A sticky gate
        holds from the first token where it holds on (``h`` is one sequence, in order).
        """
        masks = {} if masks is None else masks
        delta = (self.intervention_delta(layer, h, h_prev, table) if table is not None
                 else torch.zeros_like(h))
        here = {g.gate for g in gated if g.gate.layer == layer and g.gate not in masks}
        if here:
            i = self.index(layer)
            z = self.saes[i].encode(self.sae_input(i, h, h_prev))                   # (N, d_sae)
            inside: torch.Tensor | None = None
            if context is not None:
                pos = (torch.arange(h.shape[0]) if positions is None
                       else torch.as_tensor(positions)).cpu().numpy()
                norms = torch.linalg.vector_norm(h.float(), dim=-1).cpu().numpy()
                inside = torch.from_numpy(context.reasons(i, pos, norms) == 0).to(h.device)
            for gate in here:
                holds = z[:, gate.feature] >= gate.value
                if inside is not None and not gate.include_out_of_distribution:
                    holds = holds & inside
                if gate.sticky:
                    holds = holds.long().cumsum(0) > 0
                masks[gate] = holds
        for edit in (g for g in gated if g.layer == layer):
            if edit.gate not in masks:
                raise InterventionError(f"a gated edit at layer {layer} names a gate at layer "
                                        f"{edit.gate.layer}; a gate must be at or before its "
                                        f"edit's layer")
            part = (self.intervention_delta(layer, h, h_prev, edit.table)
                    if edit.table is not None else torch.zeros_like(h))
            if edit.vector is not None:
                part = part + edit.vector.to(h.dtype)
            delta = delta + masks[edit.gate].unsqueeze(1).to(h.dtype) * part
        return delta
