"""Build, start and stop the gRPC server (and, with ``http_port``, the OpenAI-compatible HTTP
API of :mod:`~resae_serve.server.http` on the same engine); ``serve()`` runs it until
SIGTERM/SIGINT.

``create_server(config)`` checks the dictionary against the model (and the server-wide
monitors of ``config.watch`` against the dictionary), binds the port (0 picks a free one, so
tests run side by side) and returns ``(server, port)`` without starting the engine;
:meth:`ResaeServer.start` starts serving at once with health ``NOT_SERVING`` and loads the vLLM
engine in the background (a minute or more); health turns ``SERVING`` when it is ready and back
to ``NOT_SERVING`` if it dies (a watchdog polls it): calls in flight end ``UNAVAILABLE``, and an
engine the server owns is rebuilt (``restart_attempts`` tries with exponential backoff from
``restart_backoff_s``; ``restart_engine = false`` turns that off), after which health is
``SERVING`` again; a shared engine is never rebuilt here. Every engine the server adopts,
rebuilt ones too, applies the server-wide monitors and reports them to the server's
:class:`~resae_serve.server.watch.WatchHub` (metrics, ``WatchEvents``, the event log). Before
the engine loads, :func:`~resae_serve.server.config.check_memory` refuses a configuration whose
weights, KV cache, dictionary and tables would not fit the memory available.
:meth:`ResaeServer.stop` reports ``NOT_SERVING``, ends ``WatchEvents`` streams, stops accepting
calls, lets in-flight streams finish within ``grace_s``, cancels the rest (their engine
requests are aborted), shuts the engine down, then closes the event log.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from resae_serve.artifact import Manifest
from resae_serve.catalog import Catalog, CatalogError, load_catalog
from resae_serve.engine.serving import ResaeEngine, ServingEngine
from resae_serve.interventions import InterventionError
from resae_serve.models import resolve_model
from resae_serve.server.auth import BearerAuthInterceptor, load_tokens
from resae_serve.server.config import (
    MAX_BACKOFF_S,
    ServerConfig,
    ServerConfigError,
    check_dictionary,
    check_export,
    check_memory,
    check_runtime,
    with_model_defaults,
    with_served_folders,
)
from resae_serve.server.errors import ErrorInterceptor
from resae_serve.server.http import HttpFrontend
from resae_serve.server.metrics import ServerMetrics
from resae_serve.server.service import ResaeService
from resae_serve.server.tls import server_credentials
from resae_serve.server.v1 import resae_pb2, resae_pb2_grpc
from resae_serve.server.watch import WatchHub

logger = logging.getLogger(__name__)
SERVICE_NAME = resae_pb2.DESCRIPTOR.services_by_name["ResaeService"].full_name
EngineFactory = Callable[[ServerConfig], Awaitable[tuple[ServingEngine, bool]]]
"""Loads the engine for a config: the engine, and whether this server owns it (shuts it down
when it stops; a shared engine is left running for its owner)."""
WATCHDOG_S = 1.0
_CLOSING: set[asyncio.Future[None]] = set()


async def build_engine(config: ServerConfig) -> tuple[ServingEngine, bool]:
    """The :class:`ResaeEngine` for ``config``, owned by the server, with the KV cache of
    :func:`~resae_serve.server.config.check_memory` (which refuses a configuration that does
    not fit the memory available now)."""
    e = config.engine
    plan = check_memory(config)
    logger.debug("memory: %s", plan.describe())
    extra: dict[str, Any] = {}
    if e.gpu_memory_utilization is not None:
        extra["gpu_memory_utilization"] = e.gpu_memory_utilization
    if e.tensor_parallel_size != 1:
        extra["tensor_parallel_size"] = e.tensor_parallel_size
    engine = await ResaeEngine.build(config.model, config.dictionary,
                                     max_configs=e.max_configs, kv_cache_bytes=plan.kv_cache,
                                     max_model_len=e.max_model_len, max_num_seqs=e.max_num_seqs,
                                     enforce_eager=e.enforce_eager, dtype=e.dtype,
                                     op_mode=e.op_mode, runtime=e.runtime,
                                     export=config.export, **extra)
    return engine, True


class ResaeServer:
    """A bound gRPC server, its health service, metrics and engine lifecycle."""

    def __init__(self, config: ServerConfig, server: grpc.aio.Server, port: int,
                 service: ResaeService, health: HealthServicer, metrics: ServerMetrics,
                 engine_factory: EngineFactory, http: HttpFrontend | None = None,
                 http_port: int | None = None, watch_hub: WatchHub | None = None) -> None:
        self.config, self.server, self.port = config, server, port
        self.watch_hub = watch_hub
        """The server-wide monitors' hub (metrics, ``WatchEvents``, event log)."""
        self.http, self.http_port = http, http_port
        """The OpenAI-compatible HTTP API and its bound port (``config.http_port`` set)."""
        self.service, self.health, self.metrics = service, health, metrics
        self.engine_factory = engine_factory
        self.engine: ServingEngine | None = None
        self.owns_engine = False
        self.metrics_port: int | None = None
        self.ready = asyncio.Event()
        self.restarts = 0
        """Engine rebuilds that succeeded."""
        self._tasks: list[asyncio.Task[None]] = []

    async def _set_health(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        self.metrics.engine_up.set(1 if serving else 0)

    async def start(self) -> None:
        """Serve now (NOT_SERVING) and load the engine in the background."""
        await self._set_health(False)
        await self.server.start()
        if self.http is not None:
            await self.http.start()
            logger.info("OpenAI-compatible HTTP API on %s:%d (%s)", self.config.host,
                        self.http_port, "TLS" if self.config.tls else "plaintext")
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.start_http(self.config.host,
                                                        self.config.metrics_port)
        logger.info("gRPC on %s:%d (%s), metrics on %s", self.config.host, self.port,
                    "TLS" if self.config.tls else "plaintext",
                    self.metrics_port if self.metrics_port is not None else "off")
        self._tasks.append(asyncio.create_task(self._load_engine()))

    async def _load_engine(self) -> None:
        try:
            engine, owned = await self._build()
        except Exception as exc:
            logger.exception("the engine failed to load")
            self.service.fail(f"failed to load: {type(exc).__name__}")
            await self._set_health(False)
            self.ready.set()
            return
        await self._adopt(engine, owned)
        self.ready.set()
        runtime = self.service.runtime_info()
        logger.info("engine ready: serving %s with dictionary %s; features computed by %s%s",
                    self.config.model, self.config.dictionary, runtime.backend,
                    f" ({runtime.provider})" if runtime.provider else "")
        self._tasks.append(asyncio.create_task(self._watchdog()))

    async def _build(self) -> tuple[ServingEngine, bool]:
        """``engine_factory(config)``; an engine that lands after this server stopped waiting
        (cancelled: the server is stopping) is shut down, not leaked."""
        task = asyncio.ensure_future(self.engine_factory(self.config))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_shut_down_late)
            raise

    async def _adopt(self, engine: ServingEngine, owned: bool) -> None:
        """Serve with ``engine`` from now on: new calls reach it, health turns SERVING."""
        # every engine, rebuilt ones too, applies the server-wide monitors and reports here
        engine.set_guards(self.config.watch.policy(), self.watch_hub)
        self.engine, self.owns_engine = engine, owned
        self.service.attach(engine)
        runtime = self.service.runtime_info()
        self.metrics.set_feature_runtime(runtime.backend, runtime.provider)
        self.metrics.track_configs(lambda: engine.resident_configs)
        if self.http is not None:                 # a new vLLM app for every engine
            await self.http.attach(engine)
        await self._set_health(True)

    async def _watchdog(self) -> None:
        """Poll the engine; when it dies turn NOT_SERVING and fail calls, then rebuild it
        (an owned engine, restarts on) or stay down."""
        while True:
            await asyncio.sleep(WATCHDOG_S)
            dead = self.engine
            if dead is None or not dead.errored:           # shared ones die for all
                continue
            logger.error("the engine died; health is NOT_SERVING")
            self.service.fail("engine died")
            if self.http is not None:
                self.http.fail("engine died")
            await self._set_health(False)
            if not self.owns_engine:
                logger.error("the engine is shared with another owner and is not rebuilt "
                             "here: this server stays NOT_SERVING")
                return
            if not self.config.restart_engine:
                self.service.fail("engine died; restarts are off")
                logger.error("engine restarts are off (restart_engine = false): this server "
                             "stays NOT_SERVING until it is restarted")
                return
            self.engine = None
            try:
                await dead.shutdown()                      # its processes and memory
            except Exception:
                logger.exception("shutting down the dead engine failed; rebuilding anyway")
            del dead
            gc.collect()
            if not await self._restart():
                return

    async def _restart(self) -> bool:
        """Rebuild the engine: ``restart_attempts`` tries, the first after
        ``restart_backoff_s`` seconds, doubling (at most ``MAX_BACKOFF_S``). True when serving
        again."""
        attempts, delay = self.config.restart_attempts, self.config.restart_backoff_s
        for attempt in range(1, attempts + 1):
            self.service.fail(f"engine died; restarting, attempt {attempt} of {attempts}")
            logger.warning("rebuilding the engine in %.1f s (attempt %d of %d)", delay, attempt,
                           attempts)
            await asyncio.sleep(delay)
            delay = min(2 * delay, MAX_BACKOFF_S)
            started = time.monotonic()
            try:
                engine, owned = await self._build()
            except Exception:
                self.metrics.engine_restarts.labels(outcome="failed").inc()
                logger.exception("engine restart attempt %d of %d failed", attempt, attempts)
                continue
            self.metrics.engine_restarts.labels(outcome="ok").inc()
            self.restarts += 1
            await self._adopt(engine, owned)
            logger.warning("engine restarted in %.0f s (attempt %d of %d; restart %d of this "
                           "server); health is SERVING", time.monotonic() - started, attempt,
                           attempts, self.restarts)
            return True
        self.service.fail(f"engine died and {attempts} restart attempts failed; restart the "
                          "server")
        logger.error("the engine died and all %d restart attempts failed: this server stays "
                     "NOT_SERVING until it is restarted", attempts)
        return False

    def held(self) -> dict[str, int]:
        """What the server still holds of past calls (all 0 when idle): open streams, admitted
        calls, resident steering configs, requests unfinished in the engine."""
        service, engine = self.service, self.engine
        # a shared engine also runs other servers' requests: only its owner counts them
        held = {"active_streams": service.active_streams, "pending": service.pending,
                "resident_configs": service.engine.resident_configs if service.engine else 0,
                "engine_unfinished": engine.num_unfinished()
                if engine is not None and self.owns_engine else 0}
        if self.http is not None:
            held["http_streams"] = self.http.active
        return held

    def wait_idle(self, timeout: float = 30.0) -> dict[str, int]:
        """Block until :meth:`held` is all 0 or ``timeout`` seconds pass; what the server still
        holds then. Call it from a thread other than the server's event loop (tests, tools)."""
        deadline = time.monotonic() + timeout
        while any((state := self.held()).values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return state

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait for the engine; True when serving, False when it failed to load."""
        await asyncio.wait_for(self.ready.wait(), timeout)
        return self.service.engine is not None

    async def stop(self, grace: float | None = None) -> None:
        """Drain (``grace`` seconds, default ``config.grace_s``) and shut everything down."""
        grace = self.config.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        self.metrics.engine_up.set(0)
        logger.info("shutting down: %d stream(s) in flight, grace %.1f s",
                    self.service.active_streams + (self.http.active if self.http else 0), grace)
        if self.watch_hub is not None:          # watch streams never end by themselves
            self.watch_hub.end_streams()
        if self.http is None:
            await self.server.stop(grace)
        else:
            self.http.drain()
            await asyncio.gather(self.server.stop(grace), self.http.stop(grace))
        for task in self._tasks:
            task.cancel()
        self.service.fail("the server stopped")
        if self.engine is not None and self.owns_engine:
            await self.engine.shutdown()
        # Drop every reference and collect now: the engine's finalizer fails at interpreter exit.
        self.engine = None
        self.metrics.track_configs(lambda: 0)
        gc.collect()
        self.metrics.stop_http()
        if self.watch_hub is not None:          # after the engine: its last events are logged
            await asyncio.to_thread(self.watch_hub.close)
        logger.info("stopped")


def _shut_down_late(task: asyncio.Future[tuple[ServingEngine, bool]]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    engine, owned = task.result()
    if owned:
        logger.info("shutting down an engine that finished loading after the server stopped")
        closing = asyncio.ensure_future(engine.shutdown())
        _CLOSING.add(closing)                   # the loop holds tasks weakly
        closing.add_done_callback(_CLOSING.discard)


def _tokenizer(model: str) -> tuple[Any, int]:
    from transformers import AutoTokenizer

    folder = resolve_model(model)
    vocab = int(json.loads((folder / "config.json").read_text())["vocab_size"])
    return AutoTokenizer.from_pretrained(folder), vocab


def _catalog(folder: Path) -> Catalog | None:
    try:
        return load_catalog(folder)
    except CatalogError as exc:
        logger.warning("feature catalog unavailable (ListFeatures/GetFeature/SearchFeatures "
                       "will answer FAILED_PRECONDITION): %s", exc)
        return None


async def create_server(config: ServerConfig, *, engine_factory: EngineFactory = build_engine,
                        manifest: Manifest | None = None) -> tuple[ResaeServer, int]:
    """A bound, not yet started server and its port (refuses a mismatched dictionary, or a
    feature runtime that cannot run here)."""
    config = with_served_folders(config)
    check_runtime(config)
    manifest = manifest or check_dictionary(config)
    try:                                # monitors and policy edits against the dictionary
        config.watch.policy().validate(manifest.layers,
                                       [c.d_sae for c in manifest.sae_configs],
                                       manifest.d_model)
    except InterventionError as exc:
        raise ServerConfigError(f"watch: {exc}") from exc
    check_export(config)
    config = with_model_defaults(config)
    if engine_factory is build_engine:      # refuse now what would not fit
        logger.info("memory: %s", check_memory(config).describe())
    tokenizer, vocab = _tokenizer(config.model)
    metrics = ServerMetrics()
    # The error interceptor is outermost, so it also counts calls that auth turns away.
    interceptors: list[grpc.aio.ServerInterceptor] = [ErrorInterceptor(metrics)]
    auth: BearerAuthInterceptor | None = None
    if config.auth or config.auth_token_file is not None:
        auth = BearerAuthInterceptor(load_tokens(config.auth_token_file))
        interceptors.append(auth)
    size = config.max_message_bytes
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
        ("grpc.so_reuseport", 0)])
    service = ResaeService(config, manifest, tokenizer, vocab, metrics,
                           _catalog(Path(config.dictionary)))
    resae_pb2_grpc.add_ResaeServiceServicer_to_server(service, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    if config.tls:
        assert config.tls_cert_file is not None and config.tls_key_file is not None
        port = server.add_secure_port(address, server_credentials(
            config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}; is the port in use? choose another with "
                      "--port")
    http, http_port = None, None
    if config.http_port is not None:
        http = HttpFrontend(config, service, metrics, auth)
        http_port = http.bind(config.host, config.http_port)
    watch_hub = WatchHub(config.watch, tokenizer, metrics)      # last: it opens the event log
    service.watch_hub = watch_hub
    return ResaeServer(config, server, port, service, health, metrics, engine_factory, http,
                       http_port, watch_hub), port


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain within ``config.grace_s``."""
    server, _ = await create_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await stop.wait()
    logger.info("signal received")
    await server.stop()
