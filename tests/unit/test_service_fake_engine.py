"""The gRPC servicer against a fake engine, without vLLM: a real server on loopback (built by
``create_server`` with the fake injected through ``engine_factory``), the real client library,
a tiny tokenizer and a tiny dictionary (layers 1 and 3, d_model 8, 32 latents).

:class:`FakeEngine` implements :class:`~resae_serve.engine.serving.ServingEngine` the way
:class:`~resae_serve.engine.serving.ResaeEngine` behaves: it validates specs against the
dictionary, streams one token per chunk with the features of every fed position, raises the
engine's own errors, and records what the server asked of it. The last tests run Generate,
Inspect and an engine death again in a fresh interpreter and check that vLLM was never imported
(in a full run another module may have imported it first).
"""

from __future__ import annotations

import asyncio
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
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import LlamaConfig, PreTrainedTokenizerFast

from resae_serve.artifact import read_manifest, save_artifact
from resae_serve.engine.rpc import EngineInfo, FeatureRuntimeInfo, MonitorEvent
from resae_serve.engine.serving import (
    GenerationChunk,
    Intervention,
    TokenFeatures,
    steering_spec,
)
from resae_serve.engine.spec import MonitorSpec, SamplingSpec, SteeringSpec
from resae_serve.errors import EngineDeadError, EngineRequestError
from resae_serve.server.app import ResaeServer, create_server
from resae_serve.server.client import ResaeClient, add, monitor
from resae_serve.server.config import EngineSettings, Limits, ServerConfig
from resae_serve.server.v1 import resae_pb2 as pb
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
                       request_id: str | None = None) -> AsyncGenerator[GenerationChunk, None]:
        request_id = request_id or f"fake-{len(self.sampling)}"
        spec = self.spec(interventions, monitor, key=request_id)
        if self.errored:
            raise EngineDeadError("the engine stopped")
        if self.refuse is not None:
            raise EngineRequestError(self.refuse)
        ids = list(prompt)                                   # the server sends token ids
        self.sampling[request_id], self.steering[request_id] = sampling, spec
        self.prompts[request_id] = ids
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
                finished = n == sampling.max_tokens - 1
                token = FIRST_TOKEN + n
                yield GenerationChunk(request_id, (token,), f" w{token - 4}", features, events,
                                      finished, "length" if finished else None)
        finally:
            self.live.discard(request_id)
            if not finished:
                self.aborted.append(request_id)


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
