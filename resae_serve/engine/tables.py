"""Persistent per-layer steering tables and the per-step math of the ReSAE hook (no vLLM).

Per dictionary layer ``i`` (rows ``r``; row 0 = no intervention, never written)::

    add_vec[i, r]        (R, d)    Σ α·σ_i·W_dec[f] over ungated add edits + Σ raw vectors
    edit_feature[i, r, e] (R, E)   clamp / scale / ablate slots: the feature read
    edit_line[i, r, e]   (R, E, 2) the slot's change as a line in the feature's code,
                                   coef = a·z + b (:func:`~resae_serve.interventions.edit_line`)
    edit_gate[i, r, e]   (R, E)    the slot's gate column (0: ungated, 1 + c: condition c)
    gated_vec[i, r·C + c] (R·C, d) gated add edits and raw vectors of condition column c
    n_slots[i, r]        host int: slots in use (they read their feature's value: encode)

Each step the host writes one row index per token of the flat batch (``token_rows``) and, per
layer, the flat positions of the tokens whose row has a slot that reads a feature's value (clamp,
scale, ablate) and of the tokens to monitor. :meth:`SteeringTables.apply` then, at layer ``i``
with block output ``h = hidden + residual`` (vLLM defers the residual add)::

    z[f_e] = SAE_i.encode(u_i(h, h_prev))[f_e]     only the tokens with reading slots
    δ      = add_vec[i, row] + σ_i Σ_e (a_e z[f_e] + b_e) W_dec[f_e]      (feature_delta)
    hidden += δ                                    so the block output becomes h + δ

which is :meth:`resae_serve.resae.ReSAE.intervention_delta` with the add edits folded into
``add_vec``. The reads go through :class:`~resae_serve.engine.screen.TopKScreen` for TopK
SAEs on CPU (bfloat16 GEMM, exact codes), else a float32 encode with packed weights
(:mod:`resae_serve.engine.gemm`). ``h_prev`` is the previous dictionary layer's block output
in the same pass, after that layer's edits (what the stream actually carried), kept in the
persistent ``h_buf``.

**When gates** (:mod:`resae_serve.engine.gates`). An edit or vector with ``when`` applies on
the tokens where its condition holds, decided in the op: at the condition's layer the tokens
whose row has a condition there are encoded too (one encode serves the slots and the
conditions) and their gate columns written, before that layer's edits. Then::

    coef_e = gate[t, edit_gate[e]] · (a_e z[f_e] + b_e)
    δ     += Σ_c gate[t, 1 + c] · gated_vec[i, row·C + c]

A gated add needs no encode at its own layer when its condition is at an earlier one. A gate
of 0 makes a coefficient exactly 0, so a condition that never holds leaves the request's
outputs bitwise unsteered. Rows without conditions take exactly the ungated path (host
flags; in the graph body the gate column 0 is exactly 1). Sticky conditions latch per
request (a slot of its own, :attr:`RequestRows.slot`), not per row: rows are shared.

Monitoring reports the codes of the edited block output ``h + δ``, encoded on the monitor's
thread, off the decode path (:mod:`resae_serve.engine.monitor`): after the pass,
:meth:`SteeringTables.take_captures` gathers ``h + δ`` of the monitored tokens from ``h_buf``
(and the previous layer's edited output, for residual inputs).

Two bodies compute the same thing (parity: ``tests/unit/test_engine_tables.py``; on CUDA inside
graph capture: ``benchmarks/gpu_check.py``):

- the **eager** body (:meth:`SteeringTables._apply_eager`, the CPU default and the oracle):
  encodes only the tokens whose rows read a feature, so its shapes change every step;
- the **graph** body (:meth:`SteeringTables._apply_graph`, the CUDA default): fixed shapes over
  the padded token count, masked arithmetic (row 0 adds nothing, empty slots move nothing),
  reading only persistent tables, so it can be captured in a CUDA graph and replayed with the
  tables changed between replays. Four device-side flags per layer (any add row, any reading
  row, any gated-vector row, any condition) gate its parts: inside CUDA-graph capture they
  become conditional nodes (the work is skipped on the device when no row is active at that
  layer); outside capture the host's copy of the same flags decides. Its reads go to the
  persistent ``z_buf`` so that the conditions (their own node) sit between the reads and the
  slot edits.

The host writes each step's per-token rows and flags into host buffers (pinned on CUDA) and
copies them, non-blocking, into persistent device buffers before the forward pass
(:meth:`SteeringTables.prepare_step`); the op itself never synchronises with the host.

All tensors are allocated once, at construction (before vLLM's warm-up and compilation), on the
model's device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from resae_serve.context import TrainingContext
from resae_serve.engine.gates import GateState, RequestSlotsFullError
from resae_serve.engine.gemm import EncoderGemm, SaeInputs
from resae_serve.engine.screen import TopKScreen
from resae_serve.engine.spec import (
    MAX_CONDITIONS,
    MAX_EDITS_PER_LAYER,
    Condition,
    SteerEdit,
    SteeringSpec,
    SteerVector,
)
from resae_serve.errors import ResaeError
from resae_serve.interventions import EditOp, edit_line
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
    slot: int = 0
    """Latch slot of a request with sticky conditions (0: none)."""


class _Staged:
    """A buffer the host fills each step and the copy of it the op reads on the device.

    On CUDA the host side is pinned and :meth:`upload` copies it without blocking, on the
    current stream (so it lands after the previous pass and before the next); elsewhere the
    two are one tensor."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.host = torch.zeros(shape, dtype=dtype, pin_memory=cuda)
        self.np = self.host.numpy()
        self.device = torch.zeros(shape, dtype=dtype, device=device) if cuda else self.host

    def upload(self, n: int | None = None) -> None:
        """Copy the host side (its first ``n`` entries along the last axis) to the device."""
        if self.device is not self.host:
            span = slice(None) if n is None else slice(0, n)
            self.device[..., span].copy_(self.host[..., span], non_blocking=True)


CONDITIONAL_NODES: dict[str, str] = {}
"""Why the last capture did or did not get conditional nodes (``{"status": ...}``; reports)."""


def _capturing_graph() -> Any:
    """The CUDA graph being captured on this stream, when torch can add conditional nodes
    (``torch.cuda.CUDAGraph.get_currently_capturing_graph`` and ``begin_capture_to_if_node``;
    CUDA 12.4+ builds). Without them the graph body's masked arithmetic always runs."""
    cls = torch.cuda.CUDAGraph
    missing = [name for name in ("get_currently_capturing_graph", "begin_capture_to_if_node",
                                 "end_capture_to_conditional_node") if not hasattr(cls, name)]
    if missing:
        CONDITIONAL_NODES["status"] = f"torch {torch.__version__} lacks CUDAGraph.{missing[0]}"
        return None
    try:
        graph = cls.get_currently_capturing_graph()
    except RuntimeError as err:
        CONDITIONAL_NODES["status"] = f"get_currently_capturing_graph: {err}"
        return None
    if graph is None:
        CONDITIONAL_NODES["status"] = "get_currently_capturing_graph returned None"
        return None
    CONDITIONAL_NODES["status"] = "used"
    return graph


class SteeringTables:
    """Persistent tables, row bookkeeping, host-side step preparation and the layer math."""

    def __init__(self, resae: ReSAE, *, max_tokens: int, max_rows: int = 65,
                 dtype: torch.dtype = torch.float32, screen: bool = True,
                 device: torch.device | str = "cpu", graph_body: bool | None = None,
                 context: TrainingContext | None = None, max_requests: int = 1024) -> None:
        """``screen``: read edited TopK features through :class:`TopKScreen` where it applies
        (CPU eager body only; same values as the float32 encode; ``RESAE_BF16_SCREEN=0`` turns
        it off in the engine). ``device``: the model's device (the dictionary moves there).
        ``graph_body``: the fixed-shape body (default: on CUDA). ``context``: the dictionary's
        training context (which positions never satisfy a ``when`` condition; default
        :meth:`TrainingContext.unknown`). ``max_requests``: latch slots for requests with
        sticky conditions (one is a scratch slot)."""
        self.device = torch.device(device)
        self.resae = resae.to(self.device).eval()
        self.layers = resae.layers
        n_layers, d = len(self.layers), resae.d_model
        self.max_tokens, self.max_rows, E = max_tokens, max_rows, MAX_EDITS_PER_LAYER
        self.graph_body = self.device.type == "cuda" if graph_body is None else graph_body
        self.skip_inactive = True
        """Skip a layer's add / encode when no row needs it (``False``: always run the graph
        body's masked arithmetic, as a replay of a captured graph with every flag set does)."""

        def table(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=self.device)

        self.add_vec = table(n_layers, max_rows, d, dtype=dtype)                        # (L, R, d)
        self.edit_feature = table(n_layers, max_rows, E)                                # (L, R, E)
        self.edit_line = table(n_layers, max_rows, E, 2, dtype=torch.float32)           # a, b
        self.edit_gate = table(n_layers, max_rows, E)        # gate column (0: ungated) (L, R, E)
        C = MAX_CONDITIONS
        self.gated_vec = table(n_layers, max_rows * C, d, dtype=torch.float32)      # (L, R·C, d)
        self.has_add = np.zeros((n_layers, max_rows), dtype=bool)
        self.n_slots = np.zeros((n_layers, max_rows), dtype=np.int64)
        self.has_gated_slot = np.zeros((n_layers, max_rows), dtype=bool)
        self.has_gated_vec = np.zeros((n_layers, max_rows), dtype=bool)
        self.gates = GateState(n_layers, max_rows=max_rows, max_tokens=max_tokens,
                               max_requests=max_requests,
                               context=context or TrainingContext.unknown(), device=self.device)
        self._gate_columns = torch.arange(C, device=self.device)
        self._token_rows = _Staged((max_tokens,), torch.long, self.device)              # (T,)
        self._encode_idx = _Staged((n_layers, max_tokens), torch.long, self.device)     # (L, T)
        self._gated_idx = _Staged((n_layers, max_tokens), torch.long, self.device)      # (L, T)
        self._meta = _Staged((3, max_tokens), torch.long, self.device)  # GateState meta (3, T)
        # [add, encode, gated vectors, conditions] per layer (4, L)
        self._flags = _Staged((4, n_layers), torch.bool, self.device)
        self.token_rows = self._token_rows.device
        self._token_rows_np = self._token_rows.np
        self.encode_idx = self._encode_idx.device
        self._capture_idx = _Staged((n_layers, max_tokens), torch.long, self.device)
        self.capture_idx = self._capture_idx.np                                         # (L, T)
        self.n_encode = [0] * n_layers
        self.n_capture = [0] * n_layers
        self.layer_add = [False] * n_layers
        self.slots_used = [0] * n_layers            # most slots of an encoded token's row
        self.n_gated = [0] * n_layers               # tokens whose row has gated vectors at i
        self.layer_conditions = [False] * n_layers  # some token's row has a condition at i
        self.layer_sticky = [False] * n_layers      # ... a sticky one
        self.layer_gated_slots = [False] * n_layers  # some encoded token has a gated slot
        self.z_buf = table(max_tokens, E + C, dtype=torch.float32)  # graph body: read codes
        self.h_buf = table(n_layers, max_tokens, d, dtype=dtype)                       # (L, T, d)
        self._n_pass = 0                             # tokens in the pass the tables were set for
        self.active = False
        self.op_seconds = 0.0                     # time inside the op (resae_stats)
        self._gemm = [EncoderGemm(sae) for sae in resae.saes]
        self._inputs = SaeInputs(resae)
        cpu_eager = screen and self.device.type == "cpu" and not self.graph_body
        self.screens = [TopKScreen.for_sae(sae, gemm) if cpu_eager else None
                        for sae, gemm in zip(resae.saes, self._gemm, strict=True)]
        self._rows: dict[str, _Row] = {}          # row content hash -> row
        self._free = list(range(max_rows - 1, 0, -1))
        self._requests: dict[str, tuple[RequestRows, tuple[str, str]]] = {}

    # ------------------------------------------------------------------ rows

    @property
    def rows_in_use(self) -> int:
        return self.max_rows - 1 - len(self._free)

    def _claim_row(self, edits: list[SteerEdit], vectors: list[SteerVector],
                   conditions: tuple[Condition, ...] = ()) -> tuple[int, str]:
        """A row for one phase's edits and vectors; ``conditions`` are the request's (column
        ``c`` is ``conditions[c]``): the row holds those its edits use and the sticky ones."""
        whens = [e.when for e in edits] + [v.when for v in vectors]
        used = {w for w in whens if w is not None}
        row_conditions = tuple((c, self.layers.index(cond.layer), cond)
                               for c, cond in enumerate(conditions)
                               if cond in used or cond.sticky)
        if not edits and not vectors and not row_conditions:
            return 0, ""
        columns = {cond: c for c, _, cond in row_conditions}

        def column(when: Condition | None) -> int:
            return -1 if when is None else columns[when]

        key = repr((sorted((e.layer, e.feature, e.mode, e.value, column(e.when)) for e in edits),
                    sorted((v.layer, v.vector, column(v.when)) for v in vectors),
                    [(c, cond.to_wire()) for c, _, cond in row_conditions]))
        row = self._rows.get(key)
        if row is not None:
            row.refs += 1
            return row.index, key
        if not self._free:
            raise TablesFullError(f"all {self.max_rows - 1} steering rows are in use")
        index = self._free.pop()
        self._write_row(index, edits, vectors, columns)
        self.gates.write_row(index, row_conditions)
        self._rows[key] = _Row(index, 1)
        return index, key

    def _write_row(self, r: int, edits: list[SteerEdit], vectors: list[SteerVector],
                   columns: dict[Condition, int]) -> None:
        """Ungated add edits and vectors fold into ``add_vec``; gated ones into ``gated_vec``
        (one vector per condition column); reading edits take slots with their gate column."""
        C, E = MAX_CONDITIONS, MAX_EDITS_PER_LAYER
        for i, layer in enumerate(self.layers):
            sae, scale = self.resae.saes[i], float(self.resae.scales[i])
            # on the device; the has_add test below syncs once per new config, outside the op
            add = torch.zeros(self.resae.d_model, dtype=torch.float64, device=self.device)
            gated = torch.zeros(C, self.resae.d_model, dtype=torch.float64, device=self.device)
            slot = 0
            feature = torch.zeros(E, dtype=torch.long)
            line = torch.zeros(E, 2)
            gate = torch.zeros(E, dtype=torch.long)
            for edit in (e for e in edits if e.layer == layer):
                if edit.mode == "add":
                    vec = edit.value * scale * sae.W_dec[edit.feature].detach().double()
                    if edit.when is None:
                        add += vec
                    else:
                        gated[columns[edit.when]] += vec
                    continue
                feature[slot] = edit.feature
                line[slot] = torch.tensor(edit_line(EditOp[edit.mode.upper()], edit.value))
                gate[slot] = 0 if edit.when is None else 1 + columns[edit.when]
                slot += 1
            for v in (v for v in vectors if v.layer == layer):
                vec = torch.tensor(v.vector, dtype=torch.float64, device=self.device)
                if v.when is None:
                    add += vec
                else:
                    gated[columns[v.when]] += vec
            self.edit_feature[i, r] = feature.to(self.device)     # one copy per table row
            self.edit_line[i, r] = line.to(self.device)
            self.edit_gate[i, r] = gate.to(self.device)
            self.add_vec[i, r] = add.to(self.add_vec.dtype)
            self.gated_vec[i, r * C:(r + 1) * C] = gated.float()
            self.n_slots[i, r] = slot
            self.has_add[i, r] = bool(add.abs().sum() > 0)
            self.has_gated_vec[i, r] = bool(gated.abs().sum() > 0)
            self.has_gated_slot[i, r] = bool((gate > 0).any())

    def _release_row(self, key: str) -> None:
        row = self._rows.get(key)
        if row is None:
            return
        row.refs -= 1
        if row.refs == 0:
            del self._rows[key]
            r, C = row.index, MAX_CONDITIONS
            self.add_vec[:, r].zero_()
            self.edit_line[:, r].zero_()
            self.edit_gate[:, r].zero_()
            self.gated_vec[:, r * C:(r + 1) * C].zero_()
            self.has_add[:, r] = self.has_gated_vec[:, r] = self.has_gated_slot[:, r] = False
            self.n_slots[:, r] = 0
            self.gates.clear_row(r)
            self._free.append(r)

    def claim(self, req_id: str, spec: SteeringSpec | None) -> RequestRows:
        """Rows for a request (shared with identical configs) and, when it has sticky
        conditions, a latch slot of its own; idempotent per ``req_id``."""
        known = self._requests.get(req_id)
        if known is not None:
            return known[0]
        if spec is None:
            rows, keys = RequestRows(0, 0, ()), ("", "")
        else:
            conditions = spec.conditions

            def phase(p: str) -> tuple[int, str]:
                return self._claim_row([e for e in spec.edits if e.phase in (p, "all")],
                                       [v for v in spec.vectors if v.phase in (p, "all")],
                                       conditions)
            (prompt, k1) = phase("prompt")
            k2 = ""
            try:
                (generation, k2) = phase("generation")
                slot = 0
                if any(c.sticky for c in conditions):
                    try:
                        slot = self.gates.claim_slot()
                    except RequestSlotsFullError as err:
                        raise TablesFullError(str(err)) from None
            except TablesFullError:
                self._release_row(k1)
                self._release_row(k2)
                raise
            monitor = {self.layers.index(layer) for layer in spec.monitor_layers}
            rows = RequestRows(prompt, generation, tuple(sorted(monitor)), slot)
            keys = (k1, k2)
        self._requests[req_id] = (rows, keys)
        return rows

    def release(self, req_id: str) -> None:
        """Give back a finished or aborted request's rows (zeroed in place when unused) and
        latch slot."""
        known = self._requests.pop(req_id, None)
        if known is not None:
            for key in known[1]:
                self._release_row(key)
            self.gates.release_slot(known[0].slot)

    def rows_of(self, req_id: str) -> RequestRows | None:
        """Rows of a request already claimed (``None`` when new)."""
        known = self._requests.get(req_id)
        return None if known is None else known[0]

    def known_requests(self) -> list[str]:
        return list(self._requests)

    # ------------------------------------------------------------------ per step (host)

    def prepare_step(self, n_tokens: int, rows: list[RequestRows], counts: np.ndarray,
                     starts: np.ndarray, num_prompt: np.ndarray) -> None:
        """Fill ``token_rows``, the per-layer token lists and flags for one forward pass of
        ``n_tokens`` (padded) tokens, and copy them to the device.

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
            self.deactivate()
            return
        self._wait_for_upload()
        tok_req = np.repeat(np.arange(len(rows)), counts)
        offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        positions = starts[tok_req] + offsets
        token_rows = np.where(positions < num_prompt[tok_req], prompt_rows[tok_req],
                              gen_rows[tok_req])
        self._token_rows_np[:total] = token_rows
        self._token_rows_np[total:n_tokens] = 0
        gated = bool(self.gates.rows) and bool(self.gates.row_has[token_rows].any())
        flags = self._flags.np
        for i in range(len(self.layers)):
            slots = self.n_slots[i][token_rows]                                    # (total,)
            wanted = np.array([i in r.monitor_layers for r in rows], dtype=bool)
            monitored = wanted[tok_req] if wanted.any() else np.zeros(total, dtype=bool)
            self._prepare_gates(i, token_rows if gated else None)
            enc = (np.flatnonzero((slots > 0) | self.gates.cond_at[i][token_rows]) if gated
                   else np.flatnonzero(slots))
            cap = np.flatnonzero(monitored)
            self.n_encode[i], self.n_capture[i] = len(enc), len(cap)
            self._encode_idx.np[i, : len(enc)] = enc
            self.capture_idx[i, : len(cap)] = cap
            self.layer_add[i] = bool(self.has_add[i][token_rows].any())
            self.slots_used[i] = int(slots.max()) if len(enc) else 0
            flags[0, i], flags[1, i] = self.layer_add[i], len(enc) > 0
            flags[2, i], flags[3, i] = self.n_gated[i] > 0, self.layer_conditions[i]
        if gated:
            GateState.fill_meta(self._meta.np, total, n_tokens,
                                np.array([r.slot for r in rows], dtype=np.int64), counts,
                                positions)
        self._n_pass = n_tokens
        self.active = True
        self._upload(n_tokens, encode=not self.graph_body, gated=gated)

    def _prepare_gates(self, i: int, token_rows: np.ndarray | None) -> None:
        """Layer ``i``'s gate flags and gated-vector token list for one pass (``None``: no
        token's row has a condition)."""
        if token_rows is None:
            self.layer_conditions[i] = self.layer_sticky[i] = False
            self.layer_gated_slots[i], self.n_gated[i] = False, 0
            return
        self.layer_conditions[i] = bool(self.gates.cond_at[i][token_rows].any())
        self.layer_sticky[i] = bool(self.gates.sticky_at[i][token_rows].any())
        self.layer_gated_slots[i] = bool(self.has_gated_slot[i][token_rows].any())
        gv = np.flatnonzero(self.has_gated_vec[i][token_rows])
        self.n_gated[i] = len(gv)
        self._gated_idx.np[i, : len(gv)] = gv

    def take_captures(self) -> dict[int, tuple[np.ndarray, LayerCapture]]:
        """This pass's captures by dictionary position, with their flat token indices: the
        edited block outputs of the monitored tokens, gathered from ``h_buf`` after the pass
        (on the device, on the current stream)."""
        out: dict[int, tuple[np.ndarray, LayerCapture]] = {}
        if not self.active:
            return out
        residual = self.resae.mode == "resae"
        for i in range(len(self.layers)):
            nc = self.n_capture[i]
            if not nc:
                continue
            idx = self.capture_idx[i, :nc].copy()
            cap = self._capture_idx.device[i, :nc]
            h_prev = self.h_buf[i - 1].index_select(0, cap) if i and residual else None
            out[i] = (idx, LayerCapture(self.h_buf[i].index_select(0, cap), h_prev))
        return out

    def captures_ready(self) -> torch.cuda.Event | None:
        """On CUDA, an event recorded now on the current stream: the monitor waits for it
        before reading what :meth:`take_captures` gathered (``None`` elsewhere)."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def deactivate(self) -> None:
        """No intervention and no capture in the next pass (device flags cleared, and the
        token rows too: a graph replayed without conditional nodes runs its masked work)."""
        self.active = False
        self.layer_conditions = [False] * len(self.layers)
        self.n_gated = [0] * len(self.layers)
        if self._flags.np.any():
            self._wait_for_upload()
            self._flags.np[:] = False
            self._token_rows_np[:] = 0
            self._upload(self.max_tokens, encode=False)

    def _upload(self, n_tokens: int, *, encode: bool, gated: bool = False) -> None:
        self._token_rows.upload(n_tokens)
        self._flags.upload()
        if any(self.n_capture):
            self._capture_idx.upload(n_tokens)
        if encode:
            self._encode_idx.upload(n_tokens)
            if gated:
                self._gated_idx.upload(n_tokens)
        if gated:
            self._meta.upload(n_tokens)
        if self.device.type == "cuda":
            self._uploaded = torch.cuda.Event()
            self._uploaded.record()

    def _wait_for_upload(self) -> None:
        """Before the host rewrites its pinned buffers: the previous copies out of them are
        done (at most one pass behind; never inside the op)."""
        event = getattr(self, "_uploaded", None)
        if event is not None:
            event.synchronize()

    # ------------------------------------------------------------------ the op body

    @torch.no_grad()
    def apply(self, i: int, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        """Edit ``hidden`` in place so that the block output ``h = hidden + residual`` (or
        ``h = hidden`` when ``residual`` is ``None``: no deferred add) becomes ``h + δ`` (layer
        i), and keep ``h + δ`` in ``h_buf[i]`` (the next layer's ``h_prev``, the monitor's
        capture)."""
        if self.graph_body:
            self._apply_graph(i, hidden, residual)
        else:
            self._apply_eager(i, hidden, residual)

    def _block_output(self, i: int, hidden: torch.Tensor, residual: torch.Tensor | None
                      ) -> torch.Tensor:
        n = hidden.shape[0]
        return (self.h_buf[i, :n].copy_(hidden) if residual is None                 # (n, d)
                else torch.add(hidden, residual, out=self.h_buf[i, :n]))

    # -- the eager body: only the tokens that need it (CPU default, the oracle)

    def _apply_eager(self, i: int, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        if not self.active:
            return
        n = hidden.shape[0]
        h = self._block_output(i, hidden, residual)
        delta = (self.add_vec[i].index_select(0, self.token_rows[:n])             # (n, d)
                 if self.layer_add[i] else None)
        if self.n_encode[i]:
            delta = self._encode(i, hidden, h, delta)
        if delta is not None:
            hidden.add_(delta)
            h.add_(delta)
        if self.n_gated[i]:
            m = self.n_gated[i]
            self._add_gated(i, hidden, h, None if m == n else self._gated_idx.device[i, :m])

    def _encode(self, i: int, hidden: torch.Tensor, h: torch.Tensor, delta: torch.Tensor | None
                ) -> torch.Tensor | None:
        """Encode the tokens whose slots read a feature or whose conditions are at this layer;
        conditions write their gates, slot deltas are added to ``delta`` (returned), or to
        ``hidden`` and ``h`` directly when only some tokens are encoded."""
        n, ne = hidden.shape[0], self.n_encode[i]
        whole = ne == n                        # decode steps: every token, no gather/scatter
        idx = self.encode_idx[i, :ne]                                              # (ne,)
        h_prev = self.h_buf[i - 1, :n] if i else None
        if not whole:
            h_prev = None if h_prev is None else h_prev.index_select(0, idx)
        rows = self.token_rows[:n] if whole else self.token_rows.index_select(0, idx)
        sae = self.resae.saes[i]
        h_in = h if whole else h.index_select(0, idx)
        u = self._inputs(i, h_in, h_prev)
        used = self.slots_used[i]                 # slots past it are empty in every row
        feature = self.edit_feature[i, :, :used].index_select(0, rows)             # (ne, s)
        conditions = self.layer_conditions[i]
        read = (torch.cat([feature, self.gates.cond_feature.index_select(0, rows)], 1)
                if conditions else feature)                                        # (ne, s[+C])
        screen, gemm = self.screens[i], self._gemm[i]
        z_at = (screen.codes_at(u, read) if screen is not None
                else codes_at(activate(sae, gemm(u.to(gemm.dtype))), read))       # (ne, s[+C])
        if conditions:
            self.gates.evaluate(i, h_in, z_at[:, used:], rows, self._meta.device,
                                None if whole else idx, n, sticky=self.layer_sticky[i])
            z_at = z_at[:, :used]
        if not used:
            return delta
        line = self.edit_line[i, :, :used].index_select(0, rows)                  # (ne, s, 2)
        coef = torch.addcmul(line[..., 1], line[..., 0], z_at)
        if self.layer_gated_slots[i]:
            gate = self.gates.gate[:n] if whole else self.gates.gate.index_select(0, idx)
            coef = coef * gate.gather(1, self.edit_gate[i, :, :used].index_select(0, rows))
        delta_enc = (self.resae.scales[i] * torch.einsum(
            "ne,ned->nd", coef, sae.W_dec[feature])).to(hidden.dtype)
        if whole:
            delta = delta_enc if delta is None else delta.add_(delta_enc)
        else:
            hidden.index_add_(0, idx, delta_enc)
            h.index_add_(0, idx, delta_enc)
        return delta

    def _add_gated(self, i: int, hidden: torch.Tensor, h: torch.Tensor,
                   idx: torch.Tensor | None) -> None:
        """Add ``Σ_c gate[t, 1 + c] · gated_vec[i, row, c]`` to the tokens ``idx`` (every
        token when ``None``); a gate of 0 adds exactly 0."""
        n = hidden.shape[0]
        rows = self.token_rows[:n] if idx is None else self.token_rows.index_select(0, idx)
        gate = self.gates.gate[:n] if idx is None else self.gates.gate.index_select(0, idx)
        bag = rows.unsqueeze(1) * MAX_CONDITIONS + self._gate_columns               # (m, C)
        delta = F.embedding_bag(bag, self.gated_vec[i], per_sample_weights=gate[:, 1:],
                                mode="sum").to(hidden.dtype)                        # (m, d)
        if idx is None:
            hidden.add_(delta)
            h.add_(delta)
        else:
            hidden.index_add_(0, idx, delta)
            h.index_add_(0, idx, delta)

    # -- the graph body: fixed shapes, persistent tables, device-side flags (CUDA default)

    def _apply_graph(self, i: int, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        capturing = hidden.is_cuda and torch.cuda.is_current_stream_capturing()
        if not (capturing or self.active) and self.skip_inactive:
            return
        h = self._block_output(i, hidden, residual)
        # The reads and conditions see the clean block output, so they go first (the adds
        # commute); gated vectors go last, after this layer's conditions.
        self._gated(1, i, capturing, lambda: self._read_all(i, h))
        self._gated(3, i, capturing, lambda: self._conditions_all(i, h))
        self._gated(1, i, capturing, lambda: self._move_all(i, hidden, h))
        self._gated(0, i, capturing, lambda: self._add_rows(i, hidden, h))
        self._gated(2, i, capturing, lambda: self._add_gated(i, hidden, h, None))

    def _gated(self, kind: int, i: int, capturing: bool, body: Callable[[], None]) -> None:
        """Run ``body`` when flag ``kind`` (0 add, 1 encode, 2 gated vectors, 3 conditions) of
        layer ``i`` is set: on the device inside CUDA-graph capture (a conditional node), else
        by the host's copy."""
        if not capturing:
            host = (self.layer_add[i], self.n_encode[i], self.n_gated[i],
                    self.layer_conditions[i])[kind]
            if not self.skip_inactive or host:
                body()
            return
        graph = _capturing_graph()
        if graph is None:            # no conditional nodes in this torch: masked work always
            body()
            return
        graph.begin_capture_to_if_node(self._flags.device[kind, i])
        try:
            body()
        finally:
            graph.end_capture_to_conditional_node()

    def _add_rows(self, i: int, hidden: torch.Tensor, h: torch.Tensor) -> None:
        delta = self.add_vec[i].index_select(0, self.token_rows[: hidden.shape[0]])     # (n, d)
        hidden.add_(delta)
        h.add_(delta)

    def _read_all(self, i: int, h: torch.Tensor) -> None:
        """Every token's codes at its slots' features and its conditions' features, into
        ``z_buf`` (n, E + C)."""
        n = h.shape[0]
        rows = self.token_rows[:n]
        sae, gemm = self.resae.saes[i], self._gemm[i]
        u = self._inputs(i, h, self.h_buf[i - 1, :n] if i else None)
        read = torch.cat([self.edit_feature[i].index_select(0, rows),
                          self.gates.cond_feature.index_select(0, rows)], 1)       # (n, E + C)
        self.z_buf[:n].copy_(codes_at(activate(sae, gemm(u.to(gemm.dtype))), read))

    def _conditions_all(self, i: int, h: torch.Tensor) -> None:
        n = h.shape[0]
        self.gates.evaluate(i, h, self.z_buf[:n, MAX_EDITS_PER_LAYER:], self.token_rows[:n],
                            self._meta.device, None, n, sticky=True)

    def _move_all(self, i: int, hidden: torch.Tensor, h: torch.Tensor) -> None:
        """Every token's slots applied with their gates; empty slots and row 0 have the line
        ``(0, 0)``, a zero coefficient, and ungated slots the gate column 0 (exactly 1), so
        unsteered tokens move by exactly 0."""
        n = hidden.shape[0]
        rows = self.token_rows[:n]
        sae = self.resae.saes[i]
        feature = self.edit_feature[i].index_select(0, rows)                       # (n, E)
        z_at = self.z_buf[:n, :MAX_EDITS_PER_LAYER]                                # (n, E)
        line = self.edit_line[i].index_select(0, rows)                            # (n, E, 2)
        gate = self.gates.gate[:n].gather(1, self.edit_gate[i].index_select(0, rows))
        coef = torch.addcmul(line[..., 1], line[..., 0], z_at).mul_(gate)
        # Σ_e coef[n, e] · W_dec[feature[n, e]] without an (n, E, d) gather
        moved = F.embedding_bag(feature, sae.W_dec, per_sample_weights=coef.to(sae.W_dec.dtype),
                                mode="sum")                                         # (n, d)
        delta = (self.resae.scales[i] * moved).to(hidden.dtype)
        hidden.add_(delta)
        h.add_(delta)
