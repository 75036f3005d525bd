"""The OpenAI-compatible HTTP front end without vLLM: :class:`HttpFrontend` driven through
``httpx.ASGITransport`` (and the real ``openai`` client over it), a fake engine whose
"vLLM app" is a stub emitting OpenAI JSON or SSE and filling ``HttpRequest.pending`` the way
:class:`~resae_serve.engine.http.SteeringEngineClient` does; then the proxy itself over the
fake driver of ``test_engine_serving`` (that part needs vLLM's exception types only).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from resae_serve.engine.http import HttpRequest
from resae_serve.engine.rpc import EngineInfo, MonitorEvent
from resae_serve.engine.serving import Intervention, TokenFeatures, steering_spec
from resae_serve.engine.spec import MonitorSpec, SteeringSpec
from resae_serve.server import convert
from resae_serve.server.auth import BearerAuthInterceptor
from resae_serve.server.config import Limits, ServerConfig
from resae_serve.server.http import HttpFrontend
from resae_serve.server.metrics import ServerMetrics
from resae_serve.server.service import ResaeService
from resae_serve.server.v1 import resae_pb2 as pb

TOKEN = "t" * 24
LIMITS = Limits(max_tokens=32, default_max_tokens=4, max_prompt_tokens=64, max_edits=4,
                max_pending=2)
ADD = {"layer": 1, "feature": {"feature": 3, "mode": "EDIT_MODE_ADD", "value": 2.0}}


class StubApp:
    """Stands in for vLLM's app: ``steps`` tokens per choice, one SSE chunk each, features
    of the fed positions (prompt of 2 tokens, as in ``SteeringEngineClient``) before each."""

    def __init__(self, steps: int = 3, split: bool = False) -> None:
        self.steps, self.split = steps, split
        self.bodies: list[dict[str, Any]] = []
        self.requests: list[HttpRequest] = []

    async def __call__(self, scope: Any, receive: Any, send: Any, request: HttpRequest) -> None:
        if scope["method"] == "GET":
            await _json(send, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})
            return
        message = await receive()
        body = json.loads(message["body"])
        self.bodies.append(body)
        self.requests.append(request)
        chat = scope["path"].endswith("chat/completions")
        choices = len(body["prompt"]) if isinstance(body.get("prompt"), list) else 1
        if body.get("stream"):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
            await send({"type": "http.response.body", "body": b": keep-alive\n\n",
                        "more_body": True})
            for step in range(self.steps):
                for index in range(choices):
                    self._features(request, index, step)
                    choice = ({"index": index, "delta": {"content": "x"}} if chat
                              else {"index": index, "text": "x"})
                    event = b"data: " + json.dumps({"id": "c1", "object": "chunk",
                                                    "choices": [choice]}).encode() + b"\n\n"
                    parts = [event[:7], event[7:]] if self.split else [event]
                    for part in parts:
                        await send({"type": "http.response.body", "body": part,
                                    "more_body": True})
            for index in range(choices):          # features after a choice's last chunk
                self._features(request, index, self.steps)
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                        "more_body": False})
            return
        for step in range(self.steps + 1):
            for index in range(choices):
                self._features(request, index, step)
        await _json(send, {"id": "c1", "object": "text_completion",
                           "choices": [{"index": i, "text": "xxx"} for i in range(choices)]})

    @staticmethod
    def _features(request: HttpRequest, index: int, step: int) -> None:
        if step < 3:
            request.count(1)
        if not request.monitoring:
            return
        assert request.monitor is not None
        positions = [0, 1] if step == 0 else [1 + step]
        features = [TokenFeatures(p, layer, (index,), (float(p),), ())
                    for p in positions for layer in request.monitor.layers]
        events = [MonitorEvent(p, 1, 0, 1.0, 0.5) for p in positions if p == 1]
        request.pending.setdefault(index, []).append((features, events))


async def _json(send: Any, data: dict[str, Any], status: int = 200) -> None:
    body = json.dumps(data).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class FakeEngine:
    """The engine side the front end uses: spec validation and the OpenAI app."""

    def __init__(self, app: StubApp) -> None:
        self.info = EngineInfo((1, 3), (32, 32), 8, 4)
        self.app = app
        self.resident_configs = 0

    def spec(self, interventions: Sequence[Intervention] = (),
             monitor: MonitorSpec | None = None, key: str = "") -> SteeringSpec:
        return steering_spec(self.info, interventions, monitor, key)

    async def openai_app(self, served_model_name: str) -> StubApp:
        return self.app


def _frontend(app: StubApp | None = None, *, auth: bool = False, attach: bool = True,
              **config: Any) -> tuple[HttpFrontend, FakeEngine]:
    cfg = ServerConfig(dictionary=Path("unused"), limits=LIMITS, http_port=0,
                       max_message_bytes=4096, **config)
    metrics = ServerMetrics()
    service = ResaeService(cfg, None, None, 0, metrics, None)  # type: ignore[arg-type]
    frontend = HttpFrontend(cfg, service, metrics,
                            BearerAuthInterceptor([TOKEN]) if auth else None)
    engine = FakeEngine(app or StubApp())
    if attach:
        service.attach(engine)  # type: ignore[arg-type]
        asyncio.run(frontend.attach(engine))
    return frontend, engine


def _post(frontend: HttpFrontend, body: Any, path: str = "/v1/completions",
          headers: dict[str, str] | None = None, raw: bytes | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=frontend)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            if raw is not None:
                return await client.post(path, content=raw, headers=headers)
            return await client.post(path, json=body, headers=headers)
    return asyncio.run(go())


def _get(frontend: HttpFrontend, path: str, headers: dict[str, str] | None = None
         ) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=frontend)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path, headers=headers)
    return asyncio.run(go())


def _error(reply: httpx.Response) -> str:
    body = reply.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == reply.status_code
    return str(body["error"]["message"])


def _sse(reply: httpx.Response) -> list[Any]:
    events = [e for e in reply.text.split("\n\n") if e]
    return [e if not e.startswith("data: ") or e == "data: [DONE]" else json.loads(e[6:])
            for e in events]


# ----------------------------------------------------------------------------- parsing

def test_resae_field_reaches_the_engine_in_snake_and_camel_case() -> None:
    frontend, _ = _frontend()
    app = frontend.app
    for monitor in ({"layers": [1], "top_k": 2, "watch": [5]},
                    {"layers": [1], "topK": 2, "watch": [5]}):
        reply = _post(frontend, {"model": "tiny", "prompt": "hi",
                                 "resae": {"interventions": [ADD], "monitor": monitor}})
        assert reply.status_code == 200, reply.text
        request = app.requests[-1]
        assert request.monitor == MonitorSpec((1,), 2, (5,))
        assert [(e.layer, e.feature, e.mode, e.value, e.phase)
                for e in request.interventions] == [(1, 3, "add", 2.0, "all")]
        assert request.max_prompt_tokens == LIMITS.max_prompt_tokens
        assert "resae" not in app.bodies[-1]                  # vLLM never sees it
        assert app.bodies[-1]["max_tokens"] == LIMITS.default_max_tokens


def _grpc_message(options: dict[str, Any]) -> str:
    """What the gRPC path answers for the same interventions and monitor."""
    from google.protobuf import json_format

    from resae_serve.interventions import InterventionError

    request = json_format.ParseDict(options, pb.GenerateRequest())
    try:
        edits = convert.interventions(request.interventions, LIMITS)
        monitor = (convert.monitor_spec(request.monitor, LIMITS)
                   if request.HasField("monitor") else None)
        steering_spec(EngineInfo((1, 3), (32, 32), 8, 4), edits, monitor)
    except (convert.RequestError, InterventionError) as exc:
        return str(exc)
    raise AssertionError(f"{options} is valid")


@pytest.mark.parametrize("options", [
    {"interventions": [{"layer": 1, "feature": {"feature": 3, "mode": "EDIT_MODE_ADD",
                                                "value": "NaN"}}]},
    {"interventions": [{"layer": 2, "feature": {"feature": 3, "mode": "EDIT_MODE_ADD",
                                                "value": 1}}]},
    {"interventions": [{"layer": 1, "feature": {"feature": 99, "mode": "EDIT_MODE_CLAMP",
                                                "value": 1}}]},
    {"interventions": [{"layer": 1, "feature": {"feature": 3, "value": 1}}]},
    {"interventions": [{"layer": 1, "vector": {"values": [1.0, 2.0]}}]},
    {"interventions": [{"layer": 1}]},
    {"interventions": [ADD] * 5},
    {"monitor": {"layers": [1, 1], "top_k": 1}},
    {"monitor": {"layers": [1], "top_k": 99}},
    {"monitor": {"layers": [1]}},
    {"monitor": {"layers": [2], "top_k": 1}},
])
def test_bad_steering_is_400_with_the_grpc_message(options: dict[str, Any]) -> None:
    frontend, _ = _frontend()
    reply = _post(frontend, {"model": "tiny", "prompt": "hi", "resae": options})
    assert reply.status_code == 400
    assert _error(reply) == _grpc_message(options)
    assert reply.json()["error"]["param"] == "resae"
    assert frontend.app.requests == []


def test_malformed_resae_names_the_field_and_what_is_allowed() -> None:
    frontend, _ = _frontend()
    cases = {
        "x": "resae=a string; must be an object with the fields interventions and monitor",
        json.dumps({"monitor": {"layer": [1]}}): 'no field named "layer"',
        json.dumps({"bogus": 1}): "['interventions', 'monitor']",
        json.dumps({"interventions": [{"layer": 1, "feature": {"mode": "ADD"}}]}):
            "Invalid enum value ADD for enum type resae.v1.EditMode",
    }
    for raw, expected in cases.items():
        options = raw if raw == "x" else json.loads(raw)
        reply = _post(frontend, {"model": "tiny", "prompt": "hi", "resae": options})
        assert reply.status_code == 400 and expected in _error(reply), reply.text
    reply = _post(frontend, {"model": "tiny", "prompt": "hi", "resae": {
        "interventions": [{"layer": 1, "feature": {"mode": "ADD"}}]}})
    assert "Allowed: EDIT_MODE_UNSPECIFIED, EDIT_MODE_ADD, EDIT_MODE_CLAMP" in _error(reply)


def test_refusals_before_the_engine() -> None:
    frontend, _ = _frontend()
    monitored = {"monitor": {"layers": [1], "top_k": 1}}
    cases = [
        ({"prompt": "hi", "vllm_xargs": {"resae": "x"}}, "vllm_xargs.resae is reserved"),
        ({"prompt": "hi", "n": 2, "resae": monitored}, "n=2 with resae.monitor"),
        ({"prompt": "hi", "use_beam_search": True, "resae": {"interventions": [ADD]}},
         "use_beam_search=true with resae"),
        ({"prompt": "hi", "max_tokens": 33}, "max_tokens=33; allowed 1..32"),
        ({"messages": [], "max_completion_tokens": 0}, "max_completion_tokens=0; allowed"),
        ({"prompt": "hi", "stop": ["a"] * 17}, "stop has 17 strings; at most 16"),
    ]
    for body, expected in cases:
        reply = _post(frontend, {"model": "tiny", **body})
        assert reply.status_code == 400 and expected in _error(reply), reply.text
    reply = _post(frontend, None, raw=b"{not json")
    assert reply.status_code == 400 and "not valid JSON" in _error(reply)
    reply = _post(frontend, None, raw=b"[1, 2]")
    assert reply.status_code == 400 and "an array; it must be a JSON object" in _error(reply)
    reply = _post(frontend, None, raw=b"x" * 5000)
    assert reply.status_code == 413 and "4096 bytes (max_message_bytes)" in _error(reply)
    reply = _post(frontend, {"prompt": "hi"}, path="/v1/responses")
    assert reply.status_code == 404 and "POST /v1/completions" in _error(reply)
    assert _get(frontend, "/metrics").status_code == 404
    assert frontend.app.requests == []


def test_admission_is_shared_with_grpc_and_answers_429() -> None:
    frontend, _ = _frontend()
    frontend.service.pending = LIMITS.max_pending         # gRPC calls hold every slot
    reply = _post(frontend, {"prompt": "hi"})
    assert reply.status_code == 429 and reply.headers["retry-after"] == "1"
    assert "the limit is 2 (max_pending)" in _error(reply)
    frontend.service.pending = 0
    assert _post(frontend, {"prompt": "hi"}).status_code == 200
    assert frontend.service.pending == 0 and frontend.active == 0


def test_503_while_loading_failed_or_draining() -> None:
    frontend, engine = _frontend(attach=False)
    reply = _post(frontend, {"prompt": "hi"})
    assert reply.status_code == 503 and "still loading" in _error(reply)
    assert _get(frontend, "/health").status_code == 503
    frontend.service.attach(engine)  # type: ignore[arg-type]
    asyncio.run(frontend.attach(engine))
    assert _get(frontend, "/health").status_code == 200
    frontend.service.fail("engine died")
    frontend.fail("engine died")
    reply = _post(frontend, {"prompt": "hi"})
    assert reply.status_code == 503 and "engine died" in _error(reply)
    frontend.service.attach(engine)  # type: ignore[arg-type]
    asyncio.run(frontend.attach(engine))
    frontend.drain()
    reply = _post(frontend, {"prompt": "hi"})
    assert reply.status_code == 503 and "shutting down" in _error(reply)
    assert _get(frontend, "/health").status_code == 503


def test_engine_without_an_openai_app_is_503() -> None:
    frontend, engine = _frontend(attach=False)
    frontend.service.attach(engine)  # type: ignore[arg-type]
    asyncio.run(frontend.attach(SimpleNamespace()))
    assert "no OpenAI-compatible app" in _error(_get(frontend, "/v1/models"))


def test_bearer_token() -> None:
    frontend, _ = _frontend(auth=True)
    for headers in (None, {"Authorization": "Bearer " + "u" * 24}, {"Authorization": TOKEN}):
        reply = _post(frontend, {"prompt": "hi"}, headers=headers)
        assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
        assert TOKEN not in reply.text and "u" * 24 not in reply.text
    assert _get(frontend, "/health").status_code == 200               # exempt
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert _post(frontend, {"prompt": "hi"}, headers=good).status_code == 200
    assert _get(frontend, "/v1/models", headers=good).json()["data"][0]["id"] == "tiny"


# ----------------------------------------------------------------------------- features

MONITOR = {"monitor": {"layers": [1, 3], "top_k": 1, "thresholds": [
    {"layer": 1, "feature": 0, "value": 0.5}]}}


def test_json_response_carries_features_per_choice() -> None:
    frontend, _ = _frontend()
    reply = _post(frontend, {"prompt": ["a", "b"], "resae": MONITOR})
    assert reply.status_code == 200
    assert int(reply.headers["content-length"]) == len(reply.content)
    for index, choice in enumerate(reply.json()["choices"]):
        features = choice["resae"]["features"]
        assert [(f["position"], f["layer"]) for f in features] == [
            (p, layer) for p in range(5) for layer in (1, 3)]
        assert all(f["top"] == [{"feature": index, "value": float(f["position"])}]
                   for f in features)
        assert choice["resae"]["events"] == [{"position": 1, "layer": 1, "feature": 0,
                                              "value": 1.0, "threshold": 0.5, "monitor": ""}]
    plain = _post(frontend, {"prompt": "a"})
    assert "resae" not in plain.json()["choices"][0]                 # not monitored


@pytest.mark.parametrize("split", [False, True])
def test_stream_carries_each_chunks_features_in_order(split: bool) -> None:
    frontend, _ = _frontend(StubApp(split=split))
    reply = _post(frontend, {"prompt": ["a", "b"], "stream": True, "resae": MONITOR})
    events = _sse(reply)
    assert events[0] == ": keep-alive" and events[-1] == "data: [DONE]"
    chunks = events[1:-1]
    assert len(chunks) == 2 * 3 + 2                    # + one leftover chunk per choice
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        positions = [[f["position"] for f in c["resae"]["features"]] for c in mine]
        assert positions == [[0, 0, 1, 1], [2, 2], [3, 3], [4, 4]]
        assert mine[-1]["text"] == "" and mine[-1]["finish_reason"] is None
        assert [len(c["resae"]["events"]) for c in mine] == [1, 0, 0, 0]


def test_chat_stream_leftovers_are_chat_chunks() -> None:
    frontend, _ = _frontend()
    reply = _post(frontend, {"messages": [{"role": "user", "content": "hi"}], "stream": True,
                             "resae": MONITOR}, path="/v1/chat/completions")
    chunks = _sse(reply)[1:-1]
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert [f["position"] for c in chunks for f in c["choices"][0]["resae"]["features"]] == [
        p for p in range(5) for _ in (1, 3)]


def test_metrics_count_http_calls() -> None:
    frontend, _ = _frontend()
    _post(frontend, {"prompt": "a", "resae": MONITOR})
    _post(frontend, {"prompt": "a", "max_tokens": 99})
    _get(frontend, "/nowhere")
    value = frontend.metrics.registry.get_sample_value

    def calls(rpc: str, code: str) -> float | None:
        return value("resae_requests_total", {"rpc": rpc, "code": code, "protocol": "http"})
    assert calls("/v1/completions", "200") == 1 and calls("/v1/completions", "400") == 1
    assert calls("other", "404") == 1
    assert value("resae_generated_tokens_total", {"protocol": "http"}) == 3
    assert value("resae_generated_tokens_total", {"protocol": "grpc"}) == 0
    assert value("resae_time_to_first_token_seconds_count", {"protocol": "http"}) == 1
    assert value("resae_active_streams", {"protocol": "http"}) == 0


def test_the_openai_client_reads_features_and_errors() -> None:
    openai = pytest.importorskip("openai")
    frontend, _ = _frontend(auth=True)

    async def go() -> None:
        transport = httpx.ASGITransport(app=frontend)
        async with httpx.AsyncClient(transport=transport) as http:
            client = openai.AsyncOpenAI(base_url="http://test/v1", api_key=TOKEN,
                                        http_client=http, max_retries=0)
            done = await client.completions.create(model="tiny", prompt="hi",
                                                   extra_body={"resae": MONITOR})
            assert len(done.choices[0].model_extra["resae"]["features"]) == 10
            stream = await client.completions.create(model="tiny", prompt="hi", stream=True,
                                                     extra_body={"resae": MONITOR})
            seen = [f["position"] async for chunk in stream
                    for f in chunk.choices[0].model_extra["resae"]["features"]]
            assert seen == [p for p in range(5) for _ in (1, 3)]
            with pytest.raises(openai.BadRequestError) as bad:
                await client.completions.create(model="tiny", prompt="hi", extra_body={
                    "resae": {"monitor": {"layers": [2], "top_k": 1}}})
            assert "monitor.layers" in str(bad.value) or "layer" in str(bad.value)
            wrong = openai.AsyncOpenAI(base_url="http://test/v1", api_key="w" * 24,
                                       http_client=http, max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                await wrong.models.list()
    asyncio.run(go())


# ----------------------------------------------------------------------------- drain

class SlowApp(StubApp):
    """Streams one chunk every ``delay`` seconds, ``steps`` chunks (forever with None)."""

    def __init__(self, steps: int | None, delay: float = 0.05) -> None:
        super().__init__()
        self.n, self.delay = steps, delay
        self.cancelled = False

    async def __call__(self, scope: Any, receive: Any, send: Any, request: HttpRequest) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        step = 0
        try:
            while self.n is None or step < self.n:
                await send({"type": "http.response.body", "more_body": True,
                            "body": b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n'})
                step += 1
                await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def _serve_and_stop(app: SlowApp, grace: float) -> tuple[list[str], HttpFrontend, bool]:
    """Start a stream over real loopback, stop the front end after its first chunk; the
    events the client read, and whether a new connection was refused after the stop."""
    frontend, _ = _frontend(app)

    async def go() -> tuple[list[str], bool]:
        port = frontend.bind("127.0.0.1", 0)
        await frontend.start()
        events: list[str] = []
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            async def read() -> None:
                try:
                    async with client.stream("POST", "/v1/completions",
                                             json={"prompt": "hi", "stream": True}) as reply:
                        async for line in reply.aiter_lines():
                            if line:
                                events.append(line)
                            if len(events) == 1:
                                stopping.set()
                except httpx.HTTPError:
                    events.append("<cut>")

            stopping = asyncio.Event()
            reader = asyncio.create_task(read())
            await stopping.wait()
            await frontend.stop(grace)
            await reader
            try:
                await client.get("/health")
                refused = False
            except httpx.ConnectError:
                refused = True
        return events, refused
    events, refused = asyncio.run(go())
    return events, frontend, refused


def test_stop_lets_a_stream_finish_within_grace() -> None:
    app = SlowApp(steps=10)
    events, frontend, refused = _serve_and_stop(app, grace=10.0)
    assert len(events) == 11 and events[-1] == "data: [DONE]"
    assert refused and frontend.active == 0 and frontend.service.pending == 0


def test_stop_cancels_a_stream_past_grace() -> None:
    app = SlowApp(steps=None)
    events, frontend, refused = _serve_and_stop(app, grace=0.3)
    assert app.cancelled and "data: [DONE]" not in events
    assert refused and frontend.active == 0 and frontend.service.pending == 0


# ----------------------------------------------------------------------------- the server

def test_server_serves_http_beside_grpc_and_rebuilds_the_app_with_the_engine(
        tmp_path: Path, tiny_tokenizer: Any) -> None:
    """``create_server`` with ``http_port``: health follows the engine, a new vLLM app is
    built over every new engine (the old one lets go of the dead engine), stop closes the
    port. The gRPC side is the fake engine of ``test_service_fake_engine``."""
    from dataclasses import replace

    from transformers import LlamaConfig

    from resae_serve.artifact import read_manifest, save_artifact
    from resae_serve.server.app import create_server
    from resae_serve.server.config import EngineSettings
    from tests.unit.resae_fixtures import D_MODEL, IDENTITY, tiny_resae
    from tests.unit.test_service_fake_engine import FakeEngine as GrpcFake
    from tests.unit.test_service_fake_engine import _Loop

    class Fake(GrpcFake):
        async def openai_app(self, served_model_name: str) -> Any:
            apps.append(Closable())
            return apps[-1]

    class Closable(StubApp):
        closed = False

        def close(self) -> None:
            self.closed = True

    apps: list[Closable] = []
    engines: list[Fake] = []
    gate = threading.Event()

    async def factory(_: ServerConfig) -> tuple[Fake, bool]:
        if engines:                             # a rebuild: wait until the test has looked
            await asyncio.to_thread(gate.wait, 30)
        engines.append(Fake())
        return engines[-1], True

    model = tmp_path / "model"
    LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=D_MODEL, intermediate_size=16,
                num_hidden_layers=4, num_attention_heads=2).save_pretrained(model)
    tiny_tokenizer.save_pretrained(model)
    dictionary = save_artifact(tiny_resae(), tmp_path / "dict", IDENTITY)
    config = ServerConfig(dictionary=dictionary, model=str(model), port=0, metrics_port=None,
                          http_port=0, limits=LIMITS, engine=EngineSettings(max_model_len=64),
                          grace_s=1.0)
    loop = _Loop()

    def health(port: int) -> int:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code
        except httpx.ConnectError:
            return -1

    def wait_for(port: int, status: int) -> None:
        for _ in range(200):
            if health(port) == status:
                return
            loop.run(asyncio.sleep(0.05))
        raise AssertionError(f"/health never answered {status}")

    async def start() -> Any:
        server, _ = await create_server(replace(config, restart_backoff_s=0.0),
                                        engine_factory=factory,
                                        manifest=read_manifest(dictionary))
        await server.start()
        assert await server.wait_ready(30)
        return server

    try:
        server = loop.run(start())
        port = server.http_port
        assert port and port != server.port and health(port) == 200
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
        assert models.json()["data"][0]["id"] == "tiny"
        assert server.held()["http_streams"] == 0
        engines[0].errored = True                         # the watchdog notices
        wait_for(port, 503)
        assert apps[0].closed and server.http.app is None
        down = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "x"})
        assert down.status_code == 503 and "restarting, attempt 1 of 5" in _error(down)
        gate.set()
        wait_for(port, 200)                               # rebuilt, with a new app
        assert len(engines) == 2 and len(apps) == 2 and server.http.app is apps[1]
        loop.run(server.stop(0))
        assert health(port) == -1 and apps[1].closed
    finally:
        gate.set()
        loop.close()


def test_accepted_connections_have_nagle_off() -> None:
    """Nagle's algorithm off on every accepted connection (asyncio sets TCP_NODELAY only on
    sockets whose proto is TCP): with it on, a response's first small write after its headers
    waited for the client's delayed ACK (+20 ms to the first token on a reused connection)."""
    import socket

    frontend, _ = _frontend(StubApp())

    async def go() -> list[int]:
        port = frontend.bind("127.0.0.1", 0)
        await frontend.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                assert (await client.get("/health")).status_code == 200
                connections = frontend._server.server_state.connections
                return [c.transport.get_extra_info("socket").getsockopt(
                    socket.IPPROTO_TCP, socket.TCP_NODELAY) for c in connections]
        finally:
            await frontend.stop(1.0)

    flags = asyncio.run(go())
    assert flags and all(flags), flags
