"""Bearer-token auth, TLS/mTLS and Prometheus metrics against real grpc.aio servers.

Every server binds 127.0.0.1 port 0 and serves the standard health service plus a tiny
``test.Echo`` service (bytes in, bytes out; unary and server-streaming), so the checks run
the real interceptor chain and handshake, with no mocks.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from resae_serve.server.auth import (
    UNAUTHENTICATED_MESSAGE,
    AuthConfigError,
    BearerAuthInterceptor,
    bearer_interceptors,
    bearer_metadata,
    load_tokens,
)
from resae_serve.server.metrics import ServerMetrics
from resae_serve.server.tls import (
    TLSConfigError,
    channel_credentials,
    make_self_signed,
    server_credentials,
)

TOKEN = "tok-" + "a" * 28
OTHER_TOKEN = "tok-" + "b" * 28
UNARY = "/test.Echo/Unary"
STREAM = "/test.Echo/Stream"
COLLECT = "/test.Echo/Collect"
CHAT = "/test.Echo/Chat"
PARSE = "/test.Echo/Parse"
TIMEOUT = 5.0


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for _ in range(3):
        yield request


async def _collect(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    return b"".join([request async for request in requests])


async def _chat(requests: AsyncIterator[bytes],
                context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


async def _parse(request: health_pb2.HealthCheckRequest,
                 context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckRequest:
    return request


async def _iterate(chunks: Sequence[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def _start(interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                 credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(interceptors=list(interceptors))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        "Collect": grpc.stream_unary_rpc_method_handler(_collect),
        "Chat": grpc.stream_stream_rpc_method_handler(_chat),
        "Parse": grpc.unary_unary_rpc_method_handler(
            _parse, request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckRequest.SerializeToString),
    }),))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return server, port


async def _call_all(channel: grpc.aio.Channel,
                    metadata: tuple[tuple[str, str], ...] | None = None,
                    chunks: Sequence[bytes] = (b"h", b"i")) -> list[Any]:
    """Call each of the four method kinds; return the result or the status code of each.

    ``chunks`` are the requests of the client-streaming kinds. Calls the server will refuse
    send none: grpc.aio clients may report INTERNAL instead of the server's status when a
    write races the server ending the call (grpc/grpc#36066); our API has no such RPC.
    """
    outcomes: list[Any] = []
    try:
        outcomes.append(await channel.unary_unary(UNARY)(b"hi", metadata=metadata,
                                                         timeout=TIMEOUT))
    except grpc.aio.AioRpcError as exc:
        outcomes.append(exc.code())
    try:
        call = channel.unary_stream(STREAM)(b"hi", metadata=metadata, timeout=TIMEOUT)
        outcomes.append([chunk async for chunk in call])
    except grpc.aio.AioRpcError as exc:
        outcomes.append(exc.code())
    try:
        outcomes.append(await channel.stream_unary(COLLECT)(_iterate(chunks), metadata=metadata,
                                                            timeout=TIMEOUT))
    except grpc.aio.AioRpcError as exc:
        outcomes.append(exc.code())
    try:
        chat = channel.stream_stream(CHAT)(_iterate(chunks), metadata=metadata, timeout=TIMEOUT)
        outcomes.append([chunk async for chunk in chat])
    except grpc.aio.AioRpcError as exc:
        outcomes.append(exc.code())
    return outcomes


OK = [b"hi", [b"hi", b"hi", b"hi"], b"hi", [b"h", b"i"]]
DENIED = [grpc.StatusCode.UNAUTHENTICATED] * 4
UNAVAILABLE = [grpc.StatusCode.UNAVAILABLE] * 4


# --- bearer tokens -------------------------------------------------------------------------


def test_auth_denies_missing_and_wrong_tokens_on_unary_and_streaming() -> None:
    async def scenario() -> None:
        server, port = await _start([BearerAuthInterceptor([TOKEN, OTHER_TOKEN])])
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                assert await _call_all(channel, chunks=()) == DENIED
                assert await _call_all(channel, bearer_metadata("x" * 32), ()) == DENIED
                assert await _call_all(channel, (("authorization", TOKEN),), ()) == DENIED
                assert await _call_all(channel, bearer_metadata(TOKEN)) == OK
                assert await _call_all(channel, bearer_metadata(OTHER_TOKEN)) == OK
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await channel.unary_unary(UNARY)(b"hi", metadata=bearer_metadata("y" * 20),
                                                     timeout=TIMEOUT)
                assert denied.value.details() == UNAUTHENTICATED_MESSAGE
                # Unknown methods are denied too, so callers cannot probe what exists.
                with pytest.raises(grpc.aio.AioRpcError) as unknown:
                    await channel.unary_unary("/test.Echo/Nope")(b"", timeout=TIMEOUT)
                assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
                # The denying handler keeps the real deserializer: bad bytes fail as before.
                codes = []
                for metadata in (None, bearer_metadata(TOKEN)):
                    with pytest.raises(grpc.aio.AioRpcError) as malformed:
                        await channel.unary_unary(PARSE)(b"\xff\xff", metadata=metadata,
                                                         timeout=TIMEOUT)
                    codes.append(malformed.value.code())
                assert codes[0] == codes[1] != grpc.StatusCode.UNAUTHENTICATED
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_health_is_exempt_and_client_interceptor_sends_token() -> None:
    async def scenario() -> None:
        server, port = await _start([BearerAuthInterceptor([TOKEN])])
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            async with grpc.aio.insecure_channel(
                    f"127.0.0.1:{port}", interceptors=bearer_interceptors(TOKEN)) as channel:
                assert await _call_all(channel) == OK
                # The interceptor replaces a wrong token the caller put in by hand.
                assert await _call_all(channel, bearer_metadata(OTHER_TOKEN)) == OK
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_load_tokens_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# service tokens\n\n{TOKEN}\n  {OTHER_TOKEN}  \n{TOKEN}\n")
    monkeypatch.delenv("RESAE_AUTH_TOKENS", raising=False)
    assert load_tokens() == ()
    assert load_tokens(token_file) == (TOKEN, OTHER_TOKEN)
    env_token = "env-" + "c" * 20
    monkeypatch.setenv("RESAE_AUTH_TOKENS", f" {env_token}, ,{TOKEN}")
    assert load_tokens() == (env_token, TOKEN)
    assert load_tokens(token_file) == (TOKEN, OTHER_TOKEN, env_token)
    monkeypatch.setenv("MY_TOKENS", env_token)
    assert load_tokens(env_var="MY_TOKENS") == (env_token,)


def test_load_tokens_errors_name_the_source_not_the_token(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RESAE_AUTH_TOKENS", raising=False)
    missing = tmp_path / "nope"
    with pytest.raises(AuthConfigError, match=f"auth_token_file={missing}: no such file"):
        load_tokens(missing)
    empty = tmp_path / "empty"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(AuthConfigError, match="contains no tokens"):
        load_tokens(empty)
    with pytest.raises(AuthConfigError, match="cannot be read"):
        load_tokens(tmp_path)  # a folder

    short = "shortsecret1"
    weak = tmp_path / "weak"
    weak.write_text(f"{TOKEN}\n# comment\n{short}\n")
    with pytest.raises(AuthConfigError, match="line 3: token has 12 characters") as raised:
        load_tokens(weak)
    assert short not in str(raised.value)
    monkeypatch.setenv("RESAE_AUTH_TOKENS", f"{TOKEN},{short}")
    with pytest.raises(AuthConfigError, match="RESAE_AUTH_TOKENS entry 2") as raised:
        load_tokens()
    assert short not in str(raised.value)
    with pytest.raises(AuthConfigError, match="token 1: token has 12"):
        BearerAuthInterceptor([short])
    with pytest.raises(AuthConfigError, match="no token is configured"):
        BearerAuthInterceptor([])
    with pytest.raises(AuthConfigError, match="whitespace"):
        BearerAuthInterceptor(["has a space in it, long enough"])


# --- TLS -----------------------------------------------------------------------------------


def test_tls_accepts_trusting_client_and_refuses_plaintext(tmp_path: Path) -> None:
    certs = make_self_signed(tmp_path)
    assert set(certs) == {"ca", "server_cert", "server_key", "client_cert", "client_key"}
    assert certs["server_key"].stat().st_mode & 0o077 == 0

    async def scenario() -> None:
        server, port = await _start(
            [BearerAuthInterceptor([TOKEN])],
            server_credentials(certs["server_cert"], certs["server_key"]))
        try:
            creds = channel_credentials(certs["ca"])
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
                assert await _call_all(channel, bearer_metadata(TOKEN)) == OK
                assert await _call_all(channel, chunks=()) == DENIED
            async with grpc.aio.secure_channel(
                    f"localhost:{port}", creds,
                    options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
                assert await _call_all(channel, bearer_metadata(TOKEN)) == OK
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                assert await _call_all(channel, bearer_metadata(TOKEN)) == UNAVAILABLE
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_mutual_tls_requires_client_certificate(tmp_path: Path) -> None:
    certs = make_self_signed(tmp_path)

    async def scenario() -> None:
        server, port = await _start(credentials=server_credentials(
            certs["server_cert"], certs["server_key"], client_ca_file=certs["ca"]))
        try:
            target = f"127.0.0.1:{port}"
            async with grpc.aio.secure_channel(target, channel_credentials(certs["ca"])) as ch:
                assert await _call_all(ch) == UNAVAILABLE
            mtls = channel_credentials(certs["ca"], certs["client_cert"], certs["client_key"])
            async with grpc.aio.secure_channel(target, mtls) as ch:
                assert await _call_all(ch) == OK
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_tls_file_errors_name_the_field(tmp_path: Path) -> None:
    certs = make_self_signed(tmp_path / "certs")
    missing = tmp_path / "missing.pem"
    with pytest.raises(TLSConfigError, match=f"tls_cert_file={missing}: no such file"):
        server_credentials(missing, certs["server_key"])
    with pytest.raises(TLSConfigError, match=f"tls_key_file={missing}: no such file"):
        server_credentials(certs["server_cert"], missing)
    with pytest.raises(TLSConfigError, match=f"tls_client_ca_file={missing}: no such file"):
        server_credentials(certs["server_cert"], certs["server_key"], missing)
    with pytest.raises(TLSConfigError, match=f"tls_ca_file={missing}: no such file"):
        channel_credentials(missing)
    der = tmp_path / "cert.der"
    der.write_bytes(b"\x30\x82\x01\x0a")
    with pytest.raises(TLSConfigError, match=r"tls_cert_file=.*not a PEM file"):
        server_credentials(der, certs["server_key"])
    with pytest.raises(TLSConfigError, match=r"tls_cert_file=.*no '-----BEGIN CERTIFICATE"):
        server_credentials(certs["server_key"], certs["server_cert"])  # swapped
    with pytest.raises(TLSConfigError, match=r"tls_key_file=.*no private key block"):
        server_credentials(certs["server_cert"], certs["server_cert"])
    with pytest.raises(TLSConfigError, match=r"tls_cert_file is set but tls_key_file is not"):
        channel_credentials(certs["ca"], cert_file=certs["client_cert"])


# --- metrics -------------------------------------------------------------------------------


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as reply:
        text = reply.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_served_per_instance_without_clashing() -> None:
    first, second = ServerMetrics(), ServerMetrics()
    first_port, second_port = first.start_http("127.0.0.1", 0), second.start_http("127.0.0.1", 0)
    try:
        assert first_port != second_port and 0 not in (first_port, second_port)
        first.record_request("Generate", grpc.StatusCode.OK)
        first.record_request("Generate", grpc.StatusCode.OK)
        first.record_request("Generate", grpc.StatusCode.INVALID_ARGUMENT)
        first.add_tokens(30)
        first.track_configs(lambda: 2)
        first.engine_up.set(1)
        first.monitor_lag.observe(3)
        first.observe_first_token(0.2)
        first.record_request("/v1/completions", "200", protocol="http")
        first.add_tokens(5, protocol="http")
        with first.stream(), first.stream("http"):
            scraped = _scrape(first_port)
        second.record_request("Encode", grpc.StatusCode.UNAUTHENTICATED)

        grpc_, http = (("protocol", "grpc"),), (("protocol", "http"),)
        ok = ("resae_requests_total", (("code", "OK"), ("protocol", "grpc"), ("rpc", "Generate")))
        invalid = ("resae_requests_total",
                   (("code", "INVALID_ARGUMENT"), ("protocol", "grpc"), ("rpc", "Generate")))
        http_ok = ("resae_requests_total",
                   (("code", "200"), ("protocol", "http"), ("rpc", "/v1/completions")))
        assert scraped[ok] == 2 and scraped[invalid] == 1 and scraped[http_ok] == 1
        assert scraped[("resae_generated_tokens_total", grpc_)] == 30
        assert scraped[("resae_generated_tokens_total", http)] == 5
        assert scraped[("resae_generated_tokens_per_second", ())] == pytest.approx(3.5)
        assert scraped[("resae_steering_configs_in_use", ())] == 2
        assert scraped[("resae_engine_up", ())] == 1
        assert scraped[("resae_active_streams", grpc_)] == 1
        assert scraped[("resae_active_streams", http)] == 1
        assert scraped[("resae_monitor_lag_tokens_bucket", (("le", "2.0"),))] == 0
        assert scraped[("resae_monitor_lag_tokens_bucket", (("le", "4.0"),))] == 1
        assert scraped[("resae_time_to_first_token_seconds_count", grpc_)] == 1
        assert scraped[("resae_time_to_first_token_seconds_count", http)] == 0

        other = _scrape(second_port)
        assert other[("resae_requests_total", (("code", "UNAUTHENTICATED"), ("protocol", "grpc"),
                                               ("rpc", "Encode")))]
        assert ok not in other and other[("resae_generated_tokens_total", grpc_)] == 0
        assert _scrape(first_port)[("resae_active_streams", grpc_)] == 0
        assert (b'resae_requests_total{code="OK",protocol="grpc",rpc="Generate"} 2.0'
                in first.render())
    finally:
        first.stop_http()
        second.stop_http()
    first.stop_http()  # idempotent


def test_token_rate_is_a_sliding_window(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("resae_serve.server.metrics.time.monotonic", lambda: clock[0])
    metrics = ServerMetrics(window_s=10.0)

    def rate() -> float | None:
        return metrics.registry.get_sample_value("resae_generated_tokens_per_second")

    metrics.add_tokens(50)
    clock[0] += 6
    metrics.add_tokens(20)
    assert rate() == pytest.approx(7.0)
    clock[0] += 5  # the first 50 leave the window
    assert rate() == pytest.approx(2.0)
    clock[0] += 10
    assert rate() == 0
