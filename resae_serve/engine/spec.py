"""Per-request specs: sampling, steering and monitoring; validation, wire form, content hash.

:class:`SamplingSpec` is this project's own sampling request; the engine driver turns it into
vLLM's ``SamplingParams`` (:mod:`~resae_serve.engine.driver`), so callers never import vLLM.
A :class:`SteeringSpec` travels to the worker inside ``SamplingParams.extra_args["resae"]``
(plain JSON types only). Its :meth:`SteeringSpec.cache_salt` is a SHA-256 of the canonical
steering content, so vLLM's prefix cache never shares KV blocks between requests whose
steering differs (requests with the same steering still share).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from resae_serve.interventions import FeatureEdit, InterventionError

Phase = Literal["prompt", "generation", "all"]
PHASES: tuple[str, ...] = get_args(Phase)
EXTRA_ARGS_KEY = "resae"
MAX_EDITS_PER_LAYER = 8
"""Edit slots per request and layer in the worker's tables (feature edits; vectors are free)."""
MAX_CONDITIONS = 4
"""Distinct ``when`` conditions per request (all layers together)."""
GuardAction = Literal["record", "stop", "steer"]
GUARD_ACTIONS: tuple[str, ...] = get_args(GuardAction)


@dataclass(frozen=True)
class Condition:
    """Gate of an intervention: it applies on the tokens where ``feature``'s code at ``layer``
    is ``>= value``.

    Evaluated inside the op, in the same forward pass and on the same token, from the block
    output at ``layer`` before that layer's own edits (earlier layers' edits included: they
    are in the stream). ``layer`` must be at or before the intervention's layer.
    """

    layer: int
    feature: int
    value: float
    sticky: bool = False
    """Once it holds on a token it holds on every later token of the request (a latch)."""
    include_out_of_distribution: bool = False
    """Let out-of-distribution positions (:mod:`resae_serve.context`: the first position, norm
    outliers) satisfy it; by default they never do."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.value):
            raise InterventionError(f"when: value={self.value!r} for feature {self.feature} at "
                                    f"layer {self.layer}; must be a finite number")

    def to_wire(self) -> list[Any]:
        return [self.layer, self.feature, float(self.value), self.sticky,
                self.include_out_of_distribution]

    @classmethod
    def from_wire(cls, data: Sequence[Any] | None) -> Condition | None:
        if data is None:
            return None
        layer, feature, value, sticky, ood = data
        return cls(int(layer), int(feature), float(value), bool(sticky), bool(ood))


@dataclass(frozen=True)
class Guard:
    """A server-wide monitor as it applies to one request (the server's config turns its
    ``monitors`` into these): an event on every token where ``feature`` at ``layer`` reaches
    ``threshold``, read by the worker's monitor from the same codes it reports (the edited
    block output). ``action``: ``record`` (events and metrics only), ``stop`` (the request
    ends at that token, finish reason ``guardrail``), ``steer`` (its edit is a sticky
    conditional edit the front end adds to the request's edits)."""

    name: str
    layer: int
    feature: int
    threshold: float
    action: GuardAction = "record"
    include_out_of_distribution: bool = False
    """Also fire at out-of-distribution positions (by default they never fire)."""

    def __post_init__(self) -> None:
        if self.action not in GUARD_ACTIONS:
            raise InterventionError(f"monitor {self.name!r}: action={self.action!r}; allowed: "
                                    f"{', '.join(GUARD_ACTIONS)}")
        if not math.isfinite(self.threshold):
            raise InterventionError(f"monitor {self.name!r}: threshold={self.threshold!r}; "
                                    "must be a finite number")

    def to_wire(self) -> list[Any]:
        return [self.name, self.layer, self.feature, float(self.threshold), self.action,
                self.include_out_of_distribution]

    @classmethod
    def from_wire(cls, data: Sequence[Any]) -> Guard:
        name, layer, feature, threshold, action, ood = data
        return cls(str(name), int(layer), int(feature), float(threshold), action, bool(ood))


@dataclass(frozen=True)
class SamplingSpec:
    """How one request samples its tokens (the fields vLLM's ``SamplingParams`` takes).

    Defaults are vLLM's; the engine applies its own checks when the request starts and raises
    :class:`~resae_serve.errors.EngineRequestError` naming the value it refuses.
    """

    max_tokens: int = 16
    """Most tokens to generate."""
    temperature: float = 1.0
    """0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int = 0
    """Sample among the ``top_k`` most likely tokens (0 = all)."""
    seed: int | None = None
    """Per-request random seed (``None`` = the engine's generator)."""
    stop: tuple[str, ...] = ()
    """Strings that end the completion (not included in it)."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (up to ``max_tokens``)."""


@dataclass(frozen=True)
class SteerEdit(FeatureEdit):
    """A :class:`~resae_serve.interventions.FeatureEdit` limited to a phase (per-request spec)."""

    phase: Phase = "all"
    """Apply on prompt tokens, generated tokens, or both (by input position < prompt length)."""
    when: Condition | None = None
    """Apply only on the tokens where this condition holds (``None``: every token)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.phase not in PHASES:
            raise InterventionError(f"phase={self.phase!r}; allowed: {', '.join(PHASES)}")

    def feature_edit(self) -> FeatureEdit:
        """The phase-free edit of :mod:`resae_serve.interventions` (the math oracle's input)."""
        return FeatureEdit(self.layer, self.feature, self.mode, self.value)


@dataclass(frozen=True)
class SteerVector:
    """A raw vector added to the block output of one layer."""

    layer: int
    vector: tuple[float, ...]
    """``d_model`` finite floats."""
    phase: Phase = "all"
    when: Condition | None = None
    """Apply only on the tokens where this condition holds (``None``: every token)."""

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise InterventionError(f"phase={self.phase!r}; allowed: {', '.join(PHASES)}")
        if not all(math.isfinite(v) for v in self.vector):
            raise InterventionError(f"vector at layer {self.layer} has non-finite entries")


@dataclass(frozen=True)
class Threshold:
    """Raise an event on every token where a monitored feature reaches ``value``."""

    layer: int
    """A layer of :attr:`MonitorSpec.layers`."""
    feature: int
    value: float
    """Event when the feature's activation is ``>= value`` (codes are non-negative)."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.value):
            raise InterventionError(f"threshold value={self.value!r} for feature {self.feature} "
                                    f"at layer {self.layer}; must be a finite number")


@dataclass(frozen=True)
class MonitorSpec:
    """Which features to report per token."""

    layers: tuple[int, ...] = ()
    """Dictionary layers to encode (after this request's edits at that layer)."""
    top_k: int = 0
    """Report the ``top_k`` largest features per token and layer (0 = none)."""
    watch: tuple[int, ...] = ()
    """Feature ids whose values are reported on every token of every monitored layer."""
    raw: bool = False
    """Also return the block-output activations themselves (parity tests, debugging)."""
    thresholds: tuple[Threshold, ...] = ()
    """Events raised by the worker, on the same activations as the reported features."""
    include_out_of_distribution: bool = False
    """Also raise events at positions outside the dictionary's training distribution (the
    first position, norm outliers: :mod:`resae_serve.context`); by default they are skipped.
    Features are reported at every position either way, flagged."""


@dataclass(frozen=True)
class SteeringSpec:
    """Everything one request asks of the ReSAE hook."""

    edits: tuple[SteerEdit, ...] = ()
    vectors: tuple[SteerVector, ...] = ()
    monitor: MonitorSpec = field(default_factory=MonitorSpec)
    key: str = ""
    """Caller's handle for fetching monitor results (not part of the steering hash)."""
    guards: tuple[Guard, ...] = ()
    """Server-wide monitors that apply to this request (set by the front end from the
    server's config, not by the caller; read by the worker's monitor)."""

    @property
    def steers(self) -> bool:
        return bool(self.edits or self.vectors)

    @property
    def interventions(self) -> tuple[SteerEdit | SteerVector, ...]:
        return (*self.edits, *self.vectors)

    @property
    def conditions(self) -> tuple[Condition, ...]:
        """The distinct ``when`` conditions of the edits and vectors, in first-use order."""
        seen: dict[Condition, None] = {}
        for x in self.interventions:
            if x.when is not None:
                seen.setdefault(x.when)
        return tuple(seen)

    @property
    def monitor_layers(self) -> tuple[int, ...]:
        """Layers the worker's monitor encodes for this request: the caller's and the
        guards'."""
        return tuple(sorted(set(self.monitor.layers) | {g.layer for g in self.guards}))

    def validate(self, layers: Sequence[int], d_sae: Sequence[int], d_model: int) -> None:
        """Raise :class:`InterventionError` naming the field unless the dictionary can take it."""
        known = list(layers)

        def check_layer(layer: int, what: str) -> int:
            if layer not in known:
                raise InterventionError(f"{what}: layer={layer} is not in the dictionary; its "
                                        f"layers are {known}")
            return known.index(layer)

        counts: dict[int, int] = {}
        for edit in self.edits:
            i = check_layer(edit.layer, "edit")
            if not 0 <= edit.feature < d_sae[i]:
                raise InterventionError(f"edit: feature={edit.feature} at layer {edit.layer}; "
                                        f"allowed 0..{d_sae[i] - 1}")
            counts[edit.layer] = counts.get(edit.layer, 0) + 1
        for x in self.interventions:
            if x.when is None:
                continue
            what = "edit" if isinstance(x, SteerEdit) else "vector"
            j = check_layer(x.when.layer, f"{what} at layer {x.layer}: when")
            if x.when.layer > x.layer:
                raise InterventionError(f"{what} at layer {x.layer}: when.layer={x.when.layer} "
                                        f"is after the intervention's layer; a condition must "
                                        f"be at or before it")
            if not 0 <= x.when.feature < d_sae[j]:
                raise InterventionError(f"{what} at layer {x.layer}: when.feature="
                                        f"{x.when.feature} at layer {x.when.layer}; allowed "
                                        f"0..{d_sae[j] - 1}")
        if len(self.conditions) > MAX_CONDITIONS:
            raise InterventionError(f"{len(self.conditions)} distinct when conditions; at most "
                                    f"{MAX_CONDITIONS} per request")
        for g in self.guards:
            j = check_layer(g.layer, f"monitor {g.name!r}")
            if not 0 <= g.feature < d_sae[j]:
                raise InterventionError(f"monitor {g.name!r}: feature={g.feature} at layer "
                                        f"{g.layer}; allowed 0..{d_sae[j] - 1}")
        for layer, count in counts.items():
            if count > MAX_EDITS_PER_LAYER:
                raise InterventionError(f"{count} feature edits at layer {layer}; at most "
                                        f"{MAX_EDITS_PER_LAYER} per layer and request")
        for vec in self.vectors:
            check_layer(vec.layer, "vector")
            if len(vec.vector) != d_model:
                raise InterventionError(f"vector at layer {vec.layer} has {len(vec.vector)} "
                                        f"entries; expected d_model={d_model}")
        for layer in self.monitor.layers:
            check_layer(layer, "monitor")
        if self.monitor.top_k < 0 or self.monitor.top_k > min(d_sae):
            raise InterventionError(f"monitor: top_k={self.monitor.top_k}; allowed "
                                    f"0..{min(d_sae)}")
        for feature in self.monitor.watch:
            if not 0 <= feature < min(d_sae):
                raise InterventionError(f"monitor: watch feature={feature}; allowed "
                                        f"0..{min(d_sae) - 1}")
        for t in self.monitor.thresholds:
            if t.layer not in self.monitor.layers:
                raise InterventionError(f"monitor: threshold at layer={t.layer}, which is not "
                                        f"monitored; monitored layers are "
                                        f"{list(self.monitor.layers)}")
            i = known.index(t.layer)
            if not 0 <= t.feature < d_sae[i]:
                raise InterventionError(f"monitor: threshold feature={t.feature} at layer "
                                        f"{t.layer}; allowed 0..{d_sae[i] - 1}")

    # ------------------------------------------------------------------ wire form

    def steering_json(self) -> dict[str, Any]:
        """The steering content only (what changes activations), in canonical form."""
        return {
            "edits": [[e.layer, e.feature, e.mode, float(e.value), e.phase,
                       None if e.when is None else e.when.to_wire()] for e in self.edits],
            "vectors": [[v.layer, [float(x) for x in v.vector], v.phase,
                         None if v.when is None else v.when.to_wire()] for v in self.vectors],
        }

    def to_extra_args(self) -> dict[str, Any]:
        m = self.monitor
        return {EXTRA_ARGS_KEY: {
            **self.steering_json(), "key": self.key,
            "guards": [g.to_wire() for g in self.guards],
            "monitor": {"layers": list(m.layers), "top_k": m.top_k, "watch": list(m.watch),
                        "raw": m.raw,
                        "thresholds": [[t.layer, t.feature, float(t.value)]
                                       for t in m.thresholds],
                        "include_out_of_distribution": m.include_out_of_distribution},
        }}

    @classmethod
    def from_extra_args(cls, extra_args: dict[str, Any] | None) -> SteeringSpec | None:
        """Parse the worker-side copy; ``None`` when the request carries no ReSAE part."""
        data = (extra_args or {}).get(EXTRA_ARGS_KEY)
        if not data:
            return None
        m = data.get("monitor") or {}
        return cls(
            edits=tuple(SteerEdit(int(a), int(b), c, float(d), p, Condition.from_wire(w))
                        for a, b, c, d, p, w in data.get("edits", ())),
            vectors=tuple(SteerVector(int(a), tuple(float(x) for x in v), p,
                                      Condition.from_wire(w))
                          for a, v, p, w in data.get("vectors", ())),
            monitor=MonitorSpec(tuple(m.get("layers", ())), int(m.get("top_k", 0)),
                                tuple(m.get("watch", ())), bool(m.get("raw", False)),
                                tuple(Threshold(int(a), int(b), float(v))
                                      for a, b, v in m.get("thresholds", ())),
                                bool(m.get("include_out_of_distribution", False))),
            key=str(data.get("key", "")),
            guards=tuple(Guard.from_wire(g) for g in data.get("guards", ())),
        )

    def content_hash(self) -> str:
        """SHA-256 of the canonical steering content (monitoring and key excluded)."""
        blob = json.dumps(self.steering_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def cache_salt(self) -> str | None:
        """Prefix-cache salt: ``None`` for unsteered requests so they share the plain cache."""
        return f"resae-{self.content_hash()[:32]}" if self.steers else None
