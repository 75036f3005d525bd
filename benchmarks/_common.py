"""Helpers shared by benchmark scripts: machine description and appending to RESULTS.md."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def cpu_flags() -> str:
    """The vector extensions the CPU reports that matter for float32/bf16 GEMMs."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    wanted = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
    return ", ".join(f for f in wanted if f in flags) or "none of " + ", ".join(wanted)


def machine_description() -> str:
    """One line naming the CPU, its vector extensions, cores, torch threads and versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu} ({cpu_flags()}), {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads){gpu}, Python {platform.python_version()}")


def append_results(title: str, command: str, table: str, notes: str = "") -> None:
    """Append one dated section to benchmarks/RESULTS.md."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"\n## {title} — {stamp}\n\nMachine: {machine_description()}  \n"
               f"Command: `{command}`\n\n{table}\n" + (f"\n{notes}\n" if notes else ""))
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nEach section is appended by a script in "
                           "`benchmarks/`; ratios are measured side by side in one run.\n")
    with RESULTS.open("a") as f:
        f.write(section)
