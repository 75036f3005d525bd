"""The OpenAI-compatible HTTP API: vLLM's own app on the gRPC server's engine, behind the
same rules as gRPC.

:class:`HttpFrontend` is an ASGI application run by uvicorn on the server's event loop. It

1. answers ``GET /health`` itself (200 while the engine serves, else 503; no token needed),
2. checks the bearer token (the gRPC server's tokens; 401 in OpenAI's error shape),
3. lets through only ``POST /v1/completions``, ``POST /v1/chat/completions`` and
   ``GET /v1/models`` (404 otherwise: vLLM's app has many more routes),
4. reads the body (``max_message_bytes``, 413), takes out the ``resae`` field, the protobuf
   JSON mapping of ``ResaeOptions`` (``interventions`` and ``monitor``, checked by the same
   code and with the same messages as gRPC; 400), enforces the request limits (400), admits
   the call against the same ``max_pending`` as gRPC calls (429), and
5. hands the request to vLLM's app (:class:`~resae_serve.engine.http.OpenAIApp`, which
   steers and monitors it in the engine), then writes the monitored features into the
   response: a ``resae`` object (:func:`~resae_serve.server.convert.features_json`) on every
   choice of a JSON response, or on the chunk of a stream whose tokens made them available,
   in position order (:class:`~resae_serve.server.http_features.FeatureWriter`). Events and
   chunks vLLM writes are otherwise untouched.

Calls are counted in the server's metrics with ``protocol="http"``. :meth:`HttpFrontend.stop`
stops accepting connections, lets requests in flight finish within the grace period and
cancels the rest (their engine requests are aborted).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import grpc

from resae_serve.engine.http import ROUTES, HttpRequest
from resae_serve.errors import EngineRequestError
from resae_serve.interventions import InterventionError
from resae_serve.server import convert
from resae_serve.server.auth import BearerAuthInterceptor
from resae_serve.server.config import ServerConfig
from resae_serve.server.convert import RequestError
from resae_serve.server.errors import ServiceError
from resae_serve.server.http_features import FeatureWriter
from resae_serve.server.metrics import ServerMetrics
from resae_serve.server.service import ResaeService
from resae_serve.server.tls import _read_pem

logger = logging.getLogger(__name__)
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
MAX_STOP, MAX_STOP_CHARS = 16, 256
STATUS = {grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
          grpc.StatusCode.INVALID_ARGUMENT: 400}
ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               413: "RequestEntityTooLarge", 429: "RateLimitError",
               503: "ServiceUnavailableError"}


class HttpError(Exception):
    """A request the front end answers itself, with an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _error_body(status: int, message: str, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": ERROR_TYPES.get(status, "Error"),
                                 "param": param, "code": status}}).encode()


async def _respond(send: Send, status: int, body: bytes,
                   headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class HttpFrontend:
    """The HTTP API of one server: an ASGI app, its socket and its uvicorn server."""

    def __init__(self, config: ServerConfig, service: ResaeService, metrics: ServerMetrics,
                 auth: BearerAuthInterceptor | None = None) -> None:
        self.config, self.limits, self.service, self.metrics = (config, config.limits, service,
                                                                metrics)
        self.auth = auth
        self.app: Any = None
        """The engine's :class:`~resae_serve.engine.http.OpenAIApp`, once attached."""
        self.failure: str | None = None
        self.draining = False
        self.active = 0
        """Generation requests in flight."""
        self._socket: socket.socket | None = None
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def bind(self, host: str, port: int) -> int:
        """Bind the listening socket now (0 = a free port); the bound port."""
        if self.config.tls:             # a bad path fails at start-up, naming the option
            assert self.config.tls_cert_file is not None and self.config.tls_key_file is not None
            _read_pem("tls_cert_file", self.config.tls_cert_file, "certificate")
            _read_pem("tls_key_file", self.config.tls_key_file, "private key")
            if self.config.tls_client_ca_file is not None:
                _read_pem("tls_client_ca_file", self.config.tls_client_ca_file, "certificate")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
        # accepted sockets whose proto says TCP. With Nagle on, a response's first small write
        # after its headers waited for the client's delayed ACK: +20 ms time to first token
        # on a reused keep-alive connection, +40 ms per short non-streamed call.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(f"could not bind {host}:{port} for the HTTP API ({exc.strerror or exc})"
                          "; is the port in use? choose another with --http-port") from exc
        sock.listen(128)
        sock.setblocking(False)
        self._socket = sock
        return int(sock.getsockname()[1])

    async def start(self) -> None:
        """Serve on the bound socket (503 until :meth:`attach`)."""
        import uvicorn

        class QuietServer(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:    # the gRPC server owns signals
                yield

        c = self.config
        options: dict[str, Any] = {}
        if c.tls:
            options = {"ssl_certfile": str(c.tls_cert_file), "ssl_keyfile": str(c.tls_key_file)}
            if c.tls_client_ca_file is not None:
                options.update(ssl_ca_certs=str(c.tls_client_ca_file),
                               ssl_cert_reqs=ssl.CERT_REQUIRED)
        self._server = QuietServer(uvicorn.Config(
            self, lifespan="off", log_config=None, access_log=False,
            timeout_graceful_shutdown=int(max(c.grace_s, 0)), **options))
        assert self._socket is not None, "bind() first"
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))

    async def attach(self, engine: Any) -> None:
        """Serve ``engine`` from now on (vLLM's app is built over it, a few seconds)."""
        build = getattr(engine, "openai_app", None)
        if build is None:
            self.fail("this engine has no OpenAI-compatible app")
            return
        try:
            self.app = await build(self.config.model)
        except Exception as exc:
            logger.exception("vLLM's OpenAI app failed to build; the HTTP API answers 503")
            self.fail(f"the HTTP API failed to start: {type(exc).__name__}")
            return
        self.failure = None

    def fail(self, reason: str) -> None:
        """Stop serving the engine (it died or the server stops): 503 with ``reason``. vLLM's
        app lets go of the engine, so that a dead one can be collected."""
        close = getattr(self.app, "close", None)
        if close is not None:
            close()
        self.app, self.failure = None, reason

    def drain(self) -> None:
        """Refuse new requests (503); those in flight go on."""
        self.draining = True

    async def stop(self, grace: float) -> None:
        """Close the listener, let requests in flight finish within ``grace`` seconds, then
        cancel the rest."""
        self.drain()
        if self._server is not None and self._task is not None:
            self._server.config.timeout_graceful_shutdown = grace
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        elif self._socket is not None:
            self._socket.close()
        self.fail("the server stopped")

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        status: list[int] = [0]

        async def sent(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        if path == "/health":
            ok = method == "GET" and self.app is not None and not self.draining and \
                self.service.engine is not None
            await _respond(sent, 200 if ok else 503, b'{"status":"ok"}' if ok else
                           _error_body(503, self._unavailable()))
            return
        try:
            await self._handle(scope, receive, sent)
        except HttpError as exc:
            if status[0]:                   # the response has begun: nothing more to say
                raise
            if exc.status not in (401, 404):
                logger.info("%s %s -> %d: %s", method, path, exc.status, exc.message)
            headers: tuple[tuple[bytes, bytes], ...] = ()
            if exc.status == 401:
                headers = ((b"www-authenticate", b"Bearer"),)
            elif exc.status == 429:
                headers = ((b"retry-after", b"1"),)
            await _respond(sent, exc.status, _error_body(exc.status, exc.message, exc.param),
                           headers)
        finally:
            self.metrics.record_request(path if (method, path) in ROUTES else "other",
                                        str(status[0] or 500), protocol="http")

    def _unavailable(self) -> str:
        if self.draining:
            return "the server is shutting down; retry on another replica"
        try:
            self.service.check_engine()
        except ServiceError as exc:
            return str(exc)
        return (f"the HTTP API is down ({self.failure})" if self.failure
                else "the HTTP API is still loading; retry when /health answers 200")

    async def _handle(self, scope: Message, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if self.auth is not None:
            headers = [(k.decode("latin-1"), v.decode("latin-1"))
                       for k, v in scope.get("headers", ())]
            if not self.auth.is_authorized(headers):
                raise HttpError(401, "missing or invalid bearer token: send the header "
                                "'Authorization: Bearer <token>' (the OpenAI client's api_key)")
        if (method, path) not in ROUTES:
            allowed = ", ".join(f"{m} {p}" for m, p in sorted(ROUTES, key=lambda r: r[1]))
            raise HttpError(404, f"{method} {path} is not served here; allowed: {allowed}, "
                            "GET /health")
        app = self.app
        if self.draining or app is None or self.service.engine is None:
            raise HttpError(503, self._unavailable())
        if method == "GET":
            await app(scope, receive, send, HttpRequest())
            return
        body = await _read_body(receive, self.config.max_message_bytes)
        request, body = self._prepare(body, chat=path == "/v1/chat/completions")
        received = time.perf_counter()
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(self.service.admit())
            except ServiceError as exc:
                raise HttpError(STATUS.get(exc.code, 503), str(exc)) from exc
            held.enter_context(self.metrics.stream("http"))
            self.active += 1
            try:
                writer = FeatureWriter(send, request, self.metrics)
                await app(scope, _replay(body, receive), writer, request)
            finally:
                self.active -= 1
                if request.first_token_at is not None:
                    self.metrics.observe_first_token(request.first_token_at - received, "http")

    def _prepare(self, raw: bytes, *, chat: bool) -> tuple[HttpRequest, bytes]:
        """The request's :class:`HttpRequest` and the body vLLM gets (without ``resae``,
        with the server's default ``max_tokens``)."""
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise HttpError(400, f"the body is not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise HttpError(400, f"the body is {convert.json_type(data)}; it must be a JSON "
                            "object")
        options = data.pop("resae", None)
        xargs = data.get("vllm_xargs")
        if isinstance(xargs, dict) and "resae" in xargs:
            raise HttpError(400, "vllm_xargs.resae is reserved for this server; send steering "
                            "and monitoring in the body field 'resae'", "vllm_xargs")
        try:
            interventions, monitor = (convert.resae_options(options, self.limits)
                                      if options is not None else ([], None))
            self.service.check_engine().spec(interventions, monitor)
        except (RequestError, InterventionError, EngineRequestError) as exc:
            raise HttpError(400, str(exc), "resae") from exc
        except ServiceError as exc:
            raise HttpError(STATUS.get(exc.code, 503), str(exc)) from exc
        lim = self.limits
        asked = False
        for name in ("max_tokens", "max_completion_tokens"):
            value = data.get(name)
            if value is None:
                continue
            asked = True
            if not isinstance(value, int) or isinstance(value, bool) or \
                    not 1 <= value <= lim.max_tokens:
                raise HttpError(400, f"{name}={value!r}; allowed 1..{lim.max_tokens} "
                                "(max_tokens; leave it out for the server default "
                                f"{lim.default_max_tokens})", name)
        if not asked:               # chat calls max_tokens deprecated
            data["max_completion_tokens" if chat else "max_tokens"] = lim.default_max_tokens
        stop = data.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
        if len(stops) > MAX_STOP:
            raise HttpError(400, f"stop has {len(stops)} strings; at most {MAX_STOP}", "stop")
        for i, s in enumerate(stops):
            if isinstance(s, str) and not 1 <= len(s) <= MAX_STOP_CHARS:
                raise HttpError(400, f"stop[{i}] has {len(s)} characters; allowed "
                                f"1..{MAX_STOP_CHARS}", "stop")
        request = HttpRequest(tuple(interventions), monitor, lim.max_prompt_tokens)
        if request.steering and data.get("use_beam_search"):
            raise HttpError(400, "use_beam_search=true with resae; steering and monitoring "
                            "take sampling (use_beam_search=false)", "use_beam_search")
        n = data.get("n", 1)
        if request.monitoring and n not in (None, 1):
            raise HttpError(400, f"n={n!r} with resae.monitor; monitoring takes n=1", "n")
        return request, json.dumps(data).encode()


async def _read_body(receive: Receive, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HttpError(400, "the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HttpError(413, f"the body is over {limit} bytes (max_message_bytes)")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` that first returns ``body`` whole, then waits on the client (vLLM listens
    for its disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replayed
