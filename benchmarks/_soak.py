"""Helpers of long load runs: a ``resae serve`` child process, and the RSS of every process of
a server over time.

:func:`serve_child` starts the server the way an operator does (``python -m resae_serve serve``,
its own process tree, default memory sizing unless flags say otherwise) and stops it with
SIGTERM. :class:`ProcessSampler` records the RSS of a process and of each descendant (vLLM
EngineCore, worker, resource tracker) separately, on a thread, so growth shows per process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

logger = logging.getLogger(__name__)
MIB = 2**20


@dataclass
class ProcessSeries:
    """One process's RSS over a run (MiB; times in seconds from the first sample)."""

    pid: int
    name: str
    times_s: list[float]
    rss_mib: list[float]

    @property
    def growth_pct(self) -> float:
        """End over start, in percent."""
        return 100 * (self.rss_mib[-1] - self.rss_mib[0]) / self.rss_mib[0]


def _label(proc: psutil.Process, root: bool) -> str:
    """A process's role: vLLM names its own (``VLLM::EngineCore``, ``VLLM::Worker``)."""
    name = str(proc.name())
    command = " ".join(proc.cmdline())
    if "resource_tracker" in command:
        return "resource tracker"
    if root:
        return "resae serve" if "resae_serve" in command else "load + in-process server"
    return name


class ProcessSampler:
    """RSS of ``pid`` and of each descendant, every ``interval_s`` seconds, on a thread."""

    def __init__(self, pid: int, interval_s: float = 5.0) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[tuple[float, dict[int, tuple[str, int]]]] = []
        self._start = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[int, tuple[str, int]]:
        """{pid: (name, RSS bytes)} of the tree now."""
        import psutil

        found: dict[int, tuple[str, int]] = {}
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):               # exited meanwhile
                    found[proc.pid] = (_label(proc, proc.pid == self.pid),
                                       proc.memory_info().rss)
        return found

    def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic() - self._start, self.sample()))
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> ProcessSampler:
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.samples.append((time.monotonic() - self._start, self.sample()))

    def series(self) -> list[ProcessSeries]:
        """Every process seen in the first sample, with its samples (root first)."""
        if not self.samples:
            return []
        out = []
        for pid, (name, _) in self.samples[0][1].items():
            points = [(t, s[pid][1]) for t, s in self.samples if pid in s]
            out.append(ProcessSeries(pid, name, [t for t, _ in points],
                                     [r / MIB for _, r in points]))
        return out


def rss_tables(series: Sequence[ProcessSeries], every_s: float = 60.0) -> str:
    """Markdown: each process's start / end / max RSS and growth, then RSS every ``every_s``."""
    rows = ["| process | pid | start MiB | end MiB | max MiB | growth |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for s in series:
        rows.append(f"| {s.name} | {s.pid} | {s.rss_mib[0]:.0f} | {s.rss_mib[-1]:.0f} | "
                    f"{max(s.rss_mib):.0f} | {s.growth_pct:+.1f} % |")
    if not series:
        return "\n".join(rows)
    rows += ["", "| minute | " + " | ".join(s.name for s in series) + " |",
             "| ---: | " + " | ".join("---:" for _ in series) + " |"]
    end = max(s.times_s[-1] for s in series)
    mark = 0.0
    while mark <= end + 1e-6:
        cells = []
        for s in series:
            i = min(range(len(s.times_s)), key=lambda j: abs(s.times_s[j] - mark))
            cells.append(f"{s.rss_mib[i]:.0f}")
        rows.append(f"| {mark / 60:.0f} | " + " | ".join(cells) + " |")
        mark += every_s
    return "\n".join(rows)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _health(port: int) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return int(health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5).status)
        except grpc.RpcError:
            return -1


@contextlib.contextmanager
def serve_child(dictionary: Path, flags: Sequence[str], log: Path,
                timeout_s: float = 1800) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``python -m resae_serve serve DICTIONARY FLAGS`` on a free port, once SERVING; stopped
    with SIGTERM (killed after 120 s). Yields the process and its port."""
    from grpc_health.v1 import health_pb2

    port = free_port()
    command = [sys.executable, "-m", "resae_serve", "serve", str(dictionary), "--port",
               str(port), "--metrics-port", "-1", *flags]
    logger.info("starting %s (log %s)", " ".join(command), log)
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                   env=dict(os.environ))
    try:
        deadline = time.monotonic() + timeout_s
        while _health(port) != health_pb2.HealthCheckResponse.SERVING:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited {process.returncode}: "
                                   f"{log.read_text()[-2000:]}")
            if "the engine failed to load" in log.read_text(errors="replace"):
                raise RuntimeError(f"the server's engine failed to load (log {log}): "
                                   f"{log.read_text(errors='replace')[-2000:]}")   # it stays up
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server is not SERVING after {timeout_s} s (log {log})")
            time.sleep(1.0)
        yield process, port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
