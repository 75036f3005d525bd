"""``when`` gates of the steering tables: conditions per row, latches per request, gates per token.

An edit or vector with ``when`` (:class:`~resae_serve.engine.spec.Condition`) applies on the
tokens where the condition's feature code at its layer is ``>= value``, decided inside the op in
the same forward pass (no host round trip, so it survives CUDA graphs). Column ``c`` is the
request's ``c``-th distinct condition (``SteeringSpec.conditions``, at most ``C =
MAX_CONDITIONS``); a row holds the conditions its own edits use plus the request's sticky ones
(a sticky condition that holds on a prompt token gates the generated tokens too)::

    cond_layer[r, c]     (R, C)     dictionary position i of the condition (-1: none)
    cond_feature/value   (R, C)     the condition: z[feature] >= value
    cond_sticky/ood      (R, C)     latch; let out-of-distribution positions satisfy it
    latch[s, c]          (S, C)     first position where sticky condition c held in request
                                    slot s (``NEVER``: not yet); slot 0 is a scratch slot
    gate[t, 1 + c]       (T, 1 + C) 1.0 where condition c holds on token t in this pass, else
                                    0.0; column 0 is a constant 1 (the ungated edits' gate)
    meta[:, t]           (3, T)     per token: request slot, flat index of its request's first
                                    token in the pass (always ``<= t``, so a stale entry still
                                    indexes inside any pass), sequence position

At the condition's layer ``i``, from the block output ``h`` before that layer's own edits (the
input the edits read), :meth:`GateState.evaluate` writes the gate columns::

    holds = z_i[feature] >= value  and  (in distribution or include_out_of_distribution)
    gate  = holds                                             (not sticky)
    gate  = any(holds over the request's tokens so far in the pass) or latch <= position
    latch = min(latch, positions where it held)               (sticky)

Out of distribution (:mod:`resae_serve.context`): position 0 when the dictionary's training
skipped it, and ``||h|| > norm_limit(i)``. The latch stores a position rather than a bit, so a
preempted request that is recomputed from its prompt gets the same gates again.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from resae_serve.context import TrainingContext
from resae_serve.engine.spec import MAX_CONDITIONS, Condition
from resae_serve.errors import ResaeError

NEVER = torch.iinfo(torch.long).max
"""Latch value of a sticky condition that has not held yet."""


class RequestSlotsFullError(ResaeError):
    """Every latch slot is held by a request with sticky conditions."""


class GateState:
    """The condition tables, latches and per-token gates (module docstring); the tables
    (:class:`~resae_serve.engine.tables.SteeringTables`) own one."""

    def __init__(self, n_layers: int, *, max_rows: int, max_tokens: int, max_requests: int,
                 context: TrainingContext, device: torch.device) -> None:
        C = MAX_CONDITIONS
        self.context, self.device = context, device
        self.cond_layer = torch.full((max_rows, C), -1, dtype=torch.long, device=device)
        self.cond_feature = torch.zeros(max_rows, C, dtype=torch.long, device=device)
        self.cond_value = torch.zeros(max_rows, C, dtype=torch.float32, device=device)
        self.cond_sticky = torch.zeros(max_rows, C, dtype=torch.bool, device=device)
        self.cond_ood = torch.zeros(max_rows, C, dtype=torch.bool, device=device)
        self.latch = torch.full((max_requests, C), NEVER, dtype=torch.long, device=device)
        self.gate = torch.zeros(max_tokens, 1 + C, dtype=torch.float32, device=device)
        self.gate[:, 0] = 1.0
        self.cond_at = np.zeros((n_layers, max_rows), dtype=bool)    # host: row has one at i
        self.sticky_at = np.zeros((n_layers, max_rows), dtype=bool)
        self.rows: set[int] = set()          # rows with a condition (host fast path: none)
        self.row_has = np.zeros(max_rows, dtype=bool)                 # host: r in rows
        self._free_slots = list(range(max_requests - 1, 0, -1))

    # ------------------------------------------------------------------ rows and slots

    def write_row(self, r: int, conditions: Sequence[tuple[int, int, Condition]]) -> None:
        """Row ``r``'s conditions as ``(column, dictionary position, condition)``."""
        self.clear_row(r)
        if not conditions:
            return
        C = MAX_CONDITIONS
        layer, feature = [-1] * C, [0] * C
        value, sticky, ood = [0.0] * C, [False] * C, [False] * C
        for c, i, cond in conditions:
            layer[c], feature[c], value[c] = i, cond.feature, cond.value
            sticky[c], ood[c] = cond.sticky, cond.include_out_of_distribution
            self.cond_at[i, r] = True
            self.sticky_at[i, r] |= cond.sticky
        self.cond_layer[r] = torch.tensor(layer, device=self.device)
        self.cond_feature[r] = torch.tensor(feature, device=self.device)
        self.cond_value[r] = torch.tensor(value, device=self.device)
        self.cond_sticky[r] = torch.tensor(sticky, device=self.device)
        self.cond_ood[r] = torch.tensor(ood, device=self.device)
        self.rows.add(r)
        self.row_has[r] = True

    def clear_row(self, r: int) -> None:
        if r in self.rows:
            self.cond_layer[r] = -1
            self.cond_sticky[r] = False
            self.cond_at[:, r] = self.sticky_at[:, r] = False
            self.rows.discard(r)
            self.row_has[r] = False

    def claim_slot(self) -> int:
        """A latch slot for a request with sticky conditions, reset in place."""
        if not self._free_slots:
            raise RequestSlotsFullError(f"all {self.latch.shape[0] - 1} latch slots of "
                                        "requests with sticky conditions are in use")
        slot = self._free_slots.pop()
        self.latch[slot].fill_(NEVER)
        return slot

    def release_slot(self, slot: int) -> None:
        if slot:
            self._free_slots.append(slot)

    # ------------------------------------------------------------------ per step (host)

    @staticmethod
    def fill_meta(meta: np.ndarray, total: int, n_tokens: int, slots: np.ndarray,
                  counts: np.ndarray, positions: np.ndarray) -> None:
        """Per-token request slot, segment start and position of one pass into ``meta``
        (3, T); ``slots[j]`` is request ``j``'s latch slot. Padding: slot 0, its own index."""
        firsts = np.cumsum(counts) - counts
        meta[0, :total] = np.repeat(slots, counts)
        meta[1, :total] = np.repeat(firsts, counts)
        meta[2, :total] = positions
        meta[0, total:n_tokens] = 0
        meta[1, total:n_tokens] = np.arange(total, n_tokens)
        meta[2, total:n_tokens] = 0

    # ------------------------------------------------------------------ the op

    def evaluate(self, i: int, h: torch.Tensor, z: torch.Tensor, rows: torch.Tensor,
                 meta: torch.Tensor, idx: torch.Tensor | None, n: int, *, sticky: bool) -> None:
        """Write the gate columns of the conditions at dictionary position ``i``.

        ``h`` (m, d): the block output before layer ``i``'s edits of the ``m`` tokens ``idx``
        (every one of the pass's ``n`` when ``None``); ``z`` (m, C): the code of each column's
        condition feature (``cond_feature[rows]``); ``rows`` (m,) their table rows; ``meta``
        the device copy of the per-token metadata (3, T). ``sticky``: some row has a sticky
        condition here (the graph body passes ``True``: masked, fixed shapes)."""
        here = self.cond_layer.index_select(0, rows) == i                          # (m, C)
        holds = z >= self.cond_value.index_select(0, rows)
        info = meta[:, :n] if idx is None else meta.index_select(1, idx)            # (3, m)
        slot, position = info[0], info[2]
        inside = self._in_distribution(i, h, position)                             # (m,)
        if inside is not None:
            holds &= inside.unsqueeze(1) | self.cond_ood.index_select(0, rows)
        holds &= here
        gate = holds
        if sticky:
            latching = self.cond_sticky.index_select(0, rows) & here
            so_far = self._held_so_far(holds, meta[1, :n], idx, n)
            latched = self.latch.index_select(0, slot) <= position.unsqueeze(1)
            gate = torch.where(latching, so_far | latched, holds)
            first = torch.where(holds & latching, position.unsqueeze(1),
                                torch.full_like(position, NEVER).unsqueeze(1))      # (m, C)
            self.latch.scatter_reduce_(0, slot.unsqueeze(1).expand_as(first), first, "amin")
        if idx is None:
            columns = self.gate[:n, 1:]
            columns.copy_(torch.where(here, gate.to(columns.dtype), columns))
        else:
            sub = self.gate.index_select(0, idx)                                   # (m, 1 + C)
            sub[:, 1:] = torch.where(here, gate.to(sub.dtype), sub[:, 1:])
            self.gate.index_copy_(0, idx, sub)

    def _in_distribution(self, i: int, h: torch.Tensor, position: torch.Tensor
                         ) -> torch.Tensor | None:
        """(m,) bool: the token may satisfy a condition (``None``: every token may)."""
        inside = position != 0 if self.context.skips_first_position else None
        limit = self.context.norm_limit(i)
        if limit is not None:
            below = torch.linalg.vector_norm(h.float(), dim=-1) <= limit
            inside = below if inside is None else inside & below
        return inside

    @staticmethod
    def _held_so_far(holds: torch.Tensor, first: torch.Tensor, idx: torch.Tensor | None,
                     n: int) -> torch.Tensor:
        """(m, C) bool: the condition held on this token or an earlier one of the same request
        in this pass (a cumulative count minus the count before the request's first token)."""
        count = holds.to(torch.int32)
        if idx is not None:                     # scatter the subset into the whole pass
            count = torch.zeros(n, holds.shape[1], dtype=torch.int32,
                                device=holds.device).index_copy_(0, idx, count)
        total = count.cumsum(0, dtype=torch.int32)                                  # (n, C)
        held = (total - (total - count).index_select(0, first)) > 0
        return held if idx is None else held.index_select(0, idx)
