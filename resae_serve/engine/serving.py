"""The async front end: ``generate(prompt, sampling, interventions=..., monitor=...)``.

:class:`ResaeEngine` wraps any engine with vLLM ``AsyncLLM``'s three methods (``generate``,
``abort``, ``collective_rpc``; :class:`~resae_serve.engine.driver.LLMDriver` gives an offline
``LLM`` the same shape). Per request it

1. validates the spec against the dictionary (:class:`InterventionError` naming the field),
2. waits in :class:`~resae_serve.engine.admission.ConfigAdmission` until its steering config
   can be resident in the worker's tables (never runs unsteered because rows ran out),
3. streams :class:`GenerationChunk` s: the new tokens, the features of every position whose
   encode has finished (in position order, each (position, layer) exactly once, also across
   preemption) and the threshold events raised on them,
4. releases its config and aborts the request if the caller stops early.

Positions count prompt and generated tokens together (prompt ``0 .. P-1``, generated token
``n`` at ``P + n``). The features at position ``p`` are those of the pass where token ``p`` is
the input (the pass that predicts token ``p + 1``); the last generated token is never fed back,
so it has none. Monitor results are fetched for all live requests in one coalesced RPC per
round (``resae_take_many``); the final chunk waits for the worker's queue to drain.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, NamedTuple, Protocol

from resae_serve.engine.admission import ConfigAdmission
from resae_serve.engine.llm import prompt_with, sampling_with
from resae_serve.engine.spec import MonitorSpec, SteerEdit, SteeringSpec, SteerVector

logger = logging.getLogger(__name__)
Intervention = SteerEdit | SteerVector


class AsyncEngine(Protocol):
    """The part of vLLM's ``AsyncLLM`` the wrapper uses."""

    def generate(self, prompt: Any, sampling_params: Any,
                 request_id: str) -> AsyncIterator[Any]: ...

    async def abort(self, request_id: str) -> None: ...

    async def collective_rpc(self, method: str, timeout: float | None = None,
                             args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
                             ) -> list[Any]: ...


class TokenFeatures(NamedTuple):
    """Monitored features of one position at one layer."""

    position: int
    layer: int
    top_ids: tuple[int, ...]
    """Largest ``top_k`` features, descending."""
    top_values: tuple[float, ...]
    watch: tuple[float, ...]
    """Values of :attr:`MonitorSpec.watch`, in that order."""
    raw: tuple[float, ...] = ()
    """The block output itself when :attr:`MonitorSpec.raw` is set."""


class MonitorEvent(NamedTuple):
    """A :class:`~resae_serve.engine.spec.Threshold` reached at one position."""

    position: int
    layer: int
    feature: int
    value: float
    threshold: float


class GenerationChunk(NamedTuple):
    """One streamed update of a request."""

    request_id: str
    token_ids: tuple[int, ...]
    """Tokens generated since the previous chunk."""
    text: str
    """Text generated since the previous chunk."""
    features: tuple[TokenFeatures, ...]
    """Newly available features, by (position, layer)."""
    events: tuple[MonitorEvent, ...]
    finished: bool
    finish_reason: str | None


class EngineInfo(NamedTuple):
    layers: tuple[int, ...]
    d_sae: tuple[int, ...]
    d_model: int
    max_configs: int


class _MonitorFetcher:
    """Coalesces monitor fetches of concurrent requests into one RPC per round."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.rounds = 0
        self._wanted: set[str] = set()
        self._flush: set[str] = set()
        self._inflight: set[str] = set()
        self._buffers: dict[str, list[dict[str, Any]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def fetch(self, key: str, *, wait: bool) -> list[dict[str, Any]]:
        """Records of ``key`` from a round that started after this call."""
        self._wanted.add(key)
        if wait:
            self._flush.add(key)
        while key in self._wanted or key in self._inflight:
            if self._task is None or self._task.done():
                self._task = asyncio.ensure_future(self._round())
            await asyncio.shield(self._task)
        return self._buffers.pop(key, [])

    async def forget(self, key: str) -> None:
        """Drop everything fetched or still being fetched for ``key`` (an abandoned request)."""
        self._wanted.discard(key)
        self._flush.discard(key)
        while key in self._inflight and self._task is not None and not self._task.done():
            try:
                await asyncio.shield(self._task)
            except Exception:                  # the round's own waiters see its failure
                break
        self._buffers.pop(key, None)

    async def _round(self) -> None:
        keys, self._wanted = self._wanted, set()
        wait, self._flush = bool(self._flush & keys), self._flush - keys
        self._inflight = keys
        try:
            result = await self.engine.collective_rpc("resae_take_many",
                                                      args=(sorted(keys), wait))
            for key, records in result[0].items():
                self._buffers.setdefault(key, []).extend(records)
            self.rounds += 1
        finally:
            self._inflight = set()


def _features(records: list[dict[str, Any]], delivered: dict[int, int]
              ) -> tuple[list[TokenFeatures], list[MonitorEvent]]:
    """Convert worker records, dropping (position, layer) pairs already delivered."""
    features, events = [], []
    for r in sorted(records, key=lambda r: (r["position"], r["layer"])):
        position, layer = int(r["position"]), int(r["layer"])
        if position <= delivered.get(layer, -1):
            continue                                    # recomputed after a preemption
        delivered[layer] = position
        ids, values = r.get("top_k", ((), ()))
        features.append(TokenFeatures(position, layer, tuple(ids), tuple(values),
                                      tuple(r.get("watch", ())), tuple(r.get("raw", ()))))
        events += [MonitorEvent(position, layer, int(f), float(v), float(t))
                   for f, v, t in r.get("events", ())]
    return features, events


class ResaeEngine:
    """Async per-request steering and monitoring over one engine with the ReSAE hook."""

    def __init__(self, engine: AsyncEngine, info: EngineInfo,
                 max_configs: int | None = None) -> None:
        self.engine = engine
        self.info = info
        self.admission = ConfigAdmission(min(max_configs or info.max_configs, info.max_configs))
        self._fetcher = _MonitorFetcher(engine)
        self._ids = itertools.count()

    @classmethod
    async def connect(cls, engine: AsyncEngine, max_configs: int | None = None) -> ResaeEngine:
        """Wrap ``engine`` (its worker must run the ReSAE extension; see ``build_async_llm``)."""
        info = (await engine.collective_rpc("resae_info"))[0]
        return cls(engine, EngineInfo(tuple(info["layers"]), tuple(info["d_sae"]),
                                      int(info["d_model"]), int(info["max_configs"])),
                   max_configs)

    def spec(self, interventions: Sequence[Intervention] = (), monitor: MonitorSpec | None = None,
             key: str = "") -> SteeringSpec:
        """A validated :class:`SteeringSpec` (raises ``InterventionError`` naming the field)."""
        edits = tuple(x for x in interventions if isinstance(x, SteerEdit))
        vectors = tuple(x for x in interventions if isinstance(x, SteerVector))
        if len(edits) + len(vectors) != len(interventions):
            bad = next(x for x in interventions if not isinstance(x, SteerEdit | SteerVector))
            raise TypeError(f"interventions: {type(bad).__name__} is neither SteerEdit nor "
                            "SteerVector")
        spec = SteeringSpec(edits, vectors, monitor or MonitorSpec(), key)
        spec.validate(self.info.layers, self.info.d_sae, self.info.d_model)
        return spec

    async def generate(self, prompt: str | Sequence[int], sampling: Any, *,
                       interventions: Sequence[Intervention] = (),
                       monitor: MonitorSpec | None = None,
                       request_id: str | None = None) -> AsyncGenerator[GenerationChunk, None]:
        """Stream one request's tokens with their features and events (see module docstring)."""
        request_id = request_id or f"resae-{next(self._ids)}"
        spec = self.spec(interventions, monitor, key=request_id)
        monitoring = bool(spec.monitor.layers)
        handle = await self.admission.acquire(spec)
        finished = False
        stream: AsyncIterator[Any] | None = None
        try:
            n_tokens, n_text = 0, 0
            delivered: dict[int, int] = {}
            stream = self.engine.generate(prompt_with(prompt, spec),
                                          sampling_with(sampling, spec), request_id)
            async for out in stream:
                completion = out.outputs[0]
                tokens = tuple(completion.token_ids[n_tokens:])
                text = completion.text[n_text:]
                n_tokens, n_text = len(completion.token_ids), len(completion.text)
                features: list[TokenFeatures] = []
                events: list[MonitorEvent] = []
                if monitoring:
                    records = await self._fetcher.fetch(request_id, wait=out.finished)
                    features, events = _features(records, delivered)
                finished = bool(out.finished)
                yield GenerationChunk(request_id, tokens, text, tuple(features), tuple(events),
                                      finished, completion.finish_reason)
                if finished:
                    break
        finally:
            try:
                close = getattr(stream, "aclose", None)
                if close is not None:
                    await close()
                if not finished:
                    await self.engine.abort(request_id)
                    if monitoring:      # drop its results here and in the worker
                        await self._fetcher.forget(request_id)
                        await self.engine.collective_rpc("resae_discard", args=(request_id,))
            finally:
                await self.admission.release(handle)


async def collect(chunks: AsyncIterator[GenerationChunk]) -> GenerationChunk:
    """Merge a stream into one chunk (all tokens, text, features and events)."""
    parts = [c async for c in chunks]
    if not parts:
        raise ValueError("the stream ended without a chunk")
    last = parts[-1]
    return GenerationChunk(last.request_id, tuple(t for c in parts for t in c.token_ids),
                           "".join(c.text for c in parts),
                           tuple(f for c in parts for f in c.features),
                           tuple(e for c in parts for e in c.events), last.finished,
                           last.finish_reason)
