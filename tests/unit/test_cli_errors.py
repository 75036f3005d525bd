"""Every ``resae`` command ends a failure in one line naming what went wrong, never a traceback.

In-process (``main``), fast: bad flags are refused before any model is loaded or anything is
captured, exported or deleted.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from resae_serve.artifact import MANIFEST, save_artifact
from resae_serve.catalog import CATALOG_FORMAT, CATALOG_VERSION, save_catalog
from resae_serve.cli import fetch, main
from resae_serve.cli.capture import replaced_folder
from resae_serve.export.spec import EXPORT_MANIFEST
from tests.conftest import make_documents
from tests.unit.resae_fixtures import IDENTITY, tiny_resae


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Exit status and stderr lines of ``resae -q ARGV`` (argparse's exits included)."""
    try:
        code = main(["-q", *argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def dictionary(tmp_path: Path) -> Path:
    return save_artifact(tiny_resae(), tmp_path / "dict", IDENTITY)


@pytest.fixture
def model_dir(tmp_path: Path, tiny_llama: PreTrainedModel,
              tiny_tokenizer: PreTrainedTokenizerFast) -> Path:
    folder = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("command", [
    ["train", "--layers", "1,3"],
    ["capture"],
    ["eval", "DICT"],
    ["export", "DICT"],
])
def test_an_out_that_is_a_file_is_refused(command: list[str], dictionary: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    argv = [str(dictionary) if arg == "DICT" else arg for arg in command]
    code, err = run([*argv, "--out", str(afile)], capsys)
    assert code == 2
    assert err[-1].endswith(f"argument --out: '{afile}' is an existing file; give a folder")
    assert afile.read_text() == "keep me"


def test_an_out_replaced_as_a_whole_must_hold_nothing_else(
        dictionary: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `--out` the dictionary itself, or a folder above it, would delete it.
    for out in (dictionary, tmp_path):
        code, err = run(["export", str(dictionary), "--out", str(out)], capsys)
        assert code == 2
        assert err[-1].endswith(f"'{out}' holds files but no {EXPORT_MANIFEST}; it would be "
                                "replaced as a whole, so give a new or empty folder (or an "
                                "earlier output to overwrite)")
    code, err = run(["train", "--layers", "1,3", "--out", str(tmp_path)], capsys)
    assert code == 2 and f"holds files but no {MANIFEST}" in err[-1]
    assert (dictionary / MANIFEST).is_file()
    parse = replaced_folder(MANIFEST)
    (tmp_path / "empty").mkdir()
    assert parse(str(tmp_path / "empty")) == tmp_path / "empty"
    assert parse(str(dictionary)) == dictionary  # an earlier output: replaced on purpose
    assert parse(str(tmp_path / "new")) == tmp_path / "new"


@pytest.mark.parametrize(("flags", "message"), [
    (["--check-acts", "acts"], "--check-acts acts needs --check"),
    (["--check", "--check-tokens", "0"], "--check-tokens 0; must be at least 1"),
    (["--opset", "99"], "--opset 99; allowed: 18.."),
])
def test_export_refuses_flags_it_would_ignore_or_fail_on_late(
        flags: list[str], message: str, dictionary: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "exp"
    code, err = run(["export", str(dictionary), "--out", str(out), *flags], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"resae export: error: {message}")
    assert not out.exists()


def test_capture_refuses_a_device_this_machine_lacks(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(["capture", "--device", "tpu9"], capsys)
    assert code == 2 and err[-1].endswith("argument --device: 'tpu9' is not a torch device; "
                                          "e.g. cpu, cuda, cuda:1")
    if not torch.cuda.is_available():
        code, err = run(["capture", "--device", "cuda"], capsys)
        assert code == 2 and "argument --device: 'cuda' is not usable here (" in err[-1]


def test_client_timeout_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(["client", "features", "dictionary", "--timeout", "-1"], capsys)
    assert code == 2
    assert err[-1].endswith("argument --timeout: '-1'; expected a number of seconds > 0")


def test_train_refuses_impossible_sae_settings_before_capturing(
        model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RESAE_CACHE", str(tmp_path / "cache"))
    base = ["train", "--model", str(model_dir), "--corpus", str(tmp_path / "none.txt"),
            "--layers", "1,3", "--out", str(tmp_path / "dict")]
    code, err = run([*base, "--expansion", "2", "--k", "1000"], capsys)
    assert code == 2
    assert err == [f"resae train: error: k=1000 exceeds d_sae=64; need 1 <= k <= d_sae "
                   f"(d_model=32 for model {model_dir})"]
    code, err = run([*base, "--lr", "0"], capsys)
    assert code == 2 and err[0].startswith("resae train: error: lr=0.0; must be a finite number")
    assert not (tmp_path / "cache" / "activations").exists()


def test_train_on_too_short_a_corpus_fails_in_one_line(
        model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RESAE_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(make_documents(12, 30)))
    code, err = run(["train", "--model", str(model_dir), "--corpus", str(corpus), "--layers",
                     "1,3", "--k", "4", "--expansion", "2", "--tokens", "500",
                     "--calibration-tokens", "100000", "--context-size", "32",
                     "--out", str(tmp_path / "dict")], capsys)
    assert code == 2  # (stderr also holds the model loader's progress bar)
    assert err[-1].startswith("resae train: error: calibration needs 100000 tokens; the stream "
                              "gave")
    assert not any("Traceback" in line for line in err)


def test_features_search_names_the_dictionary_layers(
        dictionary: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_catalog(dictionary, {"format": CATALOG_FORMAT, "version": CATALOG_VERSION,
                              "n_tokens": 10, "layers": {"1": {}, "3": {}}})
    code, err = run(["features", str(dictionary), "--search", "w1 w2", "--layer", "7"], capsys)
    assert code == 2
    assert err == ["resae features: error: --layer 7 is not in this dictionary; its layers "
                   "are [1, 3]"]


def test_fetch_verify_reports_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(fetch, "fetch_embedded_model", lambda name, force: tmp_path / "m")
    monkeypatch.setattr(fetch, "fetch_corpus", lambda name, force: tmp_path / "c")
    monkeypatch.setattr(fetch, "verify_checksums",
                        lambda folder, full: [f"{folder}/a has SHA-256 1, expected 2",
                                              f"{folder}/b is missing"])
    code, err = run(["fetch", "--verify"], capsys)
    assert code == 2
    assert err == [f"resae fetch: error: cache verification failed: {tmp_path}/m/a has SHA-256 "
                   "1, expected 2 (and 3 more; -v lists them); run `resae fetch --force` to "
                   "rebuild"]


@pytest.mark.parametrize(("error", "code", "line"), [
    (ZeroDivisionError("float division by zero"), 1,
     "resae fetch: unexpected error: ZeroDivisionError: float division by zero (-v shows the "
     "traceback)"),
    (RuntimeError("first line\nsecond line"), 1,
     "resae fetch: unexpected error: RuntimeError: first line (-v shows the traceback)"),
    (PermissionError(13, "Permission denied", "/runs/x"), 2,
     "resae fetch: error: Permission denied: /runs/x"),
])
def test_anything_unforeseen_still_ends_in_one_line(
        error: Exception, code: int, line: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    def fail(args: object) -> int:
        raise error

    monkeypatch.setattr(fetch, "run", fail)
    assert run(["fetch"], capsys) == (code, [line])
