"""The async front end: ``generate(prompt, sampling, interventions=..., monitor=...)``.

:class:`ResaeEngine` drives a vLLM engine through a :class:`~resae_serve.engine.driver.Driver`
(``AsyncLLM`` for a server, built by :meth:`ResaeEngine.build`; an offline ``LLM`` through
:class:`~resae_serve.engine.driver.LLMDriver`) and speaks only this project's types: a
:class:`~resae_serve.engine.spec.SamplingSpec` in, :class:`GenerationChunk` s out, errors from
:mod:`resae_serve.errors`. :class:`ServingEngine` is the part the gRPC server uses. Per request it

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
round (:func:`~resae_serve.engine.rpc.take_many_async`); the final chunk waits for the worker's
queue to drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Sequence,
)
from typing import Any, NamedTuple, Protocol, TypeVar

from resae_serve.engine.admission import ConfigAdmission
from resae_serve.engine.driver import AsyncLLMDriver, Driver
from resae_serve.engine.guards import GuardEvent, GuardListener, GuardPolicy
from resae_serve.engine.llm import prompt_with
from resae_serve.engine.rpc import (
    EngineInfo,
    EngineStats,
    FeatureRuntimeInfo,
    MonitorEvent,
    MonitorRecord,
    discard_async,
    info_async,
    runtime_async,
    stats_async,
    take_many_async,
)
from resae_serve.engine.spec import (
    MonitorSpec,
    SamplingSpec,
    SteerEdit,
    SteeringSpec,
    SteerVector,
)
from resae_serve.errors import EngineDeadError
from resae_serve.interventions import InterventionError

logger = logging.getLogger(__name__)
KV_ENV = "VLLM_CPU_KVCACHE_SPACE"
DEAD_POLL_S = 0.25
"""How often a worker RPC in flight checks that the engine still lives."""
T = TypeVar("T")
Intervention = SteerEdit | SteerVector
__all__ = ["EngineInfo", "EngineStats", "GenerationChunk", "MonitorEvent", "OpenAIServing",
           "ResaeEngine", "ServingEngine", "TokenFeatures", "collect", "steering_spec"]


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
    out_of_distribution: int = 0
    """:class:`~resae_serve.context.OutOfDistribution` code: why the position lies outside
    the dictionary's training distribution (0: it does not)."""


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
    """The request's own threshold events (server-wide monitors report to the engine's
    :class:`~resae_serve.engine.guards.GuardListener` instead)."""
    finished: bool
    finish_reason: str | None
    """vLLM's (``stop``, ``length`` ...), or ``guardrail`` when a server-wide ``stop``
    monitor ended the request."""
    guardrail: MonitorEvent | None = None
    """With finish reason ``guardrail``: the event that stopped the request."""


class ServingEngine(Protocol):
    """What the gRPC server uses of an engine: :class:`ResaeEngine`, or a fake in tests."""

    @property
    def resident_configs(self) -> int:
        """Distinct steering configs in flight now."""
        ...

    @property
    def errored(self) -> bool:
        """The engine has died; it serves no more requests."""
        ...

    def num_unfinished(self) -> int:
        """Requests the engine has not finished."""
        ...

    def set_guards(self, policy: GuardPolicy, listener: GuardListener | None = None) -> None:
        """Apply the server-wide monitors and policy interventions of ``policy`` to every
        request from now on (validated: ``InterventionError`` naming the monitor), reporting
        to ``listener``."""
        ...

    def spec(self, interventions: Sequence[Intervention] = (),
             monitor: MonitorSpec | None = None, key: str = "") -> SteeringSpec:
        """A validated spec (raises ``InterventionError`` naming the field)."""
        ...

    def generate(self, prompt: str | Sequence[int], sampling: SamplingSpec, *,
                 interventions: Sequence[Intervention] = (),
                 monitor: MonitorSpec | None = None,
                 request_id: str | None = None,
                 watched: bool = True) -> AsyncGenerator[GenerationChunk, None]:
        """Stream one request (``watched``: under the server-wide monitors and policy of
        :meth:`set_guards`; Inspect and SearchFeatures read prompts without them); raises
        :class:`~resae_serve.errors.EngineRequestError` for values the engine refuses and
        :class:`~resae_serve.errors.EngineDeadError` when it has died."""
        ...

    async def shutdown(self) -> None: ...


class OpenAIServing(Protocol):
    """An engine that also serves vLLM's OpenAI-compatible app (optional: the HTTP front end
    answers 503 for engines without it)."""

    async def openai_app(self, served_model_name: str) -> Any:
        """An :class:`~resae_serve.engine.http.OpenAIApp` over this engine."""
        ...


def steering_spec(info: EngineInfo, interventions: Sequence[Intervention] = (),
                  monitor: MonitorSpec | None = None, key: str = "",
                  policy: GuardPolicy | None = None) -> SteeringSpec:
    """The :class:`SteeringSpec` of a request, validated against the dictionary ``info``
    describes (raises ``InterventionError`` naming the field), with the server-wide monitors
    and policy interventions of ``policy`` that apply to request ``key``."""
    bad = [x for x in interventions if not isinstance(x, SteerEdit | SteerVector)]
    if bad:
        raise TypeError(f"interventions: {type(bad[0]).__name__} is neither SteerEdit nor "
                        "SteerVector")
    guards, extra = policy.for_request(key) if policy is not None else ((), ())
    every = (*interventions, *extra)
    spec = SteeringSpec(tuple(x for x in every if isinstance(x, SteerEdit)),
                        tuple(x for x in every if isinstance(x, SteerVector)),
                        monitor or MonitorSpec(), key, guards)
    try:
        spec.validate(info.layers, info.d_sae, info.d_model)
    except InterventionError as exc:
        if not extra:
            raise
        raise InterventionError(f"{exc} (the server's policy adds {len(extra)} "
                                "intervention(s) to every request)") from exc
    return spec


async def _unless_dead(driver: Driver, call: Awaitable[T]) -> T:
    """``call`` (a worker RPC), or :class:`EngineDeadError` once the engine has died: vLLM
    leaves an RPC that is in flight when its engine dies waiting forever."""
    task = asyncio.ensure_future(call)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DEAD_POLL_S)
            if done:
                return task.result()
            if driver.errored:
                raise EngineDeadError("the engine stopped")
    finally:
        if not task.done():
            task.cancel()


class _MonitorFetcher:
    """Coalesces monitor fetches of concurrent requests into one RPC per round."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.rounds = 0
        self._wanted: set[str] = set()
        self._flush: set[str] = set()
        self._inflight: set[str] = set()
        self._buffers: dict[str, list[MonitorRecord]] = {}
        self._task: asyncio.Task[None] | None = None

    async def fetch(self, key: str, *, wait: bool) -> list[MonitorRecord]:
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
            taken = await _unless_dead(self.driver,
                                       take_many_async(self.driver, keys, wait=wait))
            for key, records in taken.items():
                self._buffers.setdefault(key, []).extend(records)
            self.rounds += 1
        finally:
            self._inflight = set()


class Step(NamedTuple):
    """One output of a steered request with what the monitor read up to it
    (:meth:`ResaeEngine.steered`)."""

    out: Any
    """vLLM's ``RequestOutput``."""
    features: list[TokenFeatures]
    """Newly read features the request asked for, by (position, layer)."""
    events: list[MonitorEvent]
    """The request's own threshold events on them."""
    guard_events: list[MonitorEvent]
    """Server-wide monitors' events (already reported to the engine's listener)."""
    read_up_to: int
    """Every monitored layer has been read at every position up to this one (-1: none)."""
    stop: MonitorEvent | None = None
    """A ``stop`` monitor fired here: the request ends at this event's position (nothing
    after it is reported, to the caller or the listener); the caller closes the stream."""


def _new_records(records: list[MonitorRecord], delivered: dict[int, int]
                 ) -> list[MonitorRecord]:
    """``records`` by (position, layer) without the (position, layer) pairs already
    delivered (recomputed after a preemption)."""
    fresh: list[MonitorRecord] = []
    for r in sorted(records, key=lambda r: (r.position, r.layer)):
        if r.position > delivered.get(r.layer, -1):
            delivered[r.layer] = r.position
            fresh.append(r)
    return fresh


def _features(records: list[MonitorRecord]) -> tuple[list[TokenFeatures], list[MonitorEvent]]:
    """The caller's features and events of new records."""
    features = [TokenFeatures(r.position, r.layer, r.top_ids, r.top_values, r.watch, r.raw,
                              r.out_of_distribution) for r in records if r.client]
    return features, [e for r in records for e in r.events if not e.monitor]


class _GuardReport:
    """Reports one request's server-wide monitoring to the listener: every value a monitor
    judged (in-distribution positions unless it includes the others), every event with the
    token it fired on."""

    def __init__(self, listener: GuardListener | None, request_id: str,
                 spec: SteeringSpec) -> None:
        self.listener, self.request_id = listener, request_id
        self.guards = {g.name: g for g in spec.guards}
        self.fired: set[str] = set()
        self.tokens: list[int] = []

    def tokens_of(self, out: Any, *, delta: bool) -> None:
        """Keep the request's tokens (prompt, then generated) to name the fired ones."""
        if not self.tokens:
            self.tokens.extend(out.prompt_token_ids or ())
            self.prompt = len(self.tokens)
        ids = out.outputs[0].token_ids if out.outputs else ()
        if delta:
            self.tokens.extend(ids)
        else:
            self.tokens[self.prompt:] = ids

    def first_stop(self, records: list[MonitorRecord]) -> MonitorEvent | None:
        """The earliest event of a ``stop`` monitor in ``records`` (by position)."""
        stops = [e for r in records for e in r.events
                 if e.monitor and self.guards[e.monitor].action == "stop"]
        return min(stops, key=lambda e: e.position, default=None)

    def report(self, records: list[MonitorRecord]) -> list[MonitorEvent]:
        values: dict[str, list[float]] = {}
        events: list[MonitorEvent] = []
        for r in records:
            at = [g for g in self.guards.values() if g.layer == r.layer]
            for g, value in zip(at, r.guard_values, strict=True):
                if not r.out_of_distribution or g.include_out_of_distribution:
                    values.setdefault(g.name, []).append(value)
            events += (e for e in r.events if e.monitor)
        if self.listener is not None:
            for name, observed in values.items():
                self.listener.observed(name, observed)
            for e in events:
                guard = self.guards[e.monitor]
                token = self.tokens[e.position] if e.position < len(self.tokens) else -1
                self.listener.fired(GuardEvent(self.request_id, e.monitor, guard.action,
                                               e.position, token, e.layer, e.feature, e.value,
                                               e.threshold), e.monitor not in self.fired)
                self.fired.add(e.monitor)
        return events


class _Holdback:
    """Generated tokens of a request under a ``stop`` monitor, released once the monitor has
    read them (the features at position p come from the pass after token p was sampled), so
    nothing after a firing token reaches the caller.

    Tokens and text are released together at output boundaries (vLLM's cumulative outputs
    give the text of every token count they end at: one token per decode step)."""

    def __init__(self) -> None:
        self.prompt = 0
        self.sent_tokens = 0
        self.sent_text = 0
        self.text_at: dict[int, int] = {0: 0}
        self.ids: tuple[int, ...] = ()
        self.text = ""

    def add(self, out: Any) -> None:
        completion = out.outputs[0]
        self.prompt = len(out.prompt_token_ids or ())
        self.ids, self.text = tuple(completion.token_ids), completion.text
        self.text_at[len(self.ids)] = len(self.text)

    def release(self, up_to_position: int | None) -> tuple[tuple[int, ...], str]:
        """New tokens and text up to ``up_to_position`` (``None``: everything)."""
        count = len(self.ids) if up_to_position is None else max(
            (c for c in self.text_at if c <= up_to_position - self.prompt + 1), default=0)
        count = max(count, self.sent_tokens)
        tokens = self.ids[self.sent_tokens:count]
        end = self.text_at.get(count, len(self.text))
        text = self.text[self.sent_text:end]
        self.sent_tokens, self.sent_text = count, max(end, self.sent_text)
        return tokens, text


@contextlib.contextmanager
def _kv_env_cleared(clear: bool) -> Iterator[None]:
    """Without ``VLLM_CPU_KVCACHE_SPACE`` while vLLM builds its config and starts its processes:
    vLLM's CPU backend lets that variable (whole GiB) override ``kv_cache_memory_bytes``."""
    saved = os.environ.pop(KV_ENV, None) if clear else None
    try:
        yield
    finally:
        if saved is not None:
            os.environ[KV_ENV] = saved


class ResaeEngine:
    """Async per-request steering and monitoring over one engine with the ReSAE hook."""

    def __init__(self, driver: Driver, info: EngineInfo,
                 max_configs: int | None = None,
                 feature_runtime: FeatureRuntimeInfo | None = None) -> None:
        self.driver = driver
        self.info = info
        self.feature_runtime = feature_runtime or FeatureRuntimeInfo("torch")
        """The feature runtime the worker's monitor encodes with (as the worker reports it)."""
        self.admission = ConfigAdmission(min(max_configs or info.max_configs, info.max_configs))
        self._fetcher = _MonitorFetcher(driver)
        self._ids = itertools.count()
        self.guards = GuardPolicy()
        """Server-wide monitors and policy interventions (:meth:`set_guards`)."""
        self.listener: GuardListener | None = None

    @classmethod
    async def build(cls, model: str | os.PathLike[str], dictionary: str | os.PathLike[str], *,
                    max_configs: int = 32, kv_cache_gib: float | None = None,
                    kv_cache_bytes: int | None = None, **engine_kwargs: Any) -> ResaeEngine:
        """Start vLLM's ``AsyncLLM`` with the ReSAE hook and wrap it (a minute or more; the
        event loop keeps running meanwhile).

        ``kv_cache_bytes`` (or ``kv_cache_gib``): the KV cache, passed to vLLM as
        ``kv_cache_memory_bytes`` (``None``: vLLM's default, on CPU ``VLLM_CPU_KVCACHE_SPACE``
        or a share of all memory, on GPU ``gpu_memory_utilization``); ``engine_kwargs``:
        :func:`~resae_serve.engine.llm.engine_kwargs` (``max_model_len``, ``dtype`` ...)."""
        from resae_serve.engine.llm import build_async_llm

        if kv_cache_bytes is None and kv_cache_gib is not None:
            kv_cache_bytes = int(kv_cache_gib * 2**30)
        if kv_cache_bytes is not None:
            engine_kwargs["kv_cache_memory_bytes"] = int(kv_cache_bytes)
        with _kv_env_cleared(kv_cache_bytes is not None):
            llm = await build_async_llm(model, dictionary, max_configs=max_configs,
                                        **engine_kwargs)
        driver = AsyncLLMDriver(llm)
        try:
            return await cls.connect(driver, max_configs)
        except BaseException:
            driver.shutdown()
            raise

    @classmethod
    async def connect(cls, driver: Driver, max_configs: int | None = None) -> ResaeEngine:
        """Wrap the engine behind ``driver`` (its worker must run the ReSAE extension)."""
        return cls(driver, await info_async(driver), max_configs, await runtime_async(driver))

    # ------------------------------------------------------------------ liveness

    @property
    def resident_configs(self) -> int:
        """Distinct steering configs in flight now (admitted, not yet released)."""
        return self.admission.resident

    @property
    def errored(self) -> bool:
        """The engine has died (e.g. its core process was killed); nothing runs on it again."""
        return self.driver.errored

    def num_unfinished(self) -> int:
        """Requests the engine has not finished."""
        return self.driver.num_unfinished()

    async def stats(self) -> EngineStats:
        """The worker's counters."""
        return await _unless_dead(self.driver, stats_async(self.driver))

    async def shutdown(self) -> None:
        """Stop the engine (its processes and memory); on a worker thread, as it blocks."""
        await asyncio.to_thread(self.driver.shutdown)

    async def openai_app(self, served_model_name: str) -> Any:
        """vLLM's OpenAI-compatible app over this engine, steered per request
        (:func:`resae_serve.engine.http.build_openai_app`; needs an ``AsyncLLM`` driver)."""
        if not isinstance(self.driver, AsyncLLMDriver):
            raise TypeError(f"openai_app needs an AsyncLLM engine, not "
                            f"{type(self.driver).__name__}")
        from resae_serve.engine.http import build_openai_app

        return await build_openai_app(self, served_model_name)

    # ------------------------------------------------------------------ requests

    def set_guards(self, policy: GuardPolicy, listener: GuardListener | None = None) -> None:
        """Apply ``policy`` to every request from now on, reporting to ``listener``."""
        policy.validate(self.info.layers, self.info.d_sae, self.info.d_model)
        self.guards, self.listener = policy, listener

    def spec(self, interventions: Sequence[Intervention] = (), monitor: MonitorSpec | None = None,
             key: str = "") -> SteeringSpec:
        """A validated :class:`SteeringSpec` with the server's policy for request ``key``
        (raises ``InterventionError`` naming the field)."""
        return steering_spec(self.info, interventions, monitor, key, self.guards)

    async def generate(self, prompt: str | Sequence[int], sampling: SamplingSpec, *,
                       interventions: Sequence[Intervention] = (),
                       monitor: MonitorSpec | None = None,
                       request_id: str | None = None,
                       watched: bool = True) -> AsyncGenerator[GenerationChunk, None]:
        """Stream one request's tokens with their features and events (see module docstring);
        ``watched``: under the server's guard policy (:meth:`set_guards`)."""
        request_id = request_id or f"resae-{next(self._ids)}"
        spec = steering_spec(self.info, interventions, monitor, request_id,
                             self.guards if watched else None)
        item = prompt_with(prompt, spec)
        hold = _Holdback() if any(g.action == "stop" for g in spec.guards) else None
        n_tokens, n_text = 0, 0
        steps = self.steered(spec, request_id,
                             lambda: self.driver.generate(item, sampling, spec, request_id))
        try:
            async for step in steps:
                out, finished = step.out, bool(step.out.finished)
                completion = out.outputs[0]
                if hold is None:
                    tokens = tuple(completion.token_ids[n_tokens:])
                    text = completion.text[n_text:]
                    n_tokens, n_text = len(completion.token_ids), len(completion.text)
                    yield GenerationChunk(request_id, tokens, text, tuple(step.features),
                                          tuple(step.events), finished,
                                          completion.finish_reason)
                    continue
                hold.add(out)
                if step.stop is not None:
                    tokens, text = hold.release(step.stop.position)
                    yield GenerationChunk(request_id, tokens, text, tuple(step.features),
                                          tuple(step.events), True, "guardrail", step.stop)
                    return            # ``steps`` ended: it aborted the engine request
                tokens, text = hold.release(None if finished else step.read_up_to)
                yield GenerationChunk(request_id, tokens, text, tuple(step.features),
                                      tuple(step.events), finished, completion.finish_reason)
        finally:
            await steps.aclose()

    async def steered(self, spec: SteeringSpec, request_id: str,
                      start: Callable[[], AsyncIterator[Any]], *, delta: bool = False
                      ) -> AsyncGenerator[Step, None]:
        """The life of one steered request, shared by every front end: wait in admission,
        run ``start()`` (the engine's stream of vLLM ``RequestOutput`` s of ``request_id``,
        steered by ``spec``; ``spec.key`` names its monitor results in the worker), and yield
        each output as a :class:`Step` with the features and events newly available
        (monitored requests; the final output waits for the worker's queue). Server-wide
        monitors' values and events go to the engine's listener. ``delta``: the outputs
        carry new tokens only (vLLM's ``RequestOutputKind.DELTA``). Stopping early aborts
        ``request_id`` and drops its monitor results; the config is always released."""
        monitoring = bool(spec.monitor_layers)
        layers = spec.monitor_layers
        report = _GuardReport(self.listener, request_id, spec)
        handle = await self.admission.acquire(spec)
        finished = False
        stream: AsyncIterator[Any] | None = None
        try:
            delivered: dict[int, int] = {}
            stream = start()
            async for out in stream:
                features: list[TokenFeatures] = []
                events: list[MonitorEvent] = []
                guard_events: list[MonitorEvent] = []
                stop: MonitorEvent | None = None
                if monitoring:
                    records = _new_records(
                        await self._fetcher.fetch(spec.key, wait=bool(out.finished)),
                        delivered)
                    stop = report.first_stop(records)
                    if stop is not None:
                        records = [r for r in records if r.position <= stop.position]
                    features, events = _features(records)
                    if spec.guards:
                        report.tokens_of(out, delta=delta)
                        guard_events = report.report(records)
                finished = bool(out.finished)
                yield Step(out, features, events, guard_events,
                           min((delivered.get(layer, -1) for layer in layers), default=-1),
                           stop)
                if finished or stop is not None:
                    break
        finally:
            try:
                close = getattr(stream, "aclose", None)
                if close is not None:
                    await close()
                if not finished:
                    await self.driver.abort(request_id)
                    if monitoring:      # drop its results here and in the worker
                        await self._fetcher.forget(spec.key)
                        with contextlib.suppress(EngineDeadError):    # then nothing is left
                            await _unless_dead(self.driver,
                                               discard_async(self.driver, spec.key))
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
                           last.finish_reason, last.guardrail)
