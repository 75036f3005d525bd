"""The ``resae`` command line, run in-process on a tiny saved model and a local corpus."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from resae_serve.cli import main
from resae_serve.shards import read_index, read_shards
from tests.conftest import make_documents


@pytest.fixture
def model_dir(
    tmp_path: Path, tiny_llama: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerFast
) -> Path:
    folder = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(f'{{"text": "{doc}"}}\n' for doc in make_documents(30, 40)))
    return path


def test_module_entry_point_help() -> None:
    out = subprocess.run([sys.executable, "-m", "resae_serve", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "fetch" in out and "capture" in out


@pytest.mark.parametrize("command", ["fetch", "capture"])
def test_subcommand_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: resae " + command in capsys.readouterr().out


def test_capture_writes_readable_shards(
    model_dir: Path, corpus_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "acts"
    code = main(["-q", "capture", "--model", str(model_dir), "--corpus", str(corpus_file),
                 "--split", "all", "--layers", "1,3", "--context-size", "32",
                 "--batch-size", "4", "--max-tokens", "500", "--tokens-per-shard", "200",
                 "--out", str(out)])
    assert code == 0
    assert "captured 500 tokens x 2 layers" in capsys.readouterr().out
    index = read_index(out)
    assert index["layers"] == [1, 3] and index["n_tokens"] == 500
    assert [len(b.acts) for b in read_shards(out)] == [200, 200, 100]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "1,9"], "layers [9] out of range"),
        (["--layers", "a,b"], "expected comma-separated block indices"),
        (["--model", "/no/such/model"], "unknown model '/no/such/model'"),
        (["--corpus", "/no/such.txt"], "does not exist"),
    ],
)
def test_capture_errors_are_clear(
    model_dir: Path, corpus_file: Path, args: list[str], message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["-q", "capture", "--model", str(model_dir), "--corpus", str(corpus_file),
            "--split", "all", *args]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse rejects bad --layers itself
        code = int(exc.code or 0)
    assert code == 2
    assert message in capsys.readouterr().err
