"""Server-wide monitoring, server side: where the engine's
:class:`~resae_serve.engine.guards.GuardListener` reports go.

:class:`WatchHub` is the listener. For every monitor of the config (``[watch]``) it keeps
Prometheus series (tokens and requests on which it fired, a histogram of the codes it read,
events dropped for slow subscribers), fans each event out to the ``WatchEvents`` streams that
follow that monitor, and appends it to the JSON-lines event log (:class:`EventLog`) if one is
configured.

The engine calls the listener on the server's event loop for every sampled request, so the
hub never waits: each subscriber has a bounded buffer (``watch.subscriber_buffer`` events);
when it is full the oldest buffered event is dropped and counted, exactly, in the metrics and
in the subscriber's stream (an ``EventsDropped`` count on its next message). A stream that
never reads therefore costs one buffer, never generation speed; a stream's messages carry
everything buffered (up to :data:`BATCH` events), so a storm of events costs few writes. The
event log is written by a thread of its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from resae_serve.engine.guards import GuardEvent
from resae_serve.server.config import WatchSettings
from resae_serve.server.convert import RequestError
from resae_serve.server.errors import ServiceError
from resae_serve.server.metrics import ServerMetrics
from resae_serve.server.v1 import resae_pb2 as pb

logger = logging.getLogger(__name__)
MAX_SUBSCRIBERS = 64
"""Open ``WatchEvents`` streams per server (each holds a buffer)."""
LOG_QUEUE_EVENTS = 65536
"""Events waiting for the event log's thread; beyond it events are left out of the log."""
TOKEN_TEXT_CACHE = 65536
"""Decoded token texts kept (one id each)."""
BATCH = 256
"""Events per ``WatchEventsResponse`` at most: one message per event would cost the server's
event loop a gRPC write each (tens of µs) and, in an event storm, generation speed."""


class WatchedRecord(NamedTuple):
    """One event as subscribers and the event log see it: the fields of ``WatchedEvent``."""

    request_id: str
    monitor: str
    action: str
    position: int
    token_id: int
    """-1 when the engine did not know it."""
    token_text: str
    layer: int
    feature: int
    value: float
    threshold: float
    time_unix_s: float

    def message(self) -> pb.WatchedEvent:
        return pb.WatchedEvent(**self._asdict())

    def json_line(self) -> bytes:
        """The event log's line: one JSON object, newline-terminated, UTF-8."""
        return (json.dumps(self._asdict(), ensure_ascii=False) + "\n").encode()


class Subscription:
    """One ``WatchEvents`` stream: its filter and a buffer of the newest ``capacity`` events.

    :meth:`push` (the hub, on the event loop) never waits; :meth:`next` (the stream) waits for
    an event, and answers an ``EventsDropped`` notice first when events were dropped since the
    previous one.
    """

    def __init__(self, monitors: frozenset[str] | None, capacity: int,
                 on_close: Callable[[Subscription], None]) -> None:
        self.monitors = monitors
        """Monitor names followed (None: all)."""
        self.capacity = capacity
        self.buffer: deque[WatchedRecord] = deque()
        self.dropped = 0
        """Dropped since the last notice this stream sent."""
        self.total_dropped = 0
        self.ended = False
        self._ready = asyncio.Event()
        self._on_close = on_close

    def wants(self, monitor: str) -> bool:
        return self.monitors is None or monitor in self.monitors

    def push(self, record: WatchedRecord) -> WatchedRecord | None:
        """Buffer ``record``; the oldest buffered event when it had to be dropped."""
        oldest = None
        if len(self.buffer) >= self.capacity:
            oldest = self.buffer.popleft()
            self.dropped += 1
            self.total_dropped += 1
        self.buffer.append(record)
        self._ready.set()
        return oldest

    def end(self) -> None:
        """End the stream once what is buffered has been read."""
        self.ended = True
        self._ready.set()

    async def next(self) -> pb.WatchEventsResponse | None:
        """The next message of the stream: what is buffered (up to :data:`BATCH` events), after
        a count of the events dropped since the previous message; None once it has ended."""
        while not self.buffer and not self.ended:
            self._ready.clear()
            await self._ready.wait()
        if not self.buffer:
            return None
        # Drops happen only on a push, so a message with a drop count always has events.
        notice = (pb.EventsDropped(dropped=self.dropped, total=self.total_dropped)
                  if self.dropped else None)
        self.dropped = 0
        n = min(len(self.buffer), BATCH)
        return pb.WatchEventsResponse(dropped=notice, events=[
            self.buffer.popleft().message() for _ in range(n)])

    def close(self) -> None:
        """Unsubscribe (the stream ended or was cancelled)."""
        self.end()
        self._on_close(self)


class WatchHub:
    """The server's :class:`~resae_serve.engine.guards.GuardListener`: metrics, subscribers
    and the event log of the monitors in ``settings``."""

    def __init__(self, settings: WatchSettings, tokenizer: Any, metrics: ServerMetrics, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings, self.tokenizer, self.metrics, self.clock = (settings, tokenizer,
                                                                    metrics, clock)
        self.names = tuple(m.name for m in settings.monitors)
        self._known = frozenset(self.names)
        self._subscribers: list[Subscription] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._strangers: set[str] = set()
        self._text = lru_cache(maxsize=TOKEN_TEXT_CACHE)(self._decode)
        self.log = (None if settings.event_log is None else
                    EventLog(settings.event_log, settings.event_log_max_bytes,
                             settings.event_log_backups))
        metrics.declare_monitors(self.names)

    @property
    def subscribers(self) -> int:
        """Open ``WatchEvents`` streams."""
        return len(self._subscribers)

    # ------------------------------------------------------------------ GuardListener

    def observed(self, monitor: str, values: Sequence[float]) -> None:
        if self._configured(monitor):
            self.metrics.observe_monitor(monitor, values)

    def fired(self, event: GuardEvent, first_in_request: bool) -> None:
        if not self._configured(event.monitor):
            return
        self.metrics.monitor_fired(event.monitor, first_in_request)
        if not self._subscribers and self.log is None:
            return
        record = WatchedRecord(
            event.request_id, event.monitor, event.action, event.position, event.token_id,
            self._text(event.token_id) if event.token_id >= 0 else "", event.layer,
            event.feature, float(event.value), float(event.threshold), self.clock())
        if self.log is not None:
            self.log.write(record)
        if self._loop is not None and _running_loop() is not self._loop:
            self._loop.call_soon_threadsafe(self._fan_out, record)   # not the server's loop
        else:
            self._fan_out(record)

    def _fan_out(self, record: WatchedRecord) -> None:
        for subscription in self._subscribers:
            if subscription.wants(record.monitor):
                oldest = subscription.push(record)
                if oldest is not None:
                    self.metrics.watch_dropped.labels(monitor=oldest.monitor).inc()

    def _configured(self, monitor: str) -> bool:
        """Whether ``monitor`` is one of the config's (the metrics' label set stays bounded)."""
        if monitor in self._known:
            return True
        if monitor not in self._strangers:
            self._strangers.add(monitor)
            logger.warning("the engine reported monitor %r, which is not in the server's "
                           "config (%s); its events are ignored", monitor,
                           ", ".join(self.names) or "none")
        return False

    def _decode(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))

    # ------------------------------------------------------------------ subscribers

    def subscribe(self, monitors: Sequence[str]) -> Subscription:
        """A subscription to ``monitors`` (empty: all); :class:`RequestError` for a name that
        is not configured, :class:`ServiceError` when there is nothing to watch, the server
        is stopping, or too many streams are open."""
        if not self.names:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               "this server has no server-wide monitors to watch; the operator "
                               "configures them in the [[watch.monitors]] tables of its config")
        for i, name in enumerate(monitors):
            if name not in self._known:
                raise RequestError(f"monitors[{i}]={name!r} is not a monitor of this server; "
                                   f"its monitors are {list(self.names)}")
        if self._closed:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the server is stopping")
        if len(self._subscribers) >= MAX_SUBSCRIBERS:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{len(self._subscribers)} WatchEvents streams are open, the "
                               f"limit is {MAX_SUBSCRIBERS}; retry later")
        self._loop = asyncio.get_running_loop()
        subscription = Subscription(frozenset(monitors) or None,
                                    self.settings.subscriber_buffer, self._unsubscribe)
        self._subscribers.append(subscription)
        self.metrics.watch_subscribers.inc()
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)
            self.metrics.watch_subscribers.dec()

    def end_streams(self) -> None:
        """End every stream (once drained) and refuse new ones: the server is stopping."""
        self._closed = True
        for subscription in self._subscribers:
            subscription.end()

    def close(self) -> None:
        """End the streams and close the event log (waits for its thread to write what is
        queued)."""
        self.end_streams()
        if self.log is not None:
            self.log.close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class EventLog:
    """Events as JSON lines in ``path``, rotated by size like
    ``logging.handlers.RotatingFileHandler``: when the next line would take the file past
    ``max_bytes`` it becomes ``path.1`` (``path.1`` becomes ``path.2`` ..., at most
    ``backups`` kept). A thread of its own writes, so a slow disk never stalls the event loop;
    when ``queue_events`` lines are waiting, further events are left out of the log (counted in
    :attr:`lost`, warned about)."""

    def __init__(self, path: Path, max_bytes: int, backups: int,
                 queue_events: int = LOG_QUEUE_EVENTS) -> None:
        if max_bytes < 1 or backups < 1:
            raise ValueError(f"max_bytes={max_bytes}, backups={backups}; both must be >= 1")
        self.path, self.max_bytes, self.backups = Path(path), max_bytes, backups
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("ab")          # an unwritable path fails at start-up
        self._size = self.path.stat().st_size
        self._queue: queue.Queue[WatchedRecord | None] = queue.Queue(queue_events)
        self.lost = 0
        """Events left out because the writer fell behind."""
        self._failures = 0
        self._thread = threading.Thread(target=self._run, name="resae-event-log", daemon=True)
        self._thread.start()

    def write(self, record: WatchedRecord) -> None:
        """Queue ``record`` for the log (never waits)."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.lost += 1
            if self.lost == 1 or self.lost % 10000 == 0:
                logger.warning("event log %s falls behind: %d event(s) left out of it so far",
                               self.path, self.lost)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then close the file."""
        if not self._thread.is_alive():
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            logger.warning("event log %s: the writer did not catch up within %.0f s; closing "
                           "without the events still queued", self.path, timeout)
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        done = False
        while not done:
            batch = [self._queue.get()]
            while True:                            # what else is waiting: one flush for all
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                for record in batch:
                    if record is None:
                        done = True
                        break
                    self._emit(record)
                self._file.flush()
            except OSError:
                self._failures += 1
                if self._failures == 1 or self._failures % 1000 == 0:
                    logger.exception("writing event log %s failed (%d time(s) so far)",
                                     self.path, self._failures)
        self._file.close()

    def _emit(self, record: WatchedRecord) -> None:
        line = record.json_line()
        if self._file.closed:                      # a rotation failed half-way: go on
            self._reopen()
        if self._size > 0 and self._size + len(line) > self.max_bytes:
            self._rotate()
        self._file.write(line)
        self._size += len(line)

    def rotated(self, n: int) -> Path:
        """The ``n``-th rotated file (1: the newest)."""
        return self.path.with_name(f"{self.path.name}.{n}")

    def _rotate(self) -> None:
        self._file.close()
        try:
            for n in range(self.backups - 1, 0, -1):
                if self.rotated(n).exists():
                    self.rotated(n).replace(self.rotated(n + 1))
            self.path.replace(self.rotated(1))
        finally:
            self._reopen()

    def _reopen(self) -> None:
        self._file = self.path.open("ab")
        self._size = self.path.stat().st_size
