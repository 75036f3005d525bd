"""Persistent per-layer steering tables and the per-step math of the ReSAE hook (no vLLM).

Per dictionary layer ``i`` (rows ``r``; row 0 = no intervention, never written)::

    add_vec[i, r]        (R, d)    Σ α·σ_i·W_dec[f] over add edits + Σ raw vectors
    edit_*[i, r, e]      (R, E)    clamp / scale / ablate slots (feature, EditOp, value)
    n_slots[i, r]        host int: slots in use (they read their feature's value: encode)

Each step the host writes one row index per token of the flat batch (``token_rows``) and, per
layer, the flat positions of the tokens whose row has a slot that reads a feature's value (clamp,
scale, ablate) and of the tokens to monitor. :meth:`SteeringTables.apply` then, at layer ``i``
with block output ``h = hidden + residual`` (vLLM defers the residual add)::

    z[f_e] = SAE_i.encode(u_i(h, h_prev))[f_e]     only the tokens with reading slots
    δ      = add_vec[i, row] + σ_i Σ_e coef(z[f_e], op_e, v_e) W_dec[f_e]   (feature_delta)
    hidden += δ                                    so the block output becomes h + δ

which is :meth:`resae_serve.resae.ReSAE.intervention_delta` with the add edits folded into
``add_vec``. The reads go through :class:`~resae_serve.engine.screen.TopKScreen` for TopK SAEs
on CPU (bfloat16 GEMM, exact codes), else a float32 encode with packed weights
(:mod:`resae_serve.engine.gemm`). ``h_prev`` is the previous dictionary layer's block output
in the same pass, after that layer's edits (what the stream actually carried), kept in the
persistent ``h_buf``.

Monitoring reports the codes of the edited block output ``h + δ``, encoded on the monitor's
thread, off the decode path (:mod:`resae_serve.engine.monitor`): the op copies ``h + δ`` of the
monitored tokens (and the previous layer's edited output, for residual inputs).

All tensors are allocated once, at construction (before vLLM's warm-up and compilation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from resae_serve.engine.gemm import EncoderGemm, SaeInputs
from resae_serve.engine.screen import TopKScreen
from resae_serve.engine.spec import MAX_EDITS_PER_LAYER, SteerEdit, SteeringSpec, SteerVector
from resae_serve.errors import ResaeError
from resae_serve.interventions import EditOp, edit_coefficients
from resae_serve.resae import ReSAE
from resae_serve.saes.base import SAE, SparseCodes
from resae_serve.saes.topk import TopKSAE

logger = logging.getLogger(__name__)


Codes = SparseCodes | torch.Tensor
"""A layer's codes: sparse ``(N, k)`` for TopK SAEs, dense ``(N, d_sae)`` otherwise."""


def activate(sae: SAE, pre: torch.Tensor) -> Codes:
    """Codes from pre-activations; TopK stays sparse (no zero-fill and scatter of ``d_sae``
    columns per token)."""
    return sae.activate_sparse(pre) if type(sae) is TopKSAE else sae.activate(pre)


def codes_at(codes: Codes, feature: torch.Tensor) -> torch.Tensor:
    """Codes ``z[n, feature[n, e]]`` (N, E)."""
    if isinstance(codes, SparseCodes):
        match = codes.indices.unsqueeze(1) == feature.unsqueeze(2)             # (N, E, k)
        return (codes.values.unsqueeze(1) * match).sum(-1)
    return codes.gather(1, feature)


class LayerCapture(NamedTuple):
    """What one layer's op hands the monitor thread for its captured (monitored) tokens."""

    h: torch.Tensor
    """(n, d) edited block output."""
    h_prev: torch.Tensor | None
    """(n, d) edited block output of the previous dictionary layer, for residual SAE inputs
    (``None`` when the SAE reads ``h`` alone)."""


class TablesFullError(ResaeError):
    """Every table row is claimed by a distinct steering config."""


@dataclass
class _Row:
    index: int
    refs: int


@dataclass(frozen=True)
class RequestRows:
    """Table rows of one request: used for prompt positions and for generated positions."""

    prompt: int
    generation: int
    monitor_layers: tuple[int, ...]
    """Dictionary positions ``i`` whose block output is captured for monitoring."""


class SteeringTables:
    """Persistent tables, row bookkeeping, host-side step preparation and the layer math."""

    def __init__(self, resae: ReSAE, *, max_tokens: int, max_rows: int = 65,
                 dtype: torch.dtype = torch.float32, screen: bool = True) -> None:
        """``screen``: read edited TopK features through :class:`TopKScreen` where it applies
        (same values as the float32 encode; ``RESAE_BF16_SCREEN=0`` turns it off in the
        engine)."""
        self.resae = resae.eval()
        self.layers = resae.layers
        n_layers, d = len(self.layers), resae.d_model
        self.max_tokens, self.max_rows, E = max_tokens, max_rows, MAX_EDITS_PER_LAYER
        self.add_vec = torch.zeros(n_layers, max_rows, d, dtype=dtype)                # (L, R, d)
        self.edit_feature = torch.zeros(n_layers, max_rows, E, dtype=torch.long)      # (L, R, E)
        self.edit_op = torch.zeros(n_layers, max_rows, E, dtype=torch.long)
        self.edit_value = torch.zeros(n_layers, max_rows, E)
        self.has_add = np.zeros((n_layers, max_rows), dtype=bool)
        self.n_slots = np.zeros((n_layers, max_rows), dtype=np.int64)
        self.token_rows = torch.zeros(max_tokens, dtype=torch.long)                   # (T,)
        self._token_rows_np = self.token_rows.numpy()
        self.encode_idx = torch.zeros(n_layers, max_tokens, dtype=torch.long)         # (L, T)
        self.capture_idx = torch.zeros(n_layers, max_tokens, dtype=torch.long)
        self.n_encode = [0] * n_layers
        self.n_capture = [0] * n_layers
        self.layer_add = [False] * n_layers
        self.slots_used = [0] * n_layers            # most slots of an encoded token's row
        self.h_buf = torch.zeros(n_layers, max_tokens, d, dtype=dtype)               # (L, T, d)
        self.active = False
        self.op_seconds = 0.0                     # time inside the op (resae_stats)
        self._gemm = [EncoderGemm(sae) for sae in resae.saes]
        self._inputs = SaeInputs(resae)
        self.screens = [TopKScreen.for_sae(sae, gemm) if screen else None
                        for sae, gemm in zip(resae.saes, self._gemm, strict=True)]
        self.captures: list[LayerCapture | None] = [None] * n_layers
        self._rows: dict[str, _Row] = {}          # row content hash -> row
        self._free = list(range(max_rows - 1, 0, -1))
        self._requests: dict[str, tuple[RequestRows, tuple[str, str]]] = {}

    # ------------------------------------------------------------------ rows

    @property
    def rows_in_use(self) -> int:
        return self.max_rows - 1 - len(self._free)

    def _claim_row(self, edits: list[SteerEdit], vectors: list[SteerVector]) -> tuple[int, str]:
        if not edits and not vectors:
            return 0, ""
        key = repr((sorted((e.layer, e.feature, e.mode, e.value) for e in edits),
                    sorted((v.layer, v.vector) for v in vectors)))
        row = self._rows.get(key)
        if row is not None:
            row.refs += 1
            return row.index, key
        if not self._free:
            raise TablesFullError(f"all {self.max_rows - 1} steering rows are in use")
        index = self._free.pop()
        self._write_row(index, edits, vectors)
        self._rows[key] = _Row(index, 1)
        return index, key

    def _write_row(self, r: int, edits: list[SteerEdit], vectors: list[SteerVector]) -> None:
        for i, layer in enumerate(self.layers):
            sae, scale = self.resae.saes[i], float(self.resae.scales[i])
            add = torch.zeros(self.resae.d_model, dtype=torch.float64)
            slot = 0
            self.edit_op[i, r] = int(EditOp.NONE)
            self.edit_feature[i, r] = 0
            self.edit_value[i, r] = 0.0
            for edit in (e for e in edits if e.layer == layer):
                if edit.mode == "add":
                    add += edit.value * scale * sae.W_dec[edit.feature].detach().double()
                    continue
                self.edit_feature[i, r, slot] = edit.feature
                self.edit_op[i, r, slot] = int(EditOp[edit.mode.upper()])
                self.edit_value[i, r, slot] = edit.value
                slot += 1
            for vec in (v for v in vectors if v.layer == layer):
                add += torch.tensor(vec.vector, dtype=torch.float64)
            self.add_vec[i, r] = add.to(self.add_vec.dtype)
            self.n_slots[i, r] = slot
            self.has_add[i, r] = bool(add.abs().sum() > 0)

    def _release_row(self, key: str) -> None:
        row = self._rows.get(key)
        if row is None:
            return
        row.refs -= 1
        if row.refs == 0:
            del self._rows[key]
            self.add_vec[:, row.index].zero_()
            self.edit_op[:, row.index].zero_()
            self.has_add[:, row.index] = False
            self.n_slots[:, row.index] = 0
            self._free.append(row.index)

    def claim(self, req_id: str, spec: SteeringSpec | None) -> RequestRows:
        """Rows for a request (shared with identical configs); idempotent per ``req_id``."""
        known = self._requests.get(req_id)
        if known is not None:
            return known[0]
        if spec is None:
            rows, keys = RequestRows(0, 0, ()), ("", "")
        else:
            def phase(p: str) -> tuple[int, str]:
                return self._claim_row([e for e in spec.edits if e.phase in (p, "all")],
                                       [v for v in spec.vectors if v.phase in (p, "all")])
            (prompt, k1) = phase("prompt")
            try:
                (generation, k2) = phase("generation")
            except TablesFullError:
                self._release_row(k1)
                raise
            monitor = {self.layers.index(layer) for layer in spec.monitor.layers}
            rows, keys = RequestRows(prompt, generation, tuple(sorted(monitor))), (k1, k2)
        self._requests[req_id] = (rows, keys)
        return rows

    def release(self, req_id: str) -> None:
        """Give back a finished or aborted request's rows (zeroed in place when unused)."""
        known = self._requests.pop(req_id, None)
        if known is not None:
            for key in known[1]:
                self._release_row(key)

    def rows_of(self, req_id: str) -> RequestRows | None:
        """Rows of a request already claimed (``None`` when new)."""
        known = self._requests.get(req_id)
        return None if known is None else known[0]

    def known_requests(self) -> list[str]:
        return list(self._requests)

    # ------------------------------------------------------------------ per step (host)

    def prepare_step(self, n_tokens: int, rows: list[RequestRows], counts: np.ndarray,
                     starts: np.ndarray, num_prompt: np.ndarray) -> None:
        """Fill ``token_rows`` and the per-layer token lists for one forward pass.

        ``counts[j]`` tokens of request ``j`` are scheduled, at positions ``starts[j] + t``;
        positions below ``num_prompt[j]`` are prompt tokens. Padding tokens get row 0.
        """
        total = int(counts.sum()) if len(counts) else 0
        if total > n_tokens or n_tokens > self.max_tokens:
            raise ResaeError(f"{total} scheduled tokens, {n_tokens} in the pass, "
                             f"capacity {self.max_tokens}")
        prompt_rows = np.array([r.prompt for r in rows], dtype=np.int64)
        gen_rows = np.array([r.generation for r in rows], dtype=np.int64)
        monitoring = [bool(r.monitor_layers) for r in rows]
        if not (prompt_rows.any() or gen_rows.any() or any(monitoring)):
            self.active = False
            return
        tok_req = np.repeat(np.arange(len(rows)), counts)
        offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        positions = starts[tok_req] + offsets
        token_rows = np.where(positions < num_prompt[tok_req], prompt_rows[tok_req],
                              gen_rows[tok_req])
        self._token_rows_np[:total] = token_rows
        self._token_rows_np[total:n_tokens] = 0
        for i in range(len(self.layers)):
            slots = self.n_slots[i][token_rows]                                    # (total,)
            wanted = np.array([i in r.monitor_layers for r in rows], dtype=bool)
            monitored = wanted[tok_req] if wanted.any() else np.zeros(total, dtype=bool)
            enc = np.flatnonzero(slots)
            cap = np.flatnonzero(monitored)
            self.n_encode[i], self.n_capture[i] = len(enc), len(cap)
            self.encode_idx[i, : len(enc)] = torch.from_numpy(enc)
            self.capture_idx[i, : len(cap)] = torch.from_numpy(cap)
            self.layer_add[i] = bool(self.has_add[i][token_rows].any())
            self.slots_used[i] = int(slots.max()) if len(enc) else 0
        self.active = True

    def take_captures(self) -> dict[int, tuple[np.ndarray, LayerCapture]]:
        """This pass's captures by dictionary position, with their flat token indices."""
        out = {}
        for i, capture in enumerate(self.captures):
            if capture is not None:
                out[i] = (self.capture_idx[i, : self.n_capture[i]].numpy().copy(), capture)
                self.captures[i] = None
        return out

    def deactivate(self) -> None:
        self.active = False

    # ------------------------------------------------------------------ the op body

    @torch.no_grad()
    def apply(self, i: int, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        """Edit ``hidden`` in place so that the block output ``h = hidden + residual`` (or
        ``h = hidden`` when ``residual`` is ``None``: no deferred add) becomes ``h + δ`` (layer
        i); leave what the monitor needs of the monitored tokens in ``captures[i]``."""
        self.captures[i] = None
        if not self.active:
            return
        n = hidden.shape[0]
        h = (self.h_buf[i, :n].copy_(hidden) if residual is None                   # (n, d)
             else torch.add(hidden, residual, out=self.h_buf[i, :n]))
        delta = (self.add_vec[i].index_select(0, self.token_rows[:n])             # (n, d)
                 if self.layer_add[i] else None)
        if self.n_encode[i]:
            delta = self._encode(i, hidden, h, delta)
        if delta is not None:
            hidden.add_(delta)
            h.add_(delta)
        nc = self.n_capture[i]
        if nc:
            cap = self.capture_idx[i, :nc]
            h_prev = (self.h_buf[i - 1].index_select(0, cap)
                      if i and self.resae.mode == "resae" else None)
            self.captures[i] = LayerCapture(h.index_select(0, cap), h_prev)

    def _encode(self, i: int, hidden: torch.Tensor, h: torch.Tensor, delta: torch.Tensor | None
                ) -> torch.Tensor | None:
        """Encode the tokens whose slots read a feature; their deltas are added to ``delta``
        (returned), or to ``hidden`` and ``h`` directly when only some tokens are encoded."""
        n, ne = hidden.shape[0], self.n_encode[i]
        whole = ne == n                        # decode steps: every token, no gather/scatter
        idx = self.encode_idx[i, :ne]                                              # (ne,)
        h_prev = self.h_buf[i - 1, :n] if i else None
        if not whole:
            h_prev = None if h_prev is None else h_prev.index_select(0, idx)
        rows = self.token_rows[:n] if whole else self.token_rows.index_select(0, idx)
        sae = self.resae.saes[i]
        u = self._inputs(i, h if whole else h.index_select(0, idx), h_prev)
        used = self.slots_used[i]                 # slots past it are empty in every row
        feature = self.edit_feature[i, :, :used].index_select(0, rows)             # (ne, s)
        screen, gemm = self.screens[i], self._gemm[i]
        z_at = (screen.codes_at(u, feature) if screen is not None
                else codes_at(activate(sae, gemm(u.to(gemm.dtype))), feature))    # (ne, s)
        coef = edit_coefficients(z_at,
                                 self.edit_op[i, :, :used].index_select(0, rows),
                                 self.edit_value[i, :, :used].index_select(0, rows))
        delta_enc = (self.resae.scales[i] * torch.einsum(
            "ne,ned->nd", coef, sae.W_dec[feature])).to(hidden.dtype)
        if whole:
            delta = delta_enc if delta is None else delta.add_(delta_enc)
        else:
            hidden.index_add_(0, idx, delta_enc)
            h.index_add_(0, idx, delta_enc)
        return delta
