"""Drivers: vLLM engines behind the small interface :class:`~.serving.ResaeEngine` uses.

This is where vLLM's types and exceptions meet this project's. A driver turns a
:class:`~resae_serve.engine.spec.SamplingSpec` and the request's
:class:`~resae_serve.engine.spec.SteeringSpec` into vLLM's ``SamplingParams`` (the steering
rides in ``extra_args``), raises :class:`~resae_serve.errors.EngineRequestError` where vLLM
refuses a request and :class:`~resae_serve.errors.EngineDeadError` where its engine has died,
and reports liveness. vLLM is imported only when a driver runs.

- :class:`AsyncLLMDriver` wraps vLLM's ``AsyncLLM`` (the server).
- :class:`LLMDriver` wraps an offline ``vllm.LLM``: all engine calls run on the event loop's
  thread (``LLMEngine`` is not thread-safe); one stepping task advances every live request and
  routes outputs to their streams, yielding to the loop between steps. For notebooks, tests
  and batch jobs that already hold an ``LLM``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from resae_serve.engine.spec import SamplingSpec, SteeringSpec
from resae_serve.errors import EngineDeadError, EngineRequestError


class Driver(Protocol):
    """What :class:`~resae_serve.engine.serving.ResaeEngine` needs of an engine."""

    def generate(self, prompt: dict[str, Any], sampling: SamplingSpec, steering: SteeringSpec,
                 request_id: str) -> AsyncIterator[Any]:
        """vLLM ``RequestOutput`` s of one request (cumulative ``outputs[0].token_ids`` and
        ``.text``, ``finished``); ``prompt`` is a vLLM prompt dict."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def collective_rpc(self, method: str, timeout: float | None = None,
                             args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
                             ) -> list[Any]: ...

    @property
    def errored(self) -> bool:
        """The engine has died and serves no more requests."""
        ...

    def num_unfinished(self) -> int:
        """Requests the engine has not finished (including aborted ones not yet cleaned up)."""
        ...

    def shutdown(self) -> None: ...


def sampling_params(sampling: SamplingSpec, steering: SteeringSpec | None = None) -> Any:
    """vLLM ``SamplingParams`` for ``sampling``, carrying ``steering`` in ``extra_args``.

    Raises :class:`EngineRequestError` (``"sampling: ..."``) for values vLLM refuses."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError

    try:
        params = SamplingParams(max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                                top_p=sampling.top_p, top_k=sampling.top_k, seed=sampling.seed,
                                stop=list(sampling.stop), ignore_eos=sampling.ignore_eos)
    except (ValueError, VLLMClientError) as exc:              # vLLM's own checks
        raise EngineRequestError(f"sampling: {exc}") from exc
    if steering is not None:
        params.extra_args = {**(params.extra_args or {}), **steering.to_extra_args()}
    return params


@contextmanager
def _translated() -> Iterator[None]:
    """vLLM's request and engine-death errors as this project's."""
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

    try:
        yield
    except VLLMClientError as exc:                            # vLLM's 4xx
        raise EngineRequestError(f"the engine refused the request: {exc}") from exc
    except VllmEngineDeadError as exc:
        raise EngineDeadError("the engine stopped") from exc


class AsyncLLMDriver:
    """vLLM's ``AsyncLLM`` as a :class:`Driver`."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    async def generate(self, prompt: dict[str, Any], sampling: SamplingSpec,
                       steering: SteeringSpec, request_id: str) -> AsyncIterator[Any]:
        params = sampling_params(sampling, steering)
        stream = self.llm.generate(prompt, params, request_id)
        try:
            with _translated():
                async for out in stream:
                    yield out
        finally:            # closing it aborts the request in vLLM when it has not finished
            await stream.aclose()

    async def abort(self, request_id: str) -> None:
        with _translated():
            await self.llm.abort(request_id)

    async def collective_rpc(self, method: str, timeout: float | None = None,
                             args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
                             ) -> list[Any]:
        with _translated():
            result: list[Any] = await self.llm.collective_rpc(method, timeout=timeout,
                                                              args=args, kwargs=kwargs)
        return result

    @property
    def errored(self) -> bool:
        return bool(self.llm.errored)

    def num_unfinished(self) -> int:
        return int(self.llm.get_num_unfinished_requests())

    def shutdown(self) -> None:
        self.llm.shutdown()


class LLMDriver:
    """An offline ``vllm.LLM`` as a :class:`Driver` (stepped on the event loop's thread)."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.engine = llm.llm_engine
        self._streams: dict[str, asyncio.Queue[Any]] = {}
        self._task: asyncio.Task[None] | None = None

    async def generate(self, prompt: dict[str, Any], sampling: SamplingSpec,
                       steering: SteeringSpec, request_id: str) -> AsyncIterator[Any]:
        params = sampling_params(sampling, steering)
        stream: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[request_id] = stream
        try:
            with _translated():
                self.engine.add_request(request_id, prompt, params)
            if self._task is None or self._task.done():
                self._task = asyncio.ensure_future(self._step_loop())
            while True:
                out = await stream.get()
                if isinstance(out, BaseException):
                    with _translated():
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
        with _translated():
            self.engine.abort_request([request_id])

    async def collective_rpc(self, method: str, timeout: float | None = None,
                             args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
                             ) -> list[Any]:
        with _translated():
            result: list[Any] = self.llm.collective_rpc(method, timeout=timeout, args=args,
                                                        kwargs=kwargs)
        return result

    @property
    def errored(self) -> bool:
        resources = getattr(getattr(self.engine, "engine_core", None), "resources", None)
        return bool(getattr(resources, "engine_dead", False))

    def num_unfinished(self) -> int:
        return int(self.engine.get_num_unfinished_requests())

    def shutdown(self) -> None:
        self.engine.engine_core.shutdown()
