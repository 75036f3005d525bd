"""RSS of a process and all its descendants (a server and its vLLM engine processes).

:func:`tree_rss` uses psutil when it is importable and else reads ``/proc`` alone
(:func:`proc_tree_rss`); :class:`MemorySampler` samples it on a thread, so samples keep coming
while an event loop in the same process is busy.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path

MIB = 2**20


def tree_rss(pid: int) -> tuple[int, int]:
    """RSS in bytes of ``pid`` and all its descendants, and how many processes that is."""
    try:
        import psutil
    except ImportError:
        return proc_tree_rss(pid)
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    total, n = 0, 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):          # exited meanwhile
            total += proc.memory_info().rss
            n += 1
    return total, n


def proc_tree_rss(pid: int) -> tuple[int, int]:
    """:func:`tree_rss` from ``/proc`` alone (parents from ``stat``, ``VmRSS`` from ``status``)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    total, n, todo = 0, 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        with contextlib.suppress(OSError, ValueError):
            status = Path(f"/proc/{current}/status").read_text()
            n += 1                                   # a zombie has no VmRSS line: 0 bytes
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total, n


@dataclass
class MemoryStats:
    """RSS of the server's process tree over a run, MiB."""

    pid: int
    start_mib: float
    end_mib: float
    max_mib: float
    growth_mib: float
    processes: int
    samples: int


class MemorySampler:
    """Samples :func:`tree_rss` of ``pid`` every ``interval_s`` on a daemon thread."""

    def __init__(self, pid: int, interval_s: float = 1.0) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.samples.append(tree_rss(self.pid))
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.samples.append(tree_rss(self.pid))

    def stats(self) -> MemoryStats | None:
        rss = [r for r, n in self.samples if n]
        if not rss:
            return None
        return MemoryStats(self.pid, rss[0] / MIB, rss[-1] / MIB, max(rss) / MIB,
                           (rss[-1] - rss[0]) / MIB, max(n for _, n in self.samples), len(rss))


def listening_pid(target: str) -> int | None:
    """The process listening on ``target``'s port, if psutil can tell."""
    try:
        import psutil

        port = int(target.rsplit(":", 1)[1])
        return next((c.pid for c in psutil.net_connections("tcp") if c.laddr
                     and c.laddr.port == port and c.status == psutil.CONN_LISTEN), None)
    except (ImportError, ValueError, IndexError, PermissionError):
        return None
