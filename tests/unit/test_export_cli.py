"""``resae export``: graphs, check and error paths, run in-process on a tiny dictionary."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from resae_serve.artifact import save_artifact
from resae_serve.cli import main
from resae_serve.export.spec import EXPORT_MANIFEST
from tests.unit.resae_fixtures import IDENTITY, tiny_resae


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
