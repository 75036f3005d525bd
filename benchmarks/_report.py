"""Shared pieces of ``benchmarks/gpu_check.py`` and its section modules: a result section, the
report file, a time budget and a device-aware median timer.

A :class:`Section` is one table with notes; ``ok=False`` marks a parity or functional check
that failed (the script then exits non-zero). :func:`median_seconds` times a callable after
warm-up, with CUDA events on a GPU and ``time.perf_counter`` on a CPU.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

FAILED = "FAILED"
"""The marker a failed section carries in its heading (the CPU test greps for it)."""


@dataclass
class Section:
    """One section of the report: a table, free-text notes and whether its checks passed."""

    title: str
    """Heading, e.g. ``"(b) SAE training step throughput"``."""
    header: list[str] = field(default_factory=list)
    """Column names of the table (no table when empty)."""
    rows: list[list[str]] = field(default_factory=list)
    """Table cells, already formatted; each row as long as ``header``."""
    notes: list[str] = field(default_factory=list)
    """Paragraphs after the table: what was measured, what was skipped and why."""
    ok: bool = True
    """``False`` when a parity or functional check failed (or the section raised)."""

    def markdown(self) -> str:
        """The section as Markdown: ``## title``, a pipe table, then the notes."""
        heading = self.title if self.ok else f"{self.title} — {FAILED}"
        parts = [f"## {heading}"]
        if self.header:
            lines = ["| " + " | ".join(self.header) + " |",
                     "|" + "|".join("---" for _ in self.header) + "|"]
            lines += ["| " + " | ".join(row) + " |" for row in self.rows]
            parts.append("\n".join(lines))
        parts += self.notes
        return "\n\n".join(parts) + "\n"


class Budget:
    """A wall-clock budget shared by the sections of one run."""

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s
        self.start = time.monotonic()

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.start

    def left(self) -> float:
        """Seconds left of the whole budget (negative once it is spent)."""
        return self.total_s - self.elapsed()

    def deadline(self, share: float) -> float:
        """A ``time.monotonic()`` deadline ``share`` (0..1] of the time left from now."""
        return time.monotonic() + max(self.left(), 0.0) * share


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, *, warmup: int = 2,
                   repeats: int = 10, max_seconds: float = 5.0) -> float:
    """Median wall time of one ``fn()`` call, after ``warmup`` untimed calls.

    Stops early (at least 3 timed calls) once ``max_seconds`` are spent timing.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats and (len(times) < 3 or spent < max_seconds):
        if device.type == "cuda":
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        spent += times[-1]
    return statistics.median(times)


def matmul_tflops(n: int, dtype: torch.dtype, device: torch.device) -> float:
    """Measured rate of an ``(n, n) @ (n, n)`` product in ``dtype`` on ``device``, TFLOP/s."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = median_seconds(lambda: a @ b, device, warmup=3, repeats=20)
    return 2 * n**3 / seconds / 1e12


def fmt(value: float, digits: int = 3) -> str:
    """A number with ``digits`` significant digits, thousands separated when large."""
    if value >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def guarded(title: str, fn: Callable[[], Section]) -> Section:
    """``fn()``, or a failed section titled ``title`` holding the end of the traceback.

    Restores the TF32 switch a section may have flipped, so sections do not leak it.
    """
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        return fn()
    except Exception as exc:  # one section's failure is reported; the others still run
        logger.exception("%s failed", title)
        tail = "".join(traceback.format_exception(exc)).splitlines()[-25:]
        return Section(title, ok=False, notes=["Raised:\n\n```\n" + "\n".join(tail) + "\n```"])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _driver() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else "unknown"


def machine_header(title: str, mode: str, device: torch.device) -> str:
    """Markdown heading and lines naming the date, mode, GPU, CPU and package versions."""
    gpu = "none"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = (f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}"
               f"{props.minor}), driver {_driver()}, CUDA {torch.version.cuda} (torch build)")
    ort = _version("onnxruntime")
    if ort == "not installed":
        ort = f"{_version('onnxruntime-gpu')} (onnxruntime-gpu)"
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        f"# {title}", "", f"- Date: {stamp}", f"- Mode: {mode}", f"- GPU: {gpu}",
        f"- CPU: {os.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}",
        f"- Versions: torch {torch.__version__}, transformers {_version('transformers')}, "
        f"onnx {_version('onnx')}, onnxruntime {ort}", ""])


def write_report(path: Path, header: str, sections: list[Section], footer: str = "") -> None:
    """Rewrite the whole report file atomically (a reader never sees half of it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + "\n" + "\n".join(s.markdown() for s in sections) + footer)
    tmp.replace(path)
