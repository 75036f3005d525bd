"""Optional bearer-token authentication for the ``grpc.aio`` server.

Tokens come from a file (one per line) and/or an environment variable (comma-separated);
:func:`load_tokens` returns an empty tuple when neither is set, which means auth is off.
:class:`BearerAuthInterceptor` checks metadata ``authorization: Bearer <token>`` on every call
except the health service, and ends a call without a valid token with ``UNAUTHENTICATED``.
Clients attach the header per call with :func:`bearer_metadata` or per channel with
:func:`bearer_interceptors` (``grpc.access_token_call_credentials`` only works over TLS; plain
metadata works on both).

Tokens are never logged or echoed: errors name the file and line or the variable and entry.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from resae_serve.errors import ResaeError

logger = logging.getLogger(__name__)

AUTH_ENV_VAR = "RESAE_AUTH_TOKENS"
MIN_TOKEN_LENGTH = 16
AUTHORIZATION_KEY = "authorization"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
UNAUTHENTICATED_MESSAGE = (
    "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'"
)
_TOKEN_HINT = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"


class AuthConfigError(ResaeError):
    """The auth tokens are missing, unreadable or unfit for use."""


def _check_token(token: str, source: str) -> None:
    """Raise :class:`AuthConfigError` naming ``source`` (never the token) if unfit."""
    if len(token) < MIN_TOKEN_LENGTH:
        raise AuthConfigError(
            f"{source}: token has {len(token)} characters, at least {MIN_TOKEN_LENGTH} are "
            f"required; {_TOKEN_HINT}")
    # gRPC metadata values are printable ASCII; a space would also break "Bearer <token>".
    if not all("!" <= ch <= "~" for ch in token):
        raise AuthConfigError(
            f"{source}: token contains whitespace or non-printable/non-ASCII characters; "
            f"only printable ASCII without spaces is allowed; {_TOKEN_HINT}")


def _tokens_from_file(token_file: Path) -> list[str]:
    """Tokens of ``token_file``: one per line, blank lines and ``#`` comments skipped."""
    try:
        text = token_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AuthConfigError(
            f"auth_token_file={token_file}: no such file; create it with one token per line "
            f"or unset the option to use {AUTH_ENV_VAR} only") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthConfigError(
            f"auth_token_file={token_file}: cannot be read ({exc}); check that it is a "
            "readable UTF-8 text file") from None
    tokens = []
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        _check_token(token, f"auth_token_file={token_file} line {number}")
        tokens.append(token)
    if not tokens:
        raise AuthConfigError(
            f"auth_token_file={token_file}: contains no tokens (only blank lines or comments); "
            f"add one token per line; {_TOKEN_HINT}")
    return tokens


def load_tokens(token_file: Path | None = None,
                env_var: str = AUTH_ENV_VAR) -> tuple[str, ...]:
    """Tokens from ``token_file`` and the comma-separated ``env_var``, deduplicated in order.

    An empty tuple (no file given, variable unset or blank) means auth is off. A given file
    that is missing, unreadable or holds no token raises :class:`AuthConfigError`, as does any
    token shorter than ``MIN_TOKEN_LENGTH`` characters.
    """
    tokens: list[str] = []
    if token_file is not None:
        tokens.extend(_tokens_from_file(Path(token_file)))
    for number, entry in enumerate(os.environ.get(env_var, "").split(","), start=1):
        token = entry.strip()
        if token:
            _check_token(token, f"{env_var} entry {number}")
            tokens.append(token)
    return tuple(dict.fromkeys(tokens))


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``: pass as ``metadata=`` to any stub call."""
    return ((AUTHORIZATION_KEY, f"Bearer {token}"),)


def _presented_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The credential of the first ``authorization: Bearer ...`` entry, if any."""
    for key, value in metadata or ():
        if key.lower() != AUTHORIZATION_KEY:
            continue
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        scheme, _, credential = value.strip().partition(" ")
        if scheme.lower() == "bearer" and credential.strip():
            return str(credential.strip())
        return None
    return None


def _denying_handler(handler: grpc.RpcMethodHandler | None, method: str,
                     reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape (and (de)serializers) as ``handler`` that aborts the call.

    Keeping the real (de)serializers means a malformed request fails exactly as it would for
    an authenticated caller; an unknown method also answers ``UNAUTHENTICATED`` so that
    unauthenticated callers cannot probe which methods exist.
    """

    async def deny(context: grpc.aio.ServicerContext) -> None:
        logger.info("rejected %s from %s: %s", method, context.peer(), reason)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    async def deny_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await deny(context)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await deny(context)
        yield None  # never reached: abort raises; the yield makes this an async generator

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(deny_unary)
    codec = {"request_deserializer": handler.request_deserializer,
             "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **codec)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny_unary, **codec)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **codec)
    return grpc.unary_unary_rpc_method_handler(deny_unary, **codec)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Ends every call without a configured bearer token with ``UNAUTHENTICATED``.

    Methods whose full name starts with one of ``exempt_prefixes`` (the health service by
    default) pass without a token. The presented token is compared with every configured
    token in constant time, without stopping at the first match.
    """

    def __init__(self, tokens: Sequence[str],
                 exempt_prefixes: Sequence[str] = (HEALTH_PREFIX,)) -> None:
        if isinstance(tokens, str):
            raise TypeError("tokens must be a sequence of strings, not one string")
        if not tokens:
            raise AuthConfigError(
                "auth is enabled but no token is configured: give auth_token_file or set "
                f"{AUTH_ENV_VAR}, or leave auth off")
        for number, token in enumerate(tokens, start=1):
            _check_token(token, f"token {number}")
        self._tokens = tuple(token.encode("ascii") for token in tokens)
        self._exempt_prefixes = tuple(exempt_prefixes)

    def is_authorized(self, metadata: Sequence[tuple[str, Any]] | None) -> bool:
        """Whether ``metadata`` carries a bearer token equal to one of the configured ones."""
        presented = _presented_token(metadata)
        if presented is None:
            return False
        candidate = presented.encode("utf-8", "replace")
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(candidate, token)
        return matched

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Pass exempt and authorized calls on; answer the rest with a denying handler."""
        method = handler_call_details.method
        if method.startswith(self._exempt_prefixes):
            return await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata
        if self.is_authorized(metadata):
            return await continuation(handler_call_details)
        reason = ("no bearer token" if _presented_token(metadata) is None
                  else "unknown bearer token")
        return _denying_handler(await continuation(handler_call_details), method, reason)


def _with_bearer(metadata: Any, token: str) -> grpc.aio.Metadata:
    """``metadata`` (``None``, pairs or ``grpc.aio.Metadata``) with our authorization entry."""
    pairs = [(key, value) for key, value in (metadata or ())
             if key.lower() != AUTHORIZATION_KEY]
    return grpc.aio.Metadata(*pairs, *bearer_metadata(token))


class _BearerClientInterceptor:
    """Shared part of the client interceptors: call details with the bearer token added."""

    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(
            method=details.method, timeout=details.timeout,
            metadata=_with_bearer(details.metadata, self._token),
            credentials=details.credentials, wait_for_ready=details.wait_for_ready)


class _UnaryUnaryBearer(_BearerClientInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Callable[..., Any],
                                    client_call_details: grpc.aio.ClientCallDetails,
                                    request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _UnaryStreamBearer(_BearerClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Callable[..., Any],
                                     client_call_details: grpc.aio.ClientCallDetails,
                                     request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _StreamUnaryBearer(_BearerClientInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Callable[..., Any],
                                     client_call_details: grpc.aio.ClientCallDetails,
                                     request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _StreamStreamBearer(_BearerClientInterceptor, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Callable[..., Any],
                                      client_call_details: grpc.aio.ClientCallDetails,
                                      request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def bearer_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors adding ``authorization: Bearer <token>`` to every call.

    Pass them as ``grpc.aio.insecure_channel(target, interceptors=bearer_interceptors(t))``
    (or ``secure_channel``); an authorization entry already in a call's metadata is replaced.
    One object per call kind: grpc.aio files an interceptor under the first kind it is an
    instance of, so a single class deriving from several kinds would only see unary calls.
    """
    return [_UnaryUnaryBearer(token), _UnaryStreamBearer(token), _StreamUnaryBearer(token),
            _StreamStreamBearer(token)]
