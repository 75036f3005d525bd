"""Server-wide monitors: what the platform watches on all traffic, and what it does then.

A :class:`GuardPolicy` (built by the server from its config) says which
:class:`ServerMonitor` s apply to every request, or to a sampled fraction of requests, and
which conditional interventions every such request gets as a server policy. The engine turns
it into each request's :class:`~resae_serve.engine.spec.Guard` s (read by the worker's
monitor) and extra interventions (:meth:`GuardPolicy.for_request`), and reports what the
monitors see to a :class:`GuardListener` (the server: Prometheus, ``WatchEvents``, the event
log).

Actions:

- ``record``: events and metrics only.
- ``stop``: the request ends at the token where the monitor fires (finish reason
  ``guardrail``); the engine request is aborted at once. Its generated tokens are held back
  until the monitor has read them, so no token after the firing one reaches the caller.
- ``steer``: the monitor's edit applies from the firing token on, as a sticky conditional edit
  evaluated inside the forward pass (:class:`~resae_serve.engine.spec.Condition`), so it needs
  no host round trip.

Out-of-distribution positions (:mod:`resae_serve.context`) never fire a monitor unless it
sets ``include_out_of_distribution``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol

from resae_serve.engine.spec import (
    Condition,
    Guard,
    GuardAction,
    SteerEdit,
    SteeringSpec,
    SteerVector,
)
from resae_serve.interventions import InterventionError

Intervention = SteerEdit | SteerVector


@dataclass(frozen=True)
class ServerMonitor:
    """One monitor of the server's config."""

    name: str
    """Label in metrics and events (a bounded set: the config's names)."""
    layer: int
    feature: int
    threshold: float
    """Fires on tokens where the feature's code is ``>= threshold``."""
    action: GuardAction = "record"
    edit: SteerEdit | None = None
    """For ``steer``: the edit applied from the firing token on (its layer at or after the
    monitor's; its own ``when`` must be unset)."""
    include_out_of_distribution: bool = False

    def __post_init__(self) -> None:
        guard = self.guard()       # checks action and threshold, naming the monitor
        if (self.edit is None) != (guard.action != "steer"):
            raise InterventionError(
                f"monitor {self.name!r}: action={self.action!r} "
                + ("needs an edit (the intervention applied from the firing token on)"
                   if self.edit is None else "takes no edit (only action 'steer' does)"))
        if self.edit is not None and self.edit.when is not None:
            raise InterventionError(f"monitor {self.name!r}: edit.when is set; a steer "
                                    "monitor's edit is gated by the monitor itself")

    def guard(self) -> Guard:
        return Guard(self.name, self.layer, self.feature, self.threshold, self.action,
                     self.include_out_of_distribution)

    def steering(self) -> SteerEdit | None:
        """The sticky conditional edit of a ``steer`` monitor."""
        if self.edit is None:
            return None
        return replace(self.edit, when=Condition(self.layer, self.feature, self.threshold,
                                                 sticky=True,
                                                 include_out_of_distribution=(
                                                     self.include_out_of_distribution)))


@dataclass(frozen=True)
class GuardPolicy:
    """The server's monitors and policy interventions, and who gets them."""

    monitors: tuple[ServerMonitor, ...] = ()
    sample: float = 1.0
    """Fraction of requests they apply to (by a hash of the request id: stable per id)."""
    interventions: tuple[Intervention, ...] = ()
    """Interventions every sampled request gets (typically conditional: ``when`` set)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample <= 1.0:
            raise InterventionError(f"sample={self.sample!r}; allowed 0..1")
        names = [m.name for m in self.monitors]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise InterventionError(f"monitors: name {dup[0]!r} is used twice; names must be "
                                    "unique (they label metrics and events)")
        if any(not n for n in names):
            raise InterventionError("monitors: a monitor has an empty name")

    @property
    def active(self) -> bool:
        return bool(self.monitors or self.interventions) and self.sample > 0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.monitors)

    def sampled(self, request_id: str) -> bool:
        """Whether the policy applies to ``request_id``."""
        if self.sample >= 1.0:
            return True
        digest = hashlib.sha256(request_id.encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.sample

    def for_request(self, request_id: str) -> tuple[tuple[Guard, ...], tuple[Intervention, ...]]:
        """The guards and extra interventions of one request (none when not sampled)."""
        if not self.active or not self.sampled(request_id):
            return (), ()
        return self._everything()

    def _everything(self) -> tuple[tuple[Guard, ...], tuple[Intervention, ...]]:
        steer = tuple(e for m in self.monitors if (e := m.steering()) is not None)
        return tuple(m.guard() for m in self.monitors), (*self.interventions, *steer)

    def validate(self, layers: Sequence[int], d_sae: Sequence[int], d_model: int) -> None:
        """Raise :class:`InterventionError` naming the monitor unless the dictionary can take
        the policy (start-up check)."""
        for m in self.monitors:
            if m.edit is not None and m.edit.layer < m.layer:
                raise InterventionError(f"monitor {m.name!r}: edit.layer={m.edit.layer} is "
                                        f"before the monitor's layer {m.layer}; it must be at "
                                        "or after it")
        guards, extra = self._everything()
        SteeringSpec(tuple(x for x in extra if isinstance(x, SteerEdit)),
                     tuple(x for x in extra if isinstance(x, SteerVector)),
                     guards=guards).validate(layers, d_sae, d_model)


class GuardEvent(NamedTuple):
    """A server-wide monitor fired on one token of one request."""

    request_id: str
    monitor: str
    action: str
    position: int
    token_id: int
    """The token at ``position`` (-1 when not known)."""
    layer: int
    feature: int
    value: float
    threshold: float


class GuardListener(Protocol):
    """Where the engine reports server-wide monitoring (the server: metrics, ``WatchEvents``,
    the event log). Called on the engine's event loop; must not block."""

    def observed(self, monitor: str, values: Sequence[float]) -> None:
        """Codes the monitor read (positions it judges: in distribution unless it includes
        the others), for its histogram."""
        ...

    def fired(self, event: GuardEvent, first_in_request: bool) -> None:
        """The monitor fired; ``first_in_request``: its first event in this request."""
        ...
