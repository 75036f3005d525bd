"""Drive an offline ``vllm.LLM`` through the async API (:class:`~.serving.ResaeEngine`).

:class:`LLMDriver` gives ``LLM.llm_engine`` the three methods of ``AsyncLLM`` that the wrapper
uses. All engine calls run on the event loop's thread (``LLMEngine`` is not thread-safe); one
stepping task advances every live request and routes outputs to their streams, yielding to the
loop between steps. For notebooks, tests and batch jobs that already hold an ``LLM``; a server
uses ``AsyncLLM`` (:func:`~resae_serve.engine.llm.build_async_llm`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any


class LLMDriver:
    """``AsyncLLM``-shaped view of a synchronous ``vllm.LLM``."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.engine = llm.llm_engine
        self._streams: dict[str, asyncio.Queue[Any]] = {}
        self._task: asyncio.Task[None] | None = None

    async def generate(self, prompt: Any, sampling_params: Any,
                       request_id: str) -> AsyncIterator[Any]:
        stream: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[request_id] = stream
        try:
            self.engine.add_request(request_id, prompt, sampling_params)
            if self._task is None or self._task.done():
                self._task = asyncio.ensure_future(self._step_loop())
            while True:
                out = await stream.get()
                if isinstance(out, BaseException):
                    raise out
                yield out
                if out.finished:
                    return
        finally:
            self._streams.pop(request_id, None)

    async def _step_loop(self) -> None:
        while self.engine.has_unfinished_requests():
            try:
                outputs = self.engine.step()
            except Exception as exc:  # every waiting stream gets the failure
                for stream in self._streams.values():
                    stream.put_nowait(exc)
                raise
            for out in outputs:
                target = self._streams.get(out.request_id)
                if target is not None:
                    target.put_nowait(out)
            await asyncio.sleep(0)

    async def abort(self, request_id: str) -> None:
        self.engine.abort_request([request_id])

    async def collective_rpc(self, method: str, timeout: float | None = None,
                             args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
                             ) -> list[Any]:
        result: list[Any] = self.llm.collective_rpc(method, timeout=timeout, args=args,
                                                    kwargs=kwargs)
        return result
