"""Monitored features written into the OpenAI responses vLLM's app produces.

:class:`FeatureWriter` wraps the ASGI ``send`` of one request. It depends only on the OpenAI
wire format, not on vLLM's internals: a JSON body is held until complete and every choice
gets a ``resae`` object (``content-length`` recomputed); a ``text/event-stream`` is cut into
events, and each ``data: {json}`` chunk gets, on each of its choices, the features that
became available for that choice since its previous chunk (``HttpRequest.pending``, filled
by the engine proxy before vLLM turns an output into chunks). Comments (keep-alives), error
and usage events and ``[DONE]`` pass unchanged; features left after a choice's last chunk
get a chunk of their own before ``[DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from resae_serve.engine.http import HttpRequest
from resae_serve.server import convert
from resae_serve.server.metrics import ServerMetrics

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]


class FeatureWriter:
    """``send`` that adds each choice's pending features (``request.pending``) to the response
    vLLM writes: every choice of a JSON body, or the next chunk of that choice in a stream
    (chunks left without one get a chunk of their own before ``[DONE]``). Counts tokens."""

    def __init__(self, send: Send, request: HttpRequest, metrics: ServerMetrics) -> None:
        self.send, self.request, self.metrics = send, request, metrics
        self.mode = "pass"
        self.start: Message | None = None
        self.buffer = b""
        self.last: dict[str, Any] = {}
        """The last chunk with choices (the id, model ... of leftover chunks)."""
        self.chat = False
        self.counted = 0

    async def __call__(self, message: Message) -> None:
        self._count()
        if message["type"] == "http.response.start":
            ctype = dict(message.get("headers", ())).get(b"content-type", b"")
            if self.request.monitoring and message["status"] == 200:
                if ctype.startswith(b"text/event-stream"):
                    self.mode = "sse"
                elif ctype.startswith(b"application/json"):
                    self.mode, self.start = "json", message
                    return
            await self.send(message)
            return
        if message["type"] != "http.response.body" or self.mode == "pass":
            await self.send(message)
            return
        self.buffer += message.get("body", b"")
        more = bool(message.get("more_body", False))
        if self.mode == "json":
            if more:
                return
            await self._send_json()
            return
        events = self.buffer.split(b"\n\n")
        self.buffer = events.pop() if more else b""
        out = b"".join(self._event(e) for e in events if e)
        if out or not more:
            await self.send({"type": "http.response.body", "body": out, "more_body": more})

    def _count(self) -> None:
        new = self.request.tokens - self.counted
        if new > 0:
            self.metrics.add_tokens(new, "http")
            self.counted = self.request.tokens

    async def _send_json(self) -> None:
        assert self.start is not None
        body = self.buffer
        data = json.loads(body)
        for choice in data.get("choices") or ():
            taken = self.request.take(choice.get("index", 0)) or ([], [])
            choice["resae"] = convert.features_json(*taken)
        body = json.dumps(data).encode()
        headers = [(k, v) for k, v in self.start.get("headers", ()) if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({**self.start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    def _event(self, event: bytes) -> bytes:
        """One SSE event with features added to its choices (or as it was)."""
        if not event.startswith(b"data: "):
            return event + b"\n\n"                   # comments, keep-alives
        payload = event[len(b"data: "):]
        if payload.strip() == b"[DONE]":
            return self._leftovers() + event + b"\n\n"
        try:
            data = json.loads(payload)
        except ValueError:
            return event + b"\n\n"
        choices = data.get("choices") if isinstance(data, dict) else None
        if not choices:
            return event + b"\n\n"                   # usage or error events
        self.last, self.chat = data, any("delta" in c for c in choices)
        for choice in choices:
            taken = self.request.take(choice.get("index", 0))
            if taken is not None:
                choice["resae"] = convert.features_json(*taken)
        return b"data: " + json.dumps(data).encode() + b"\n\n"

    def _leftovers(self) -> bytes:
        """A chunk per choice whose features arrived after its last chunk."""
        out = b""
        for index in sorted(self.request.pending):
            taken = self.request.take(index)
            if taken is None:
                continue
            choice: dict[str, Any] = {"index": index, "finish_reason": None,
                                      "resae": convert.features_json(*taken)}
            if self.chat:
                choice["delta"] = {}
            else:
                choice["text"] = ""
            chunk: dict[str, Any] = {k: self.last[k] for k in ("id", "object", "created",
                                                               "model") if k in self.last}
            chunk["choices"] = [choice]
            out += b"data: " + json.dumps(chunk).encode() + b"\n\n"
        return out
