"""One interceptor that maps library errors to gRPC status codes and counts every call.

Domain code raises its own errors and knows nothing of gRPC; this table decides the status.
``INTERNAL`` says only "internal error" with an id to find the traceback in the log (no paths,
no exception text reach the client). Cancellation and deadlines are counted, not logged as
failures.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc

from resae_serve.catalog import CatalogError
from resae_serve.errors import EngineDeadError, EngineRequestError
from resae_serve.interventions import InterventionError
from resae_serve.server.convert import RequestError

logger = logging.getLogger(__name__)
SERVICE_PREFIX = "/resae.v1.ResaeService/"


class ServiceError(Exception):
    """An error whose status code the service chose (UNAVAILABLE, RESOURCE_EXHAUSTED, ...)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class CallRecorder(Protocol):
    def record_request(self, rpc: str, code: grpc.StatusCode) -> None: ...


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message of an exception raised by a handler."""
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, RequestError | InterventionError | CatalogError | EngineRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, EngineDeadError):
        return (grpc.StatusCode.UNAVAILABLE,
                "the engine stopped; this server is not serving (retry on another replica)")
    incident = uuid.uuid4().hex[:12]
    logger.error("internal error %s", incident, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (incident {incident} in the server log)"


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every ``resae.v1.ResaeService`` handler: errors → status, calls → metrics."""

    def __init__(self, recorder: CallRecorder | None = None) -> None:
        self.recorder = recorder

    def _record(self, rpc: str, code: grpc.StatusCode) -> None:
        if self.recorder is not None:
            self.recorder.record_request(rpc, code)

    async def _fail(self, exc: BaseException, context: grpc.aio.ServicerContext,
                    rpc: str) -> None:
        if isinstance(exc, GeneratorExit):      # grpc finalizes a stream cancelled mid-send
            self._record(rpc, grpc.StatusCode.CANCELLED)
            raise exc
        if isinstance(exc, asyncio.CancelledError):
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            self._record(rpc, grpc.StatusCode.DEADLINE_EXCEEDED if expired
                         else grpc.StatusCode.CANCELLED)
            raise exc
        if isinstance(exc, grpc.aio.AbortError):
            self._record(rpc, context.code() or grpc.StatusCode.UNKNOWN)
            raise exc
        code, message = status_for(exc)
        self._record(rpc, code)
        if code != grpc.StatusCode.INTERNAL:
            logger.info("%s -> %s: %s", rpc, code.name, message)
        await context.abort(code, message)

    def _unary(self, rpc: str, behaviour: Callable[[Any, Any], Awaitable[Any]]
               ) -> Callable[[Any, Any], Awaitable[Any]]:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                result = await behaviour(request, context)
            except BaseException as exc:  # re-raised or mapped
                await self._fail(exc, context, rpc)
                raise
            self._record(rpc, grpc.StatusCode.OK)
            return result
        return handle

    def _stream(self, rpc: str, behaviour: Callable[[Any, Any], AsyncIterator[Any]]
                ) -> Callable[[Any, Any], AsyncIterator[Any]]:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in behaviour(request, context):
                    yield item
            except BaseException as exc:  # re-raised or mapped
                await self._fail(exc, context, rpc)
                raise
            self._record(rpc, grpc.StatusCode.OK)
        return handle

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails],
                                     Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        rpc = method.removeprefix(SERVICE_PREFIX)
        deserialize = _lenient(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(rpc, _checked(handler.unary_unary, rpc)),
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(rpc, _checked_stream(handler.unary_stream, rpc)),
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer)
        return handler


class _Undecodable:
    """What the lenient deserializer returns for bytes that are not the request message."""


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """Malformed bytes become :class:`_Undecodable` (then INVALID_ARGUMENT), not grpc's
    INTERNAL "Exception deserializing request"."""
    if deserializer is None:
        return None
    parse = deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception:  # protobuf raises DecodeError, and others on nonsense
            return _Undecodable()
    return deserialize


def _reject(request: Any, rpc: str) -> None:
    if isinstance(request, _Undecodable):
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"the request is not a valid resae.v1.{rpc}Request message")


def _checked(behaviour: Callable[[Any, Any], Awaitable[Any]], rpc: str
             ) -> Callable[[Any, Any], Awaitable[Any]]:
    async def handle(request: Any, context: Any) -> Any:
        _reject(request, rpc)
        return await behaviour(request, context)
    return handle


def _checked_stream(behaviour: Callable[[Any, Any], AsyncIterator[Any]], rpc: str
                    ) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def handle(request: Any, context: Any) -> AsyncIterator[Any]:
        _reject(request, rpc)
        async for item in behaviour(request, context):
            yield item
    return handle
