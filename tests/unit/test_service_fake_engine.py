"""The gRPC servicer against a fake engine, without vLLM: a real server on loopback (built by
``create_server`` with the fake injected through ``engine_factory``), the real client library,
a tiny tokenizer and a tiny dictionary (layers 1 and 3, d_model 8, 32 latents).

:class:`FakeEngine` implements :class:`~resae_serve.engine.serving.ServingEngine` the way
:class:`~resae_serve.engine.serving.ResaeEngine` behaves: it validates specs against the
dictionary, streams one token per chunk with the features of every fed position, raises the
engine's own errors, and records what the server asked of it. With a guard policy set
(``set_guards``) it reports the server-wide monitors to the listener as the engine does: every
monitor reads ``p`` at position ``p`` and fires where that reaches its threshold; a ``stop``
monitor ends the request there (finish reason ``guardrail``). The last tests run Generate,
Inspect and an engine death again in a fresh interpreter and check that vLLM was never imported
(in a full run another module may have imported it first).
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncGenerator, Coroutine, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import LlamaConfig, PreTrainedTokenizerFast

from resae_serve.artifact import read_manifest, save_artifact
from resae_serve.engine.guards import GuardEvent, GuardListener, GuardPolicy, ServerMonitor
from resae_serve.engine.rpc import EngineInfo, FeatureRuntimeInfo, MonitorEvent
from resae_serve.engine.serving import (
    GenerationChunk,
    Intervention,
    TokenFeatures,
    steering_spec,
)
from resae_serve.engine.spec import (
    Condition,
    MonitorSpec,
    SamplingSpec,
    SteerEdit,
    SteeringSpec,
    SteerVector,
)
from resae_serve.errors import EngineDeadError, EngineRequestError
from resae_serve.server import convert
from resae_serve.server.app import ResaeServer, create_server
from resae_serve.server.client import (
    ResaeClient,
    add,
    clamp,
    condition,
    generate_request,
    monitor,
    vector,
)
from resae_serve.server.config import (
    EngineSettings,
    Limits,
    ServerConfig,
    ServerConfigError,
    WatchSettings,
)
from resae_serve.server.v1 import resae_pb2 as pb
from resae_serve.server.v1.resae_pb2_grpc import ResaeServiceStub
from tests.unit.resae_fixtures import D_MODEL, D_SAE, IDENTITY, LAYERS, tiny_resae

CHILD_ENV = "RESAE_TEST_NO_VLLM_CHILD"
T = TypeVar("T")
PROMPT = "w1 w2 w3"
FIRST_TOKEN = 10                    # generated token n is FIRST_TOKEN + n ("w6", "w7", ...)


class FakeEngine:
    """A :class:`~resae_serve.engine.serving.ServingEngine` without vLLM.

    Feature values are made up but checkable: at position ``p`` the top features are
    ``0 .. top_k-1`` with values ``top_k .. 1``, every watched feature reads ``p``, and a
    threshold fires where ``p`` reaches it."""

    def __init__(self) -> None:
        self.info = EngineInfo(LAYERS, (D_SAE,) * len(LAYERS), D_MODEL, 4)
        self.feature_runtime = FeatureRuntimeInfo("onnxruntime", "cpu", "float32", 1, "/x")
        self.sampling: dict[str, SamplingSpec] = {}
        self.steering: dict[str, SteeringSpec] = {}
        self.prompts: dict[str, list[int]] = {}
        self.live: set[str] = set()
        self.aborted: list[str] = []
        self.errored = False
        self.shut_down = False
        self.refuse: str | None = None
        """Raise EngineRequestError with this message when a request starts."""
        self.die_after: int | None = None
        """Raise EngineDeadError after this many chunks (and report errored)."""
        self.pause_after: int | None = None
        """Stop producing after this many chunks until the request is cancelled."""
        self.policy = GuardPolicy()
        self.listener: GuardListener | None = None
        self.guards: dict[str, tuple[str, ...]] = {}
        """The monitors that applied to each request."""

    def set_guards(self, policy: GuardPolicy, listener: GuardListener | None = None) -> None:
        policy.validate(self.info.layers, self.info.d_sae, self.info.d_model)
        self.policy, self.listener = policy, listener

    @property
    def resident_configs(self) -> int:
        return len({self.steering[r].content_hash() for r in self.live
                    if self.steering[r].steers})

    def num_unfinished(self) -> int:
        return len(self.live)

    async def shutdown(self) -> None:
        self.shut_down = True

    def spec(self, interventions: Sequence[Intervention] = (),
             monitor: MonitorSpec | None = None, key: str = "") -> SteeringSpec:
        return steering_spec(self.info, interventions, monitor, key)

    async def generate(self, prompt: str | Sequence[int], sampling: SamplingSpec, *,
                       interventions: Sequence[Intervention] = (),
                       monitor: MonitorSpec | None = None,
                       request_id: str | None = None,
                       watched: bool = True) -> AsyncGenerator[GenerationChunk, None]:
        request_id = request_id or f"fake-{len(self.sampling)}"
        spec = self.spec(interventions, monitor, key=request_id)
        if self.errored:
            raise EngineDeadError("the engine stopped")
        if self.refuse is not None:
            raise EngineRequestError(self.refuse)
        ids = list(prompt)                                   # the server sends token ids
        self.sampling[request_id], self.steering[request_id] = sampling, spec
        self.prompts[request_id] = ids
        guards, _ = self.policy.for_request(request_id) if watched else ((), ())
        self.guards[request_id] = tuple(g.name for g in guards)
        fired: set[str] = set()
        self.live.add(request_id)
        finished = False
        try:
            for n in range(sampling.max_tokens):
                if n == self.die_after:
                    self.errored = True
                    raise EngineDeadError("the engine stopped")
                if n == self.pause_after:
                    await asyncio.Event().wait()             # until cancelled
                await asyncio.sleep(0)
                positions = range(len(ids)) if n == 0 else [len(ids) + n - 1]
                m = spec.monitor
                features = tuple(
                    TokenFeatures(p, layer, tuple(range(m.top_k)),
                                  tuple(float(m.top_k - i) for i in range(m.top_k)),
                                  tuple(float(p) for _ in m.watch))
                    for p in positions for layer in m.layers)
                events = tuple(MonitorEvent(p, t.layer, t.feature, float(p), t.value)
                               for p in positions for t in m.thresholds if p >= t.value)
                stop = self._guard(request_id, guards, positions, ids, fired)
                if stop is not None:                  # no token after the firing one
                    finished = True
                    yield GenerationChunk(request_id, (), "", features, events, True,
                                          "guardrail", stop)
                    return
                finished = n == sampling.max_tokens - 1
                token = FIRST_TOKEN + n
                yield GenerationChunk(request_id, (token,), f" w{token - 4}", features, events,
                                      finished, "length" if finished else None)
        finally:
            self.live.discard(request_id)
            if not finished:
                self.aborted.append(request_id)


    def _guard(self, request_id: str, guards: Sequence[Any], positions: Sequence[int],
               ids: Sequence[Any], fired: set[str]) -> MonitorEvent | None:
        """Report the guards' readings of ``positions``; the event of a ``stop`` guard that
        fired."""
        for g in guards:
            if self.listener is not None:
                self.listener.observed(g.name, [float(p) for p in positions])
            for p in positions:
                if p < g.threshold:
                    continue
                token = ids[p] if p < len(ids) else FIRST_TOKEN + p - len(ids)
                if self.listener is not None:
                    self.listener.fired(GuardEvent(request_id, g.name, g.action, p, token,
                                                   g.layer, g.feature, float(p), g.threshold),
                                        g.name not in fired)
                fired.add(g.name)
                if g.action == "stop":
                    return MonitorEvent(p, g.layer, g.feature, float(p), g.threshold, g.name)
        return None


# ----------------------------------------------------------------------------- harness

class _Loop:
    """An event loop on a daemon thread: the servers run there, the sync clients here."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module", autouse=True)
def vllm_before() -> bool:
    """Whether vLLM was imported before this module's first test (by another module)."""
    return "vllm" in sys.modules


@pytest.fixture(scope="module")
def loop() -> Iterator[_Loop]:
    server_loop = _Loop()
    yield server_loop
    server_loop.close()


@pytest.fixture
def config(tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast) -> ServerConfig:
    """A tokenizer-only model folder and a tiny dictionary (no catalog)."""
    model = tmp_path / "model"
    LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=D_MODEL, intermediate_size=16,
                num_hidden_layers=4, num_attention_heads=2).save_pretrained(model)
    tiny_tokenizer.save_pretrained(model)
    dictionary = save_artifact(tiny_resae(), tmp_path / "dict", IDENTITY)
    return ServerConfig(dictionary=dictionary, model=str(model), port=0, metrics_port=None,
                        limits=Limits(max_tokens=16, default_max_tokens=3, max_prompt_tokens=32,
                                      max_pending=4),
                        engine=EngineSettings(max_model_len=64), grace_s=1.0)


def _start(loop: _Loop, config: ServerConfig, factory: Any, *, ready: bool = True
           ) -> ResaeServer:
    async def go() -> ResaeServer:
        server, _ = await create_server(config, engine_factory=factory,
                                        manifest=read_manifest(config.dictionary))
        await server.start()
        if ready:
            assert await server.wait_ready(30)
        return server

    return loop.run(go())


@pytest.fixture
def served(loop: _Loop, config: ServerConfig) -> Iterator[tuple[ResaeServer, FakeEngine]]:
    """A started server that owns a fresh fake engine."""
    fake = FakeEngine()

    async def factory(_: ServerConfig) -> tuple[FakeEngine, bool]:
        return fake, True

    server = _start(loop, config, factory)
    yield server, fake
    loop.run(server.stop(0))


def _client(server: ResaeServer, timeout: float = 30) -> ResaeClient:
    return ResaeClient(f"127.0.0.1:{server.port}", timeout=timeout)


def _health(server: ResaeServer) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        return int(health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10).status)


def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


# ----------------------------------------------------------------------------- requests

def test_generate_streams_prompt_chunks_features_and_summary(
        served: tuple[ResaeServer, FakeEngine]) -> None:
    server, fake = served
    with _client(server) as client:
        done = client.complete(PROMPT, max_tokens=4, temperature=0.5, top_p=0.9, top_k=5, seed=7,
                               stop=["w9"], interventions=[add(3, 2, 1.5)],
                               monitor=monitor([1, 3], top_k=2, watch=[4],
                                               thresholds=[(3, 4, 2.0)]))
    (request_id, sampling), = fake.sampling.items()
    assert sampling == SamplingSpec(max_tokens=4, temperature=0.5, top_p=pytest.approx(0.9),
                                    top_k=5, seed=7, stop=("w9",))
    steering = fake.steering[request_id]
    assert [(e.layer, e.feature, e.mode, e.value) for e in steering.edits] == [
        (3, 2, "add", 1.5)]
    assert done.request_id == request_id and request_id.startswith("resae-")
    n_prompt = len(fake.prompts[request_id])
    assert [t.text for t in done.prompt_tokens] == PROMPT.split()
    assert [t.position for t in done.prompt_tokens] == list(range(n_prompt))
    assert [(t.position, t.id, t.text) for t in done.tokens] == [
        (n_prompt + n, FIRST_TOKEN + n, f"w{FIRST_TOKEN + n - 4}") for n in range(4)]
    assert sorted((f.position, f.layer) for f in done.features) == [
        (p, layer) for p in range(n_prompt + 3) for layer in (1, 3)]
    for f in done.features:
        assert [(x.feature, x.value) for x in f.top] == [(0, 2.0), (1, 1.0)]
        assert list(f.watch) == [f.position]
    assert sorted(e.position for e in done.events) == list(range(2, n_prompt + 3))
    assert done.summary is not None and done.summary.finish_reason == "length"
    assert (done.summary.prompt_tokens, done.summary.completion_tokens) == (n_prompt, 4)
    assert done.text == " w6 w7 w8 w9"
    assert server.wait_idle(5) == {"active_streams": 0, "pending": 0, "resident_configs": 0,
                                   "engine_unfinished": 0}


def test_defaults_and_inspect_ask_the_engine_for_what_they_need(
        served: tuple[ResaeServer, FakeEngine]) -> None:
    server, fake = served
    with _client(server) as client:
        done = client.complete(PROMPT)
        reply = client.inspect(PROMPT, monitor=monitor([1], top_k=1))
    plain, inspect = fake.sampling.values()
    assert plain == SamplingSpec(max_tokens=3)                  # limits.default_max_tokens
    assert len(done.tokens) == 3 and not done.features
    assert inspect == SamplingSpec(max_tokens=1, temperature=0.0)
    assert [(f.position, f.layer) for f in reply.features] == [(p, 1) for p in range(3)]


def test_dictionary_and_catalog_calls(served: tuple[ResaeServer, FakeEngine]) -> None:
    server, _ = served
    with _client(server) as client:
        reply = client.get_dictionary()
        assert [(x.layer, x.d_sae) for x in reply.layers] == [(1, D_SAE), (3, D_SAE)]
        assert reply.d_model == D_MODEL and reply.limits.max_tokens == 16
        assert reply.backend == "onnxruntime"              # what the engine's worker reports
        code, message = _code(lambda: client.get_feature(1, 0))
    assert ('resae_feature_runtime_info{backend="onnxruntime",provider="cpu"} 1.0'
            in server.metrics.render().decode())
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "no feature catalog" in message


@pytest.mark.parametrize(("request_kwargs", "refuse", "message"), [
    ({"top_p": 0.0}, None, "sampling.top_p=0.0"),                           # server's checks
    ({"interventions": [add(2, 1, 1.0)]}, None, "layer=2 is not in the dictionary"),  # engine
    ({"monitor": monitor([1], top_k=33)}, None, "monitor.top_k=33"),
    ({}, "the engine refused the request: prompt too long", "prompt too long"),
])
def test_invalid_requests_end_invalid_argument_before_any_output(
        served: tuple[ResaeServer, FakeEngine], request_kwargs: dict[str, Any],
        refuse: str | None, message: str) -> None:
    server, fake = served
    fake.refuse = refuse
    with _client(server) as client:
        responses: list[pb.GenerateResponse] = []

        def call() -> None:
            responses.extend(client.generate(PROMPT, max_tokens=2, **request_kwargs))

        code, details = _code(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, details
    assert responses == []
    assert not any(server.wait_idle(5).values())


def test_cancelling_a_stream_aborts_the_engine_request(
        served: tuple[ResaeServer, FakeEngine]) -> None:
    server, fake = served
    fake.pause_after = 1
    with _client(server) as client:
        stream = client.generate(PROMPT, max_tokens=8, interventions=[add(1, 1, 1.0)])
        assert next(stream).WhichOneof("kind") == "prompt"
        assert next(stream).WhichOneof("kind") == "chunk"
        assert fake.resident_configs == 1
        stream.close()                                  # cancels the call
        held = server.wait_idle(10)
    assert not any(held.values()), held
    assert len(fake.aborted) == 1 and fake.resident_configs == 0


# ----------------------------------------------------------------------------- lifecycle

def _wait_health(server: ResaeServer, status: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while _health(server) != status:                                  # the watchdog polls
        assert time.monotonic() < deadline, f"health not {status} within {timeout} s"
        time.sleep(0.05)


def test_engine_death_ends_calls_unavailable_and_turns_health_off(
        loop: _Loop, config: ServerConfig) -> None:
    fake = FakeEngine()
    built: list[FakeEngine] = []

    async def factory(_: ServerConfig) -> tuple[FakeEngine, bool]:
        built.append(fake)
        return fake, True

    server = _start(loop, replace(config, restart_engine=False), factory)
    try:
        fake.die_after = 1
        with _client(server) as client:
            stream = client.generate(PROMPT, max_tokens=4)
            assert next(stream).WhichOneof("kind") == "prompt"
            assert next(stream).WhichOneof("kind") == "chunk"
            code, message = _code(lambda: list(stream))
            assert code == grpc.StatusCode.UNAVAILABLE and "engine stopped" in message
            _wait_health(server, health_pb2.HealthCheckResponse.NOT_SERVING)
            code, message = _code(lambda: client.complete(PROMPT))
        assert code == grpc.StatusCode.UNAVAILABLE and "engine is down" in message
        assert "restarts are off" in message and len(built) == 1    # never rebuilt
    finally:
        loop.run(server.stop(0))


def _restarts(server: ResaeServer, outcome: str) -> float:
    value = server.metrics.registry.get_sample_value("resae_engine_restarts_total",
                                                     {"outcome": outcome})
    return value or 0.0


def test_a_dead_engine_is_rebuilt_and_serves_again(loop: _Loop, config: ServerConfig) -> None:
    engines: list[FakeEngine] = []
    gate = threading.Event()

    async def factory(_: ServerConfig) -> tuple[FakeEngine, bool]:
        if engines:                             # a rebuild: wait until the test has looked
            await asyncio.to_thread(gate.wait, 30)
        engines.append(FakeEngine())
        return engines[-1], True

    server = _start(loop, replace(config, restart_backoff_s=0.0), factory)
    try:
        first = engines[0]
        with _client(server) as client:
            before = client.complete(PROMPT, max_tokens=3)
            first.die_after = 1
            stream = client.generate(PROMPT, max_tokens=4)
            assert next(stream).WhichOneof("kind") == "prompt"
            code, _ = _code(lambda: list(stream))
            assert code == grpc.StatusCode.UNAVAILABLE
            _wait_health(server, health_pb2.HealthCheckResponse.NOT_SERVING)
            code, message = _code(lambda: client.complete(PROMPT))
            assert code == grpc.StatusCode.UNAVAILABLE and "restarting, attempt 1 of 5" in message
            assert first.shut_down                     # the dead one is shut down first
            gate.set()
            _wait_health(server, health_pb2.HealthCheckResponse.SERVING)
            after = client.complete(PROMPT, max_tokens=3)
        assert after.text == before.text and len(engines) == 2
        assert server.engine is engines[1] and server.service.engine is engines[1]
        assert engines[1].listener is server.watch_hub is not None     # monitors apply again
        assert server.restarts == 1 and _restarts(server, "ok") == 1
        assert server.metrics.engine_up._value.get() == 1
    finally:
        gate.set()
        loop.run(server.stop(0))
    assert engines[1].shut_down


def test_restarts_are_bounded_and_a_shared_engine_is_never_rebuilt(
        loop: _Loop, config: ServerConfig) -> None:
    calls: list[str] = []

    async def failing(_: ServerConfig) -> tuple[FakeEngine, bool]:
        calls.append("build")
        if len(calls) > 1:
            raise RuntimeError("no memory for the KV cache")
        return fake, True

    fake = FakeEngine()
    server = _start(loop, replace(config, restart_attempts=2, restart_backoff_s=0.01), failing)
    try:
        fake.errored = True                            # dies while idle
        deadline = time.monotonic() + 10
        while _restarts(server, "failed") < 2:
            assert time.monotonic() < deadline, "restart attempts not made"
            time.sleep(0.05)
        with _client(server) as client:
            code, message = _code(lambda: client.complete(PROMPT))
        assert code == grpc.StatusCode.UNAVAILABLE and "2 restart attempts failed" in message
        assert _health(server) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert len(calls) == 3 and _restarts(server, "ok") == 0
    finally:
        loop.run(server.stop(0))

    shared = FakeEngine()
    borrowed_calls: list[str] = []

    async def borrowed(_: ServerConfig) -> tuple[FakeEngine, bool]:
        borrowed_calls.append("build")
        return shared, False

    guest = _start(loop, replace(config, restart_backoff_s=0.0), borrowed)
    try:
        shared.errored = True
        _wait_health(guest, health_pb2.HealthCheckResponse.NOT_SERVING)
        time.sleep(0.3)
        assert borrowed_calls == ["build"] and not shared.shut_down
    finally:
        loop.run(guest.stop(0))
    assert not shared.shut_down


def test_loading_failing_and_stopping(loop: _Loop, config: ServerConfig) -> None:
    release = threading.Event()
    fake, shared = FakeEngine(), FakeEngine()

    async def slow(_: ServerConfig) -> tuple[FakeEngine, bool]:
        await asyncio.to_thread(release.wait, 30)
        return fake, True

    async def broken(_: ServerConfig) -> tuple[FakeEngine, bool]:
        raise RuntimeError("no memory for the KV cache")

    async def borrowed(_: ServerConfig) -> tuple[FakeEngine, bool]:
        return shared, False

    loading = _start(loop, config, slow, ready=False)
    try:
        assert _health(loading) == health_pb2.HealthCheckResponse.NOT_SERVING
        with _client(loading) as client:
            code, message = _code(lambda: client.complete(PROMPT))
            assert code == grpc.StatusCode.UNAVAILABLE and "loading" in message
            release.set()
            assert loop.run(loading.wait_ready(30))
            assert _health(loading) == health_pb2.HealthCheckResponse.SERVING
            assert client.complete(PROMPT).summary is not None
    finally:
        release.set()
        loop.run(loading.stop(0))
    assert fake.shut_down                               # its owner shut it down

    failed = _start(loop, config, broken, ready=False)
    try:
        assert not loop.run(failed.wait_ready(30))
        with _client(failed) as client:
            code, message = _code(lambda: client.complete(PROMPT))
        assert code == grpc.StatusCode.UNAVAILABLE and "failed to load" in message
    finally:
        loop.run(failed.stop(0))

    guest = _start(loop, config, borrowed)
    loop.run(guest.stop(0))
    assert not shared.shut_down                         # a shared engine stays up


# ----------------------------------------------------------------------------- monitoring

MONITORS = (ServerMonitor("late", 1, 5, 4.0),                  # fires at positions >= 4
            ServerMonitor("early", 3, 6, 1.0),
            ServerMonitor("guard", 3, 7, 6.0, "stop"))


def _watching(config: ServerConfig, **watch: Any) -> ServerConfig:
    return replace(config, watch=WatchSettings(**{"monitors": MONITORS, **watch}))


@pytest.fixture
def watched(loop: _Loop, config: ServerConfig) -> Iterator[tuple[ResaeServer, FakeEngine]]:
    """A started server with the server-wide monitors of ``MONITORS`` (buffers of 4)."""
    fake = FakeEngine()

    async def factory(_: ServerConfig) -> tuple[FakeEngine, bool]:
        return fake, True

    server = _start(loop, _watching(config, subscriber_buffer=4), factory)
    yield server, fake
    loop.run(server.stop(0))


def _sample(server: ResaeServer, name: str, labels: dict[str, str]) -> float:
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


def _wait_subscribers(server: ResaeServer, n: int) -> None:
    deadline = time.monotonic() + 10
    while server.watch_hub is None or server.watch_hub.subscribers != n:
        assert time.monotonic() < deadline, f"not {n} WatchEvents subscriber(s)"
        time.sleep(0.01)


def test_watch_events_streams_monitor_events_with_token_text(
        watched: tuple[ResaeServer, FakeEngine]) -> None:
    server, fake = watched
    got: list[Any] = []
    with _client(server) as client:
        def watch() -> None:
            for message in client.watch_events(["late"]):
                got.append(message)
                if len(got) == 2:
                    return

        reader = threading.Thread(target=watch)
        reader.start()
        _wait_subscribers(server, 1)
        done = client.complete(PROMPT, max_tokens=4)            # positions 0..6, fed 0..5
        reader.join(10)
    assert not reader.is_alive()
    assert done.summary is not None and done.summary.finish_reason == "length"
    assert [(e.monitor, e.action, e.position, e.token_id, e.token_text, e.layer, e.feature,
             e.value, e.threshold) for e in got] == [
        ("late", "record", 4, 11, "w7", 1, 5, 4.0, 4.0),
        ("late", "record", 5, 12, "w8", 1, 5, 5.0, 4.0)]
    assert all(e.request_id == done.request_id and e.time_unix_s > 1e9 for e in got)
    assert fake.guards[done.request_id] == ("late", "early", "guard")
    late, early = {"monitor": "late"}, {"monitor": "early"}
    assert _sample(server, "resae_monitor_fired_tokens_total", late) == 2
    assert _sample(server, "resae_monitor_fired_requests_total", late) == 1
    assert _sample(server, "resae_monitor_fired_tokens_total", early) == 5
    assert _sample(server, "resae_monitor_value_count", late) == 6
    assert _sample(server, "resae_monitor_value_bucket", {**late, "le": "2.0"}) == 3
    _wait_subscribers(server, 0)                                  # the stream was closed


def test_watch_events_sends_headers_once_subscribed(
        watched: tuple[ResaeServer, FakeEngine]) -> None:
    """The headers come before any event: a caller that waited for them is subscribed."""
    server, _ = watched
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = ResaeServiceStub(channel).WatchEvents(pb.WatchEventsRequest(), timeout=5)
        call.initial_metadata()                    # DEADLINE_EXCEEDED if they never came
        assert server.watch_hub is not None and server.watch_hub.subscribers == 1
        call.cancel()
    _wait_subscribers(server, 0)


def test_a_watcher_that_does_not_read_gets_exact_drop_counts(
        loop: _Loop, watched: tuple[ResaeServer, FakeEngine]) -> None:
    server, _ = watched
    hub = server.watch_hub
    assert hub is not None
    n = 5000

    async def burst() -> None:        # a busy engine: many events before the stream can run
        for i in range(n):
            hub.fired(GuardEvent(f"r{i}", "early", "record", i, 10, 3, 6, 1.5, 1.0), True)

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = ResaeServiceStub(channel).WatchEvents(pb.WatchEventsRequest(), timeout=30)
        _wait_subscribers(server, 1)
        loop.run(burst())
        first = next(call)                      # everything buffered, in one message
        assert (first.dropped.dropped, first.dropped.total) == (n - 4, n - 4)
        assert [e.request_id for e in first.events] == [f"r{i}" for i in range(n - 4, n)]
        assert _sample(server, "resae_watch_dropped_events_total", {"monitor": "early"}) == n - 4
        with _client(server) as client:         # generation goes on while nobody reads
            done = client.complete(PROMPT, max_tokens=4)
        events: list[pb.WatchedEvent] = []      # its 7 events: 5 "early", 2 "late"
        dropped, total = 0, n - 4
        while len(events) + dropped < 7:        # whatever the transport took, none is lost
            message = next(call)
            if message.HasField("dropped"):
                dropped += message.dropped.dropped
                total = message.dropped.total
            events += message.events
        call.cancel()
    assert all(e.request_id == done.request_id for e in events)
    assert total == n - 4 + dropped
    assert dropped + n - 4 == sum(
        _sample(server, "resae_watch_dropped_events_total", {"monitor": name})
        for name in ("late", "early", "guard"))
    _wait_subscribers(server, 0)


def test_watch_events_errors_and_auth(loop: _Loop, config: ServerConfig,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    token = "t" * 32
    monkeypatch.setenv("RESAE_AUTH_TOKENS", token)

    async def factory(_: ServerConfig) -> tuple[FakeEngine, bool]:
        return FakeEngine(), True

    server = _start(loop, replace(_watching(config), auth=True), factory)
    try:
        with _client(server) as anonymous:
            code, _ = _code(lambda: next(anonymous.watch_events()))
            assert code == grpc.StatusCode.UNAUTHENTICATED
        with ResaeClient(f"127.0.0.1:{server.port}", token=token, timeout=30) as client:
            code, message = _code(lambda: next(client.watch_events(["late", "toxic"])))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert message == ("monitors[1]='toxic' is not a monitor of this server; its "
                               "monitors are ['late', 'early', 'guard']")
            stream = client.watch_events(["guard"])
            got: list[Any] = []
            reader = threading.Thread(target=lambda: got.append(next(stream)))
            reader.start()
            _wait_subscribers(server, 1)
            done = client.complete(PROMPT, max_tokens=8)
            reader.join(10)
            stream.close()
        assert [(e.monitor, e.position) for e in got] == [("guard", 6)]
        assert done.summary is not None and done.summary.finish_reason == "guardrail"
    finally:
        loop.run(server.stop(0))

    bare = _start(loop, config, factory)                 # no monitors configured
    try:
        with _client(bare) as client:
            code, message = _code(lambda: next(client.watch_events()))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "[[watch.monitors]]" in message
    finally:
        loop.run(bare.stop(0))


def test_a_stop_monitor_ends_generate_with_the_guardrail_event(
        watched: tuple[ResaeServer, FakeEngine]) -> None:
    server, fake = watched
    with _client(server) as client:
        done = client.complete(PROMPT, max_tokens=8)
    # "guard" fires on the token at position 6 (the fourth generated: no token after it)
    assert [(t.position, t.text) for t in done.tokens] == [(3, "w6"), (4, "w7"), (5, "w8"),
                                                           (6, "w9")]
    assert done.summary is not None and done.summary.finish_reason == "guardrail"
    assert done.summary.completion_tokens == 4 and done.text == " w6 w7 w8 w9"
    assert done.summary.guardrail == pb.FeatureEvent(position=6, layer=3, feature=7, value=6.0,
                                                     threshold=6.0, monitor="guard")
    assert not fake.aborted and fake.listener is server.watch_hub
    assert _sample(server, "resae_monitor_fired_requests_total", {"monitor": "guard"}) == 1
    # Inspect generates nothing to guard: it reads its prompt without the server's monitors
    with _client(server) as client:
        client.inspect(PROMPT, monitor=pb.MonitorRequest(layers=[3], top_k=1))
    assert _sample(server, "resae_monitor_fired_requests_total", {"monitor": "guard"}) == 1
    inspected = [r for r, names in fake.guards.items() if not names]
    assert len(inspected) == 1


def test_cli_watch_tails_events(watched: tuple[ResaeServer, FakeEngine],
                                capsys: pytest.CaptureFixture[str]) -> None:
    from resae_serve.cli import main

    server, _ = watched
    target = f"127.0.0.1:{server.port}"
    status: list[int] = []
    tail = threading.Thread(target=lambda: status.append(main(
        ["client", "watch", "--target", target, "--monitor", "late", "--count", "2"])))
    tail.start()
    _wait_subscribers(server, 1)
    with _client(server) as client:
        done = client.complete(PROMPT, max_tokens=4)
    tail.join(10)
    lines = capsys.readouterr().out.splitlines()
    assert status == [0] and len(lines) == 2
    assert lines[0].endswith(f"Z  {done.request_id}  late (record)  pos 4 'w7'  layer 1 "
                             "feature 5: 4.00 >= 4.00")
    # --timeout ends a quiet watch normally
    assert main(["client", "watch", "--target", target, "--timeout", "0.3"]) == 0


def test_a_stopping_server_ends_watch_streams_at_once(loop: _Loop, config: ServerConfig
                                                      ) -> None:
    async def factory(_: ServerConfig) -> tuple[FakeEngine, bool]:
        return FakeEngine(), True

    server = _start(loop, _watching(config), factory)
    with _client(server) as client:
        stream = client.watch_events()
        ended: list[list[Any]] = []
        reader = threading.Thread(target=lambda: ended.append(list(stream)))
        reader.start()
        _wait_subscribers(server, 1)
        started = time.monotonic()
        loop.run(server.stop(30))                           # a long grace: not waited for
        reader.join(10)
    assert ended == [[]] and time.monotonic() - started < 10


def test_bad_monitor_config_is_refused_naming_the_monitor(loop: _Loop,
                                                          config: ServerConfig) -> None:
    bad = replace(config, watch=WatchSettings(monitors=(ServerMonitor("wide", 1, 40, 1.0),)))
    with pytest.raises(ServerConfigError, match=r"watch: monitor 'wide': feature=40 .*0\.\.31"):
        loop.run(create_server(bad, manifest=read_manifest(config.dictionary)))


# ----------------------------------------------------------------------------- conditions

def test_conditions_reach_the_engine(served: tuple[ResaeServer, FakeEngine]) -> None:
    server, fake = served
    gate = condition(1, 5, 2.5, sticky=True)
    with _client(server) as client:
        client.complete(PROMPT, max_tokens=1, interventions=[
            clamp(3, 2, 0.0, when=gate), vector(1, [0.5] * D_MODEL, when=condition(1, 4, 1.0)),
            add(3, 1, 1.0)])
    (spec,) = fake.steering.values()
    assert [e.when for e in spec.edits] == [Condition(1, 5, 2.5, sticky=True), None]
    assert spec.vectors[0].when == Condition(1, 4, 1.0)


@pytest.mark.parametrize(("when", "message"), [
    (pb.Condition(layer=3, feature=5, value=1.0), "interventions[1].when.layer=3; a condition "
     "reads a layer at or before the intervention's layer 1 (0..1)"),
    (pb.Condition(layer=1, feature=-1, value=1.0), "interventions[1].when.feature=-1"),
    (pb.Condition(layer=1, feature=5, value=math.inf), "interventions[1].when.value=inf"),
    (pb.Condition(layer=0, feature=5, value=1.0), "layer=0 is not in the dictionary"),  # engine
    (pb.Condition(layer=1, feature=32, value=1.0), "when.feature=32 at layer 1; allowed 0..31"),
])
def test_bad_conditions_are_invalid_argument_naming_the_field(
        served: tuple[ResaeServer, FakeEngine], when: pb.Condition, message: str) -> None:
    server, _ = served
    request = generate_request(PROMPT, interventions=[
        add(3, 1, 1.0), pb.Intervention(layer=1, feature=pb.FeatureEdit(
            feature=2, mode=pb.EDIT_MODE_ADD, value=1.0), when=when)])
    with _client(server) as client:
        code, details = _code(lambda: list(client.stream(request)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, details


def test_conditions_round_trip_through_convert() -> None:
    items = [SteerEdit(3, 2, "clamp", 0.0, "generation", Condition(1, 5, 2.5, True, True)),
             SteerEdit(3, 1, "ablate", 0.0), SteerVector(1, (0.5, -1.0), "prompt",
                                                          Condition(1, 4, -1.0))]
    messages = convert.intervention_messages(items)
    assert messages[0].when == pb.Condition(layer=1, feature=5, value=2.5, sticky=True,
                                            include_out_of_distribution=True)
    assert not messages[1].HasField("when")
    assert convert.interventions(messages, Limits()) == items
    options = json_format.MessageToDict(pb.ResaeOptions(interventions=messages))
    assert options["interventions"][0]["when"]["sticky"] is True       # the HTTP API's JSON
    assert convert.resae_options(options, Limits())[0] == items


# ----------------------------------------------------------------------------- no vLLM

def test_this_module_runs_in_a_fresh_interpreter_without_vllm() -> None:
    if os.environ.get(CHILD_ENV):
        pytest.skip("this is the child run")
    root = Path(__file__).resolve().parents[2]
    chosen = "generate_streams or defaults_and_inspect or engine_death or vllm_was_never"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", chosen,
         str(Path(__file__))],
        cwd=root, env={**os.environ, CHILD_ENV: "1"}, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "4 passed" in result.stdout, result.stdout[-2000:]


def test_vllm_was_never_imported(vllm_before: bool) -> None:
    """Last in the module: what the tests above imported did not pull vLLM in."""
    if vllm_before:
        pytest.skip("vllm was imported by another test module before this one")
    assert "vllm" not in sys.modules
