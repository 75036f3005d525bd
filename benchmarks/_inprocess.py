"""A resae server running inside a benchmark's process, on its own event-loop thread.

As in ``benchmarks/server.py``: a random dictionary of the real one's shape (4 layers × 4608
latents, k 32) whose manifest carries the embedded model's true fingerprint, served by the
compiled SmolLM2-135M engine. Clients run on another loop (their own thread or the main one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")


class LoopThread:
    """An event loop on a daemon thread (the in-process server runs there)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 1800) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextlib.contextmanager
def in_process_server(streams: int, tokens: int, max_pending: int, kv_cache_gib: int, *,
                      loop: LoopThread | None = None, watch: Any = None) -> Iterator[Any]:
    """A started server on a loop thread of this process: ``loop``, or one of its own;
    ``watch``: its :class:`~resae_serve.server.config.WatchSettings` (server-wide monitors)."""
    from benchmarks.engine import random_dictionary
    from resae_serve.fingerprint import model_fingerprint
    from resae_serve.models import resolve_model
    from resae_serve.server.app import create_server
    from resae_serve.server.config import EngineSettings, Limits, ServerConfig

    with tempfile.TemporaryDirectory() as tmp:
        folder = random_dictionary(Path(tmp) / "dict")
        manifest_path = folder / "manifest.json"
        manifest = json.loads(manifest_path.read_text())       # the real model's fingerprint
        manifest["model"]["fingerprint"] = model_fingerprint(resolve_model("smollm2-135m"))
        manifest_path.write_text(json.dumps(manifest))
        config = ServerConfig(dictionary=folder, port=0, metrics_port=None,
                              limits=Limits(max_tokens=max(tokens, 64), max_pending=max_pending),
                              engine=EngineSettings(max_num_seqs=streams, max_model_len=512,
                                                    kv_cache_gib=kv_cache_gib))
        if watch is not None:
            config = replace(config, watch=watch)
        server_loop = loop or LoopThread()

        async def start() -> Any:
            server, _ = await create_server(config)
            await server.start()
            if not await server.wait_ready(1800):
                raise RuntimeError("the engine failed to load")
            return server

        logger.info("starting the server and engine (compiled; a minute or two)")
        server = server_loop.run(start())
        try:
            yield server
        finally:
            server_loop.run(server.stop(0))
            if loop is None:
                server_loop.loop.call_soon_threadsafe(server_loop.loop.stop)
