"""``benchmarks/gpu_check.py`` in CPU quick mode, so the GPU script never rots (~20-40 s); on a
host with CUDA also its op section there (graph-body parity inside CUDA-graph replay)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks._report import Section
from benchmarks.gpu_check import TITLES

REPO = Path(__file__).parents[2]


def _run(tmp_path: Path, *args: str) -> str:
    out = tmp_path / "gpu_check.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "RESAE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", *args, "--quick", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    report = out.read_text()
    assert "FAILED" not in report
    assert "All checks passed." in report
    return report


def test_quick_cpu_run_writes_every_section(tmp_path: Path) -> None:
    report = _run(tmp_path, "--device", "cpu")
    for title in TITLES.values():
        assert f"## {title}" in report


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_body_parity_inside_cuda_graph_replay(tmp_path: Path) -> None:
    report = _run(tmp_path, "--device", "cuda", "--sections", "a")
    assert "| CUDA graph replay |" in report


def test_section_markdown_marks_failures() -> None:
    section = Section("(x) demo", ["a", "b"], [["1", "2"]], ["a note"])
    assert section.markdown() == "## (x) demo\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\na note\n"
    section.ok = False
    assert section.markdown().startswith("## (x) demo — FAILED\n")
