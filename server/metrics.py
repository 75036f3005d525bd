"""Prometheus metrics of one server instance (its gRPC and HTTP APIs).

Request, token, stream and time-to-first-token series carry a ``protocol`` label (``grpc``
or ``http``; both series exist from the start, at 0). The server-wide monitors' series carry a
``monitor`` label whose values are the names in the server's config (a bounded set, declared
at start-up by :meth:`ServerMetrics.declare_monitors`). Every :class:`ServerMetrics` owns its
own ``CollectorRegistry``, so several servers (tests start many in one process) never clash
over metric names, and ``/metrics`` of one server shows only its own series. The token rate
is computed when scraped, over a sliding window of token timestamps, so it falls to zero when
generation stops rather than freezing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from resae_serve.errors import ResaeError

logger = logging.getLogger(__name__)

MONITOR_LAG_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64)
MONITOR_VALUE_BUCKETS = (0, 0.5, 1, 2, 4, 8, 16, 32, 64)
"""Buckets of the server-wide monitors' observed codes (SAE codes: 0 where the feature is off,
a few units where it fires, rarely above 64)."""
TIME_TO_FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PROTOCOLS = ("grpc", "http")


class MetricsConfigError(ResaeError):
    """The metrics HTTP endpoint cannot be started as configured."""


class ServerMetrics:
    """Counters, gauges and histograms of one server, in a registry of their own.

    ``tokens_per_second`` = tokens added during the last ``window_s`` seconds / ``window_s``.
    """

    def __init__(self, window_s: float = 10.0) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s={window_s}: must be > 0 seconds")
        self.window_s = window_s
        self.registry = CollectorRegistry()
        self._token_times: deque[tuple[float, int]] = deque()  # (monotonic time, n tokens)
        self._lock = threading.Lock()  # add_tokens runs on the event loop, scrapes on HTTP
        self._http: tuple[WSGIServer, threading.Thread] | None = None

        self.requests = Counter(
            "resae_requests", "Finished calls by protocol, method (RPC or HTTP path) and status "
            "code (gRPC code name or HTTP status).",
            labelnames=("rpc", "code", "protocol"), registry=self.registry)
        self.generated_tokens = Counter(
            "resae_generated_tokens", "Tokens generated over all requests, by protocol.",
            labelnames=("protocol",), registry=self.registry)
        self.tokens_per_second = Gauge(
            "resae_generated_tokens_per_second",
            f"Tokens generated per second over the last {window_s:g} s.",
            registry=self.registry)
        self.tokens_per_second.set_function(self._token_rate)
        self.active_streams = Gauge(
            "resae_active_streams", "Generation calls in progress, by protocol.",
            labelnames=("protocol",), registry=self.registry)
        self.steering_configs = Gauge(
            "resae_steering_configs_in_use", "Distinct steering configs resident in the engine.",
            registry=self.registry)
        self.monitor_lag = Histogram(
            "resae_monitor_lag_tokens",
            "Generated tokens by which a request's delivered features trail its generated "
            "tokens, observed per chunk.",
            buckets=MONITOR_LAG_BUCKETS, registry=self.registry)
        self.time_to_first_token = Histogram(
            "resae_time_to_first_token_seconds",
            "Seconds from receiving a generation request to its first token, by protocol.",
            labelnames=("protocol",), buckets=TIME_TO_FIRST_TOKEN_BUCKETS,
            registry=self.registry)
        self.engine_up = Gauge(
            "resae_engine_up", "1 while the engine is ready to serve, else 0.",
            registry=self.registry)
        self.engine_restarts = Counter(
            "resae_engine_restarts",
            "Engine rebuild attempts after the engine died, by outcome (ok, failed).",
            labelnames=("outcome",), registry=self.registry)
        self.feature_runtime = Gauge(
            "resae_feature_runtime_info",
            "1 for the feature runtime the engine's monitor encodes with (backend: torch, "
            "onnxruntime or tensorrt; provider: onnxruntime's execution provider), as the "
            "worker reports it; no series before the engine has loaded.",
            labelnames=("backend", "provider"), registry=self.registry)
        self.monitor_fired_tokens = Counter(
            "resae_monitor_fired_tokens",
            "Tokens on which a server-wide monitor fired, by monitor.",
            labelnames=("monitor",), registry=self.registry)
        self.monitor_fired_requests = Counter(
            "resae_monitor_fired_requests",
            "Requests on which a server-wide monitor fired at least once, by monitor.",
            labelnames=("monitor",), registry=self.registry)
        self.monitor_values = Histogram(
            "resae_monitor_value",
            "Codes a server-wide monitor read (its feature on every token it judged), by "
            "monitor.",
            labelnames=("monitor",), buckets=MONITOR_VALUE_BUCKETS, registry=self.registry)
        self.watch_dropped = Counter(
            "resae_watch_dropped_events",
            "Server-wide monitor events dropped for WatchEvents subscribers that read too "
            "slowly (one per event and subscriber), by monitor.",
            labelnames=("monitor",), registry=self.registry)
        self.watch_subscribers = Gauge(
            "resae_watch_subscribers", "Open WatchEvents streams.", registry=self.registry)
        for protocol in PROTOCOLS:             # every series exists, at 0, from the start
            self.generated_tokens.labels(protocol=protocol)
            self.active_streams.labels(protocol=protocol)
            self.time_to_first_token.labels(protocol=protocol)

    def record_request(self, rpc: str, code: grpc.StatusCode | str,
                       protocol: str = "grpc") -> None:
        """Count one finished call of ``rpc`` (e.g. ``"Generate"``, ``"/v1/completions"``)
        ending with ``code`` (a gRPC status, or an HTTP status as text)."""
        name = code if isinstance(code, str) else code.name
        self.requests.labels(rpc=rpc, code=name, protocol=protocol).inc()

    def observe_first_token(self, seconds: float, protocol: str = "grpc") -> None:
        """Record the time from a request's arrival to its first token."""
        self.time_to_first_token.labels(protocol=protocol).observe(seconds)

    def add_tokens(self, n: int, protocol: str = "grpc") -> None:
        """Count ``n`` newly generated tokens (total and sliding-window rate)."""
        if n < 0:
            raise ValueError(f"n={n}: a token count cannot be negative")
        if n == 0:
            return
        self.generated_tokens.labels(protocol=protocol).inc(n)
        now = time.monotonic()
        with self._lock:
            self._token_times.append((now, n))
            self._prune(now)

    def declare_monitors(self, names: Iterable[str]) -> None:
        """Create the per-monitor series of ``names`` (the config's monitors), at 0."""
        for name in names:
            self.monitor_fired_tokens.labels(monitor=name)
            self.monitor_fired_requests.labels(monitor=name)
            self.monitor_values.labels(monitor=name)
            self.watch_dropped.labels(monitor=name)

    def monitor_fired(self, name: str, first_in_request: bool) -> None:
        """Count one token on which monitor ``name`` fired (and the request, on its first)."""
        self.monitor_fired_tokens.labels(monitor=name).inc()
        if first_in_request:
            self.monitor_fired_requests.labels(monitor=name).inc()

    def observe_monitor(self, name: str, values: Iterable[float]) -> None:
        """Add codes monitor ``name`` read to its histogram."""
        histogram = self.monitor_values.labels(monitor=name)
        for value in values:
            histogram.observe(value)

    def set_feature_runtime(self, backend: str, provider: str = "") -> None:
        """Report the feature runtime in use (the one series of ``resae_feature_runtime_info``)."""
        self.feature_runtime.clear()
        self.feature_runtime.labels(backend=backend, provider=provider).set(1)

    def track_configs(self, fn: Callable[[], int]) -> None:
        """Report ``fn()`` (steering configs in use) as ``resae_steering_configs_in_use``."""
        self.steering_configs.set_function(fn)

    @contextmanager
    def stream(self, protocol: str = "grpc") -> Iterator[None]:
        """Count a generation call as active for the duration of the ``with`` block."""
        gauge = self.active_streams.labels(protocol=protocol)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    def _prune(self, now: float) -> None:
        """Drop token timestamps older than the window; call with the lock held."""
        cutoff = now - self.window_s
        while self._token_times and self._token_times[0][0] < cutoff:
            self._token_times.popleft()

    def _token_rate(self) -> float:
        with self._lock:
            self._prune(time.monotonic())
            return sum(n for _, n in self._token_times) / self.window_s

    def render(self) -> bytes:
        """The registry in the Prometheus text format (what ``/metrics`` serves)."""
        return generate_latest(self.registry)

    def start_http(self, host: str, port: int) -> int:
        """Serve ``/metrics`` of this registry on ``host:port`` (0 = any free port).

        Returns the bound port. Runs on a daemon thread until :meth:`stop_http`.
        """
        if self._http is not None:
            raise RuntimeError(
                f"metrics HTTP server already running on port {self._http[0].server_port}")
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise MetricsConfigError(
                f"metrics_port={port}: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                "choose a free port, or 0 for any") from exc
        self._http = (server, thread)
        bound = int(server.server_port)
        logger.info("serving Prometheus metrics on http://%s:%d/metrics", host, bound)
        return bound

    def stop_http(self) -> None:
        """Stop the ``/metrics`` server if it runs; safe to call twice."""
        if self._http is None:
            return
        server, thread = self._http
        self._http = None
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
