"""Feature interventions: per-request specs and the pure tensor ops that apply them.

At layer m with scale ``s_m`` (``σ_m`` for residual layers) and decoder row ``d_i`` of feature
``i`` (docs/ARCHITECTURE.md §1.5)::

    add     h += α · s_m · d_i                   (value = α)
    clamp   h += s_m · (v − z_i) · d_i           (value = v; error-preserving: the SAE's
                                                  reconstruction error stays in h)
    scale   h += s_m · (s − 1) · z_i · d_i       (value = s; clamp to s · z_i)
    ablate  h += −s_m · z_i · d_i                (clamp to 0)

``z_i`` is the feature's activation on the clean input of that layer. Several edits on one
token add their deltas, each computed from the same clean ``z``. Only the layer named changes;
the transformer carries the change forward (never also add ``A·δ`` downstream).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal, NamedTuple, get_args

import torch

from resae_serve.errors import ResaeError

EditMode = Literal["add", "clamp", "scale", "ablate"]
EDIT_MODES: tuple[str, ...] = get_args(EditMode)


class InterventionError(ResaeError):
    """An intervention names a layer, feature or value the dictionary cannot take."""


class EditOp(IntEnum):
    """Integer codes of the edit modes, as stored in per-token tables."""

    NONE = 0
    ADD = 1
    CLAMP = 2
    SCALE = 3
    ABLATE = 4


@dataclass(frozen=True)
class FeatureEdit:
    """One edit of one feature at one layer (a per-request spec)."""

    layer: int
    """Model block index; must be one of the dictionary's layers."""
    feature: int
    """Latent index in ``0 .. d_sae - 1``."""
    mode: EditMode = "add"
    """add / clamp / scale / ablate, see the module docstring."""
    value: float = 0.0
    """α for add, the pinned value for clamp, the factor for scale; ignored by ablate."""

    def __post_init__(self) -> None:
        if self.mode not in EDIT_MODES:
            raise InterventionError(f"mode={self.mode!r}; allowed: {', '.join(EDIT_MODES)}")
        if not math.isfinite(self.value):
            raise InterventionError(f"value={self.value!r} for feature {self.feature}; "
                                    "must be a finite number")

    @property
    def op(self) -> EditOp:
        """The integer code of :attr:`mode`."""
        return EditOp[self.mode.upper()]


class EditTable(NamedTuple):
    """Per-token edits at one layer, ``E`` slots per token; unused slots have op NONE."""

    feature: torch.Tensor
    """(N, E) int64 latent ids (any valid id in unused slots)."""
    op: torch.Tensor
    """(N, E) int64 :class:`EditOp` codes."""
    value: torch.Tensor
    """(N, E) float values."""


class Gate(NamedTuple):
    """A condition on an edit, in tensor form (the engine's ``Condition``): the edit applies on
    the tokens where ``feature``'s code at ``layer`` is ``>= value``, read from the same input
    the edits at ``layer`` read."""

    layer: int
    feature: int
    value: float
    sticky: bool = False
    """Once it holds it holds on every later token (the tokens are one sequence, in order)."""
    include_out_of_distribution: bool = False
    """Let positions outside the training distribution satisfy it (else they never do)."""


class GatedEdit(NamedTuple):
    """Edits and a raw vector at ``layer`` that apply only on the tokens where ``gate`` holds
    (``gate.layer`` at or before ``layer``)."""

    gate: Gate
    layer: int
    table: EditTable | None = None
    """(N, E) feature edits, or ``None``."""
    vector: torch.Tensor | None = None
    """(d,) added to the block output, or ``None``."""


def edit_table(edits: Sequence[FeatureEdit], n_tokens: int, *, d_sae: int,
               device: torch.device | str = "cpu") -> EditTable:
    """The same edits on every one of ``n_tokens`` tokens, validated against ``d_sae``."""
    for edit in edits:
        if not 0 <= edit.feature < d_sae:
            raise InterventionError(
                f"feature={edit.feature} at layer {edit.layer}; allowed 0..{d_sae - 1}"
            )
    n_edits = max(len(edits), 1)
    feature = torch.zeros(n_tokens, n_edits, dtype=torch.long, device=device)
    op = torch.zeros(n_tokens, n_edits, dtype=torch.long, device=device)
    value = torch.zeros(n_tokens, n_edits, device=device)
    for slot, edit in enumerate(edits):
        feature[:, slot], op[:, slot], value[:, slot] = edit.feature, int(edit.op), edit.value
    return EditTable(feature, op, value)


def edit_line(op: EditOp, value: float) -> tuple[float, float]:
    """``(a, b)`` with ``edit_coefficients(z, op, value) == a·z + b`` (NONE: ``(0, 0)``):
    what the engine's tables store per slot, so one ``addcmul`` gives every slot's change."""
    return {EditOp.NONE: (0.0, 0.0), EditOp.ADD: (0.0, value), EditOp.CLAMP: (-1.0, value),
            EditOp.SCALE: (value - 1.0, 0.0), EditOp.ABLATE: (-1.0, 0.0)}[op]


def edit_coefficients(z_at: torch.Tensor, op: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Change of each edited latent, ``(N, E)``: how far along ``s_m · d_i`` to move ``h``.

    ``z_at`` holds the clean activation of each slot's feature, ``(N, E)``.
    """
    zero = torch.zeros_like(z_at)
    coef = torch.where(op == EditOp.ADD, value, zero)
    coef = torch.where(op == EditOp.CLAMP, value - z_at, coef)
    coef = torch.where(op == EditOp.SCALE, (value - 1) * z_at, coef)
    return torch.where(op == EditOp.ABLATE, -z_at, coef)


def feature_delta(
    z: torch.Tensor, W_dec: torch.Tensor, scale: torch.Tensor | float, table: EditTable
) -> torch.Tensor:
    """Residual-stream delta ``(N, d)`` of an edit table, given clean codes ``z (N, d_sae)``.

    Vectorised over tokens and slots: one gather of codes, one gather of decoder rows.
    """
    z_at = z.gather(1, table.feature)                                    # (N, E)
    coef = edit_coefficients(z_at, table.op, table.value.to(z.dtype))    # (N, E)
    rows = W_dec[table.feature]                                          # (N, E, d)
    return scale * torch.einsum("ne,ned->nd", coef, rows)
