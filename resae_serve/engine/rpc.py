"""The worker RPCs: their names, result types, wire forms, and typed calls.

The front end reaches the worker extension
(:class:`~resae_serve.engine.worker.ResaeWorkerExtension`) through vLLM's
``collective_rpc(name, args=...)``. This module is the one place that names those methods
(:class:`Rpc`), and its wrappers are the only code that calls them: over an offline
``vllm.LLM`` (``take(llm, key)``) or over an async engine (``await take_many_async(engine,
keys, wait=...)``). Every rank holds the same tables and monitor (tensor parallelism replicates
them), so a wrapper reads the first rank's result.

Results cross vLLM's process boundary. In V1 multiprocess mode the engine core returns utility
results to the front end as msgpack (msgspec; ``vllm/v1/serial_utils.py``): unless
``VLLM_ALLOW_INSECURE_SERIALIZATION`` lets pickle through, a dataclass arrives as a ``dict`` and
a NamedTuple or tuple as a ``list``. So the worker returns a *wire form* of plain builtins
(``to_wire``) and the wrappers rebuild the types (``from_wire``); this works with or without
that flag, and in-process (where nothing is serialized) too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any, NamedTuple, Protocol


class Rpc(StrEnum):
    """Worker methods reachable with ``collective_rpc`` (names of
    :class:`~resae_serve.engine.worker.ResaeWorkerExtension` methods)."""

    BIND = "resae_bind"
    INFO = "resae_info"
    STATS = "resae_stats"
    TAKE = "resae_take"
    TAKE_MANY = "resae_take_many"
    DISCARD = "resae_discard"
    RUNTIME = "resae_runtime"


class MonitorEvent(NamedTuple):
    """A :class:`~resae_serve.engine.spec.Threshold` (or a server-wide monitor, a
    :class:`~resae_serve.engine.spec.Guard`) reached at one position."""

    position: int
    layer: int
    feature: int
    value: float
    """The feature's activation there (the value reported in :attr:`MonitorRecord.watch`
    when the feature is watched)."""
    threshold: float
    monitor: str = ""
    """The :class:`~resae_serve.engine.spec.Guard` that raised it (empty: the request's own
    threshold)."""


class MonitorRecord(NamedTuple):
    """Monitored features of one request at one position and layer (the worker's result)."""

    key: str
    """The request's :attr:`~resae_serve.engine.spec.SteeringSpec.key`."""
    position: int
    """Prompt and generated tokens counted together; the pass where this token is the input."""
    layer: int
    top_ids: tuple[int, ...] = ()
    """The largest ``top_k`` features, descending (empty when ``top_k`` is 0)."""
    top_values: tuple[float, ...] = ()
    watch: tuple[float, ...] = ()
    """Values of :attr:`~resae_serve.engine.spec.MonitorSpec.watch`, in that order."""
    raw: tuple[float, ...] = ()
    """The block output itself when :attr:`~resae_serve.engine.spec.MonitorSpec.raw` is set."""
    events: tuple[MonitorEvent, ...] = ()
    """Thresholds reached on these codes (none at out-of-distribution positions unless the
    request asked for them)."""
    out_of_distribution: int = 0
    """Why this position lies outside the dictionary's training distribution, an
    :class:`~resae_serve.context.OutOfDistribution` code (0: it does not)."""
    guard_values: tuple[float, ...] = ()
    """Codes of the request's :attr:`~resae_serve.engine.spec.SteeringSpec.guards` whose layer
    is this record's, in that order (what the server's per-monitor histograms observe)."""
    client: bool = True
    """The request's own monitor asked for this layer (else only its guards did: the record
    carries guard values and events only, and is not reported to the caller)."""

    def to_wire(self) -> tuple[Any, ...]:
        """Plain builtins; events as ``(feature, value, threshold, monitor)`` (position and
        layer are the record's)."""
        return (self.key, self.position, self.layer, self.top_ids, self.top_values, self.watch,
                self.raw, tuple((e.feature, e.value, e.threshold, e.monitor)
                                for e in self.events),
                self.out_of_distribution, self.guard_values, self.client)

    @classmethod
    def from_wire(cls, data: Sequence[Any]) -> MonitorRecord:
        (key, position, layer, top_ids, top_values, watch, raw, events, ood, guard_values,
         client) = data
        position, layer = int(position), int(layer)
        return cls(str(key), position, layer, tuple(top_ids), tuple(top_values), tuple(watch),
                   tuple(raw), tuple(MonitorEvent(position, layer, int(f), float(v), float(t),
                                                  str(m)) for f, v, t, m in events),
                   int(ood), tuple(float(v) for v in guard_values), bool(client))


class EngineInfo(NamedTuple):
    """What the front end validates specs against."""

    layers: tuple[int, ...]
    """Dictionary layers, ascending."""
    d_sae: tuple[int, ...]
    """Latents per dictionary layer."""
    d_model: int
    max_configs: int
    """Distinct steering configs the worker's tables hold at once."""

    def to_wire(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "d_sae": list(self.d_sae),
                "d_model": self.d_model, "max_configs": self.max_configs}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> EngineInfo:
        return cls(tuple(int(x) for x in data["layers"]), tuple(int(x) for x in data["d_sae"]),
                   int(data["d_model"]), int(data["max_configs"]))


class FeatureRuntimeInfo(NamedTuple):
    """The feature runtime the worker's monitor encodes with (what actually runs)."""

    backend: str
    """``torch``, ``onnxruntime`` or ``tensorrt``."""
    provider: str = ""
    """onnxruntime's execution provider (``cpu``, ``cuda``, ``tensorrt``); empty otherwise."""
    precision: str = "float32"
    threads: int = 0
    """Intra-op threads of the monitor's encodes."""
    export: str = ""
    """The export folder the graphs come from (empty for ``torch``)."""
    reason: str = ""
    """Why this runtime, where ``auto`` chose it."""

    def to_wire(self) -> dict[str, Any]:
        return self._asdict()

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> FeatureRuntimeInfo:
        return cls(str(data["backend"]), str(data["provider"]), str(data["precision"]),
                   int(data["threads"]), str(data["export"]), str(data["reason"]))


class EngineStats(NamedTuple):
    """Worker counters since start (cumulative; subtract two readings for an interval)."""

    rows_in_use: int
    """Table rows held by steering configs now."""
    requests: int
    """Requests the tables know now."""
    rejected: int
    """Steered requests that found no free row (ran unsteered; admission should prevent it)."""
    monitor_stalled_steps: int
    """Steps that waited for a free slot in the monitor's queue (back-pressure)."""
    monitor_recomputed: int
    """(position, layer) records encoded again after a preemption."""
    monitor_stored_requests: int
    """Requests with monitor results waiting to be taken."""
    steps: int
    """Forward passes."""
    forward_s: float
    """Seconds in forward passes, all in all."""
    hook_host_s: float
    """Of which the hook's host work."""
    op_s: float
    """Of which inside the op, at every layer."""
    screened_reads: int
    """Edited-feature reads through the bfloat16 screen."""
    screened_reads_resolved_exactly: int
    """Of which the screen left to exact resolution."""

    def to_wire(self) -> dict[str, Any]:
        return self._asdict()

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> EngineStats:
        return cls(**{name: data[name] for name in cls._fields})


def records_to_wire(records: Iterable[MonitorRecord]) -> list[tuple[Any, ...]]:
    return [r.to_wire() for r in records]


def records_from_wire(data: Iterable[Sequence[Any]]) -> list[MonitorRecord]:
    return [MonitorRecord.from_wire(r) for r in data]


# ----------------------------------------------------------------------------- calls

class Workers(Protocol):
    """An offline ``vllm.LLM`` (results of every worker, in rank order)."""

    def collective_rpc(self, method: str, timeout: float | None = None,
                       args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
                       ) -> list[Any]: ...


class AsyncWorkers(Protocol):
    """vLLM's ``AsyncLLM``, or a driver of :mod:`~resae_serve.engine.driver`."""

    async def collective_rpc(self, method: str, timeout: float | None = None,
                             args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
                             ) -> list[Any]: ...


def _call(llm: Workers, rpc: Rpc, *args: Any) -> Any:
    return llm.collective_rpc(rpc.value, args=args)[0]


async def _call_async(engine: AsyncWorkers, rpc: Rpc, *args: Any) -> Any:
    return (await engine.collective_rpc(rpc.value, args=args))[0]


def bind(llm: Workers) -> tuple[int, ...]:
    """Point the step hook at the worker's model runner; the dictionary layers."""
    return tuple(_call(llm, Rpc.BIND))


async def bind_async(engine: AsyncWorkers) -> tuple[int, ...]:
    return tuple(await _call_async(engine, Rpc.BIND))


def info(llm: Workers) -> EngineInfo:
    return EngineInfo.from_wire(_call(llm, Rpc.INFO))


async def info_async(engine: AsyncWorkers) -> EngineInfo:
    return EngineInfo.from_wire(await _call_async(engine, Rpc.INFO))


def runtime(llm: Workers) -> FeatureRuntimeInfo:
    """The feature runtime the worker's monitor runs on."""
    return FeatureRuntimeInfo.from_wire(_call(llm, Rpc.RUNTIME))


async def runtime_async(engine: AsyncWorkers) -> FeatureRuntimeInfo:
    return FeatureRuntimeInfo.from_wire(await _call_async(engine, Rpc.RUNTIME))


def stats(llm: Workers) -> EngineStats:
    return EngineStats.from_wire(_call(llm, Rpc.STATS))


async def stats_async(engine: AsyncWorkers) -> EngineStats:
    return EngineStats.from_wire(await _call_async(engine, Rpc.STATS))


def take(llm: Workers, key: str) -> list[MonitorRecord]:
    """Monitor records of the request whose ``spec.key == key``, by (position, layer), removed
    from the worker (waits for its pending encodes)."""
    return records_from_wire(_call(llm, Rpc.TAKE, key))


async def take_many_async(engine: AsyncWorkers, keys: Iterable[str], *, wait: bool
                          ) -> dict[str, list[MonitorRecord]]:
    """Records of several requests at once; ``wait`` first encodes every queued step."""
    data = await _call_async(engine, Rpc.TAKE_MANY, sorted(keys), wait)
    return {str(key): records_from_wire(records) for key, records in data.items()}


async def discard_async(engine: AsyncWorkers, key: str) -> None:
    """Drop the results of an abandoned request, now and when they arrive."""
    await _call_async(engine, Rpc.DISCARD, key)
