"""Health probe: ask a server's standard ``grpc.health.v1`` service whether it is serving.

    python -m resae_serve.server.healthcheck [--target HOST:PORT] [--timeout 3]
        [--service resae.v1.ResaeService] [--tls-ca PEM [--tls-cert PEM --tls-key PEM]]
        [--server-name NAME] [--token TOKEN]

Exit status 0 when the answer is ``SERVING``; 1 for anything else (``NOT_SERVING`` while the
engine loads or after it died, an unknown service, nothing listening, a deadline exceeded, an
unusable TLS file), so it fits Docker's ``HEALTHCHECK`` (0 healthy, 1 unhealthy) and exec
probes. Prints one line saying what it saw. ``--service ""`` (the default) asks about the
server as a whole; the server reports the same status for ``resae.v1.ResaeService``.

Every option has an environment fallback so a fixed ``HEALTHCHECK`` line can follow the
server's settings without rebuilding the image: ``RESAE_HEALTH_TARGET`` (default
``127.0.0.1:50051``), ``RESAE_HEALTH_TLS_CA`` / ``RESAE_HEALTH_TLS_CERT`` /
``RESAE_HEALTH_TLS_KEY`` (TLS when any is set, as for the client), ``RESAE_HEALTH_SERVER_NAME``
(the name the server certificate must carry when it does not list the target's host) and
``RESAE_TOKEN`` (bearer token, as for ``resae client``; the server lets health calls through
without one, a proxy in front of it may not).

Only grpcio and the health stubs are imported (no torch), so a probe costs ~0.1 s of CPU.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from resae_serve.server.auth import bearer_metadata
from resae_serve.server.tls import TLSConfigError, channel_credentials

logger = logging.getLogger(__name__)

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 3.0
TARGET_ENV = "RESAE_HEALTH_TARGET"
TLS_CA_ENV = "RESAE_HEALTH_TLS_CA"
TLS_CERT_ENV = "RESAE_HEALTH_TLS_CERT"
TLS_KEY_ENV = "RESAE_HEALTH_TLS_KEY"
SERVER_NAME_ENV = "RESAE_HEALTH_SERVER_NAME"
TOKEN_ENV = "RESAE_TOKEN"
EXIT_SERVING = 0
EXIT_UNHEALTHY = 1


class HealthOutput(NamedTuple):
    """What one probe saw."""

    serving: bool
    """True only for a ``SERVING`` answer."""
    status: str
    """``SERVING``, ``NOT_SERVING``, ``UNKNOWN`` or ``SERVICE_UNKNOWN``, or the gRPC status code
    of a failed call (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ``NOT_FOUND``, ...)."""
    detail: str
    """The failed call's details (first line); empty for an answer."""
    elapsed_s: float
    """Seconds from opening the channel to the answer or the failure."""


def check_health(target: str, *, service: str = "", timeout: float = DEFAULT_TIMEOUT_S,
                 credentials: grpc.ChannelCredentials | None = None,
                 server_name: str | None = None, token: str | None = None) -> HealthOutput:
    """One ``grpc.health.v1.Health/Check`` call to ``target`` with a ``timeout`` (s) deadline.

    Plaintext unless ``credentials`` are given; ``server_name`` overrides the name checked
    against the server certificate. Never raises for RPC failures: they come back as a
    non-serving :class:`HealthOutput` with the status code's name.
    """
    if timeout <= 0:
        raise ValueError(f"timeout={timeout}: must be > 0 seconds")
    options: list[tuple[str, str]] = []
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    start = time.monotonic()
    channel = (grpc.insecure_channel(target, options=options) if credentials is None
               else grpc.secure_channel(target, credentials, options=options))
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            # No wait_for_ready: a refused connection fails at once instead of at the deadline.
            response = stub.Check(health_pb2.HealthCheckRequest(service=service),
                                  timeout=timeout,
                                  metadata=bearer_metadata(token) if token else None)
        except grpc.RpcError as exc:
            logger.debug("health check of %s failed", target, exc_info=True)
            code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = (exc.details() if isinstance(exc, grpc.Call) else None) or ""
            return HealthOutput(False, code.name, details.strip().splitlines()[0] if details
                                else "", time.monotonic() - start)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return HealthOutput(response.status == health_pb2.HealthCheckResponse.SERVING, status, "",
                        time.monotonic() - start)


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value) if value else None


def build_parser() -> argparse.ArgumentParser:
    """The probe's argument parser (defaults read from the environment at call time)."""
    p = argparse.ArgumentParser(
        prog="python -m resae_serve.server.healthcheck",
        description="Exit 0 when the gRPC health service answers SERVING, else 1.")
    p.add_argument("--target", metavar="HOST:PORT",
                   default=os.environ.get(TARGET_ENV) or DEFAULT_TARGET,
                   help=f"server address (default: ${TARGET_ENV} or {DEFAULT_TARGET})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="deadline of the check, connecting included (default: %(default)s)")
    p.add_argument("--service", default="",
                   help="service to ask about, e.g. resae.v1.ResaeService (default: '' = the "
                   "whole server)")
    p.add_argument("--tls-ca", type=Path, metavar="PEM", default=_env_path(TLS_CA_ENV),
                   help=f"CA certificate to verify the server; enables TLS (${TLS_CA_ENV})")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", default=_env_path(TLS_CERT_ENV),
                   help=f"client certificate for mutual TLS, with --tls-key (${TLS_CERT_ENV})")
    p.add_argument("--tls-key", type=Path, metavar="PEM", default=_env_path(TLS_KEY_ENV),
                   help=f"client private key (${TLS_KEY_ENV})")
    p.add_argument("--server-name", default=os.environ.get(SERVER_NAME_ENV) or None,
                   help="name the server certificate must carry, when the target's host is "
                   f"not in it (${SERVER_NAME_ENV})")
    p.add_argument("--token", default=None, help=f"bearer token (default: ${TOKEN_ENV})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one probe; write one status line to stdout; return the exit status (0 or 1)."""
    args = build_parser().parse_args(argv)
    where = f"{args.target} service {args.service!r}"
    tls = (args.tls_ca, args.tls_cert, args.tls_key) != (None, None, None)
    try:
        credentials = (channel_credentials(args.tls_ca, args.tls_cert, args.tls_key) if tls
                       else None)
        output = check_health(args.target, service=args.service, timeout=args.timeout,
                              credentials=credentials, server_name=args.server_name,
                              token=args.token or os.environ.get(TOKEN_ENV) or None)
    except (TLSConfigError, ValueError) as exc:
        sys.stdout.write(f"ERROR: {where}: {exc}\n")
        return EXIT_UNHEALTHY
    detail = f": {output.detail}" if output.detail else ""
    sys.stdout.write(f"{output.status}: {where} ({output.elapsed_s * 1000:.0f} ms){detail}\n")
    return EXIT_SERVING if output.serving else EXIT_UNHEALTHY


if __name__ == "__main__":
    sys.exit(main())
