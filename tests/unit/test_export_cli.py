"""``resae export``: graphs, check and error paths on a tiny dictionary (in-process, and through
the installed console script), and the per-graph parity summary."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resae_serve.artifact import save_artifact
from resae_serve.cli import main
from resae_serve.export.spec import EXPORT_MANIFEST
from resae_serve.export.validate import OutputCheck, summarize, worst_check
from resae_serve.resae import ReSAE
from resae_serve.saes import SAEConfig, build_sae
from tests.unit.resae_fixtures import D_MODEL, IDENTITY, LAYERS, K, tiny_resae


@pytest.fixture
def dictionary(tmp_path: Path) -> Path:
    return save_artifact(tiny_resae("resae", "relu"), tmp_path / "dict", IDENTITY)


def test_export_with_check_and_fp16(dictionary: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "export"
    assert main(["-q", "export", str(dictionary), "--out", str(out), "--fp16", "--check",
                 "--graphs", "encode,decode"]) == 0
    printed = capsys.readouterr().out
    assert "encode.onnx" in printed and "decode.fp16.onnx" in printed
    assert "parity vs torch ReSAE" in printed and "max abs" in printed
    manifest = json.loads((out / EXPORT_MANIFEST).read_text())
    assert [g["file"] for g in manifest["graphs"]] == [
        "encode.onnx", "decode.onnx", "encode.fp16.onnx", "decode.fp16.onnx"]
    assert manifest["validation"]["passed"]
    assert manifest["artifact"]["path"] == str(dictionary.resolve())


def test_export_errors_exit_2(dictionary: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "is not a resae dictionary folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(dictionary), "--out", str(tmp_path / "x"), "--graphs", "fwd"])
    assert "allowed: comma-separated names from encode" in capsys.readouterr().err
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed: the missing-package path cannot be shown")
    code = main(["-q", "export", str(dictionary), "--out", str(tmp_path / "trt"), "--graphs",
                 "encode", "--tensorrt"])
    assert code == 2
    assert "pip install 'resae-serve[gpu]'" in capsys.readouterr().err


# ------------------------------------------------------------------ the parity report, per graph

def _check(output: str = "values_1", max_abs: float = 0.0, allowed: float = 1e-4, *,
           probe: str = "random", mismatches: int = 0, ties: int = 0) -> OutputCheck:
    return OutputCheck("encode", "float32", probe, output, 64, max_abs, max_abs, allowed,
                       "token 0, column 0", tie_tokens=ties, index_mismatch_tokens=mismatches)


def test_summary_of_an_exact_graph_names_no_tolerance() -> None:
    checks = [_check("indices_1", allowed=0.0), _check("values_1"), _check("watched_1")]
    assert worst_check(checks).output == "values_1"   # not the integer output, allowed 0
    assert summarize(checks) == "exact: max abs 0 in all 3 checks"
    ties = [_check("indices_1", allowed=0.0, ties=2), _check("values_1")]
    assert summarize(ties) == "exact: max abs 0 in all 2 checks, 2 tie tokens"


def test_summary_of_a_close_graph_names_its_worst_output() -> None:
    checks = [_check("indices_1", allowed=0.0), _check("values_1", 2e-6),
              _check("watched_1", 3e-5, probe="real-scale")]
    assert summarize(checks) == ("max abs 3.00e-05, max rel 3.00e-05 (worst: watched_1 on "
                                 "real-scale, 30% of allowed)")
    assert "<1% of allowed" in summarize([_check("values_1", 1e-9)])


def test_summary_of_a_failing_graph_says_how_far_past_the_tolerance() -> None:
    values = [_check("indices_1", allowed=0.0), _check("values_1", 2.5e-3, probe="real-scale")]
    assert summarize(values) == "FAILED: values_1 on real-scale, max abs 2.50e-03 (25× allowed)"
    indices = [_check("values_1", 2.5e-3), _check("indices_1", allowed=0.0, mismatches=3)]
    assert summarize(indices) == ("FAILED: indices_1 on random, 3 of 64 tokens select other "
                                  "latents than torch")
    exact_tolerance = _check("values_1", 1e-9, allowed=0.0)
    assert not exact_tolerance.passed and exact_tolerance.excess == math.inf
    assert summarize([exact_tolerance]).endswith("(exceeds a tolerance of 0)")
    index_mismatch = _check("indices_1", allowed=0.0, mismatches=1)
    assert worst_check([exact_tolerance, index_mismatch]) is index_mismatch  # both infinite
    nan = _check("values_1", math.nan)
    assert not nan.passed and worst_check([_check("values_1", 5e-5), nan]) is nan
    assert "= 1.000e-09" in exact_tolerance.describe()
    assert "(12,345× allowed)" in _check("values_1", 1.2345, allowed=1e-4).describe()
    assert "(25× allowed)" in values[1].describe()


# ------------------------------------------------------------------ the console script

def exact_resae() -> ReSAE:
    """A layerwise dictionary of one-hot rows times powers of two: every sum of the encoder
    and decoder has at most two non-zero terms, so float32 rounding cannot depend on the
    summation order, and onnxruntime matches torch exactly (max abs 0 in every check)."""
    torch.manual_seed(0)
    d_sae = 2 * D_MODEL
    hot = torch.zeros(d_sae, D_MODEL)
    hot[torch.arange(d_sae), torch.arange(d_sae) % D_MODEL] = 1.0    # (d_sae, d)
    sign = torch.tensor([1.0, -1.0]).repeat(D_MODEL)[:, None]          # (d_sae, 1)
    saes = []
    for _ in LAYERS:
        sae = build_sae(SAEConfig(architecture="topk", d_in=D_MODEL, d_sae=d_sae, k=K))
        with torch.no_grad():
            sae.W_enc.copy_((sign * hot).T)
            sae.W_dec.copy_(0.5 * hot)
            sae.b_enc.copy_(torch.linspace(-0.25, 0.25, d_sae))
            sae.b_dec.normal_(0, 0.1)
        saes.append(sae)
    return ReSAE(LAYERS, saes, [2.0, 0.5], mode="layerwise")


RESAE_SCRIPT = Path(sys.executable).with_name("resae")

# Imported at start-up by the console script (PYTHONPATH): each graph is traced with the first
# layer's decoder matrix scaled by 1.5, as a corrupted export would be.
CORRUPTING_HOOK = '''
import torch
from resae_serve.export import convert

_graph_module = convert.graph_module


def _corrupted(name, resae, precision="float32", layer=None):
    module = _graph_module(name, resae, precision, layer)
    with torch.no_grad():
        module.get_buffer("blocks.0.W_dec").mul_(1.5)
    return module


convert.graph_module = _corrupted
'''


def run_resae(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The installed ``resae`` console script, as a user runs it."""
    if not RESAE_SCRIPT.is_file():
        pytest.skip(f"no console script at {RESAE_SCRIPT} (install the package with pip -e)")
    return subprocess.run([str(RESAE_SCRIPT), "-q", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env={**os.environ, **env})


def test_console_export_check_of_an_exact_export(tmp_path: Path) -> None:
    dictionary = save_artifact(exact_resae(), tmp_path / "exact", IDENTITY)
    done = run_resae(["export", str(dictionary), "--out", "exp", "--check"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    layers = exact_resae().layers
    assert lines[-6:] == [
        "parity vs torch ReSAE (onnxruntime CPU), worst per graph:",
        f"  {'encode.onnx':24s} exact: max abs 0 in all 12 checks",
        f"  {'intervention.onnx':24s} exact: max abs 0 in all 4 checks",
        f"  {'decode.onnx':24s} exact: max abs 0 in all 4 checks",
        *(f"  {f'encode_layer.L{L}.onnx':24s} exact: max abs 0 in all 6 checks"
          for L in layers),
    ]
    assert json.loads((tmp_path / "exp" / EXPORT_MANIFEST).read_text())["validation"]["passed"]


def test_console_export_check_of_a_corrupted_weight_fails_in_one_line(tmp_path: Path) -> None:
    dictionary = save_artifact(exact_resae(), tmp_path / "exact", IDENTITY)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CORRUPTING_HOOK)
    done = run_resae(["export", str(dictionary), "--out", "exp", "--check", "--graphs",
                      "decode"], tmp_path, PYTHONPATH=str(hook))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("resae export:")]
    assert errors == done.stderr.strip().splitlines()[-1:]
    assert re.fullmatch(r"resae export: error: parity check failed: decode \(float32\) output "
                        r"'reconstruction_\d' on [\w-]+ activations: max \|ours − torch\| = "
                        r".*; allowed .* \([\d.,]+× allowed\)", errors[0])
    assert re.search(r"decode.onnx +FAILED: reconstruction_\d on [\w-]+, max abs .* allowed\)",
                     done.stdout)
    assert not json.loads((tmp_path / "exp" / EXPORT_MANIFEST).read_text())["validation"][
        "passed"]
