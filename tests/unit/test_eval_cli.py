"""``resae eval`` and ``resae features`` end to end on a tiny model and local corpus (fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from resae_serve.cli import main
from tests.unit.test_eval_support import (
    perfect_dictionary,
    random_dictionary,
    save_dictionary,
    save_tiny_setup,
)

LAYERS = (1, 3)


@pytest.fixture
def dictionaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llama: PreTrainedModel,
                 tiny_tokenizer: PreTrainedTokenizerFast) -> tuple[Path, Path]:
    monkeypatch.setenv("RESAE_CACHE", str(tmp_path / "cache"))
    model_dir, corpus = save_tiny_setup(tmp_path, tiny_llama, tiny_tokenizer)
    resae = save_dictionary(random_dictionary(LAYERS, "resae", seed=1), tmp_path / "resae",
                            model_dir, corpus)
    layerwise = save_dictionary(random_dictionary(LAYERS, "layerwise", seed=2),
                                tmp_path / "layerwise", model_dir, corpus)
    return resae, layerwise


def test_eval_writes_a_comparison_report(
    tmp_path: Path, dictionaries: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
) -> None:
    resae, layerwise = dictionaries
    out = tmp_path / "report"
    argv = ["-q", "eval", str(resae), "--against", str(layerwise), "--out", str(out),
            "--splice-windows", "3", "--context-size", "24", "--batch-size", "2",
            "--propagation-features", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "resae (resae)" in printed and "layerwise (layerwise)" in printed
    assert "joint online" in printed and "propagation 1->3" in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report["dictionaries"]) == {"resae", "layerwise"}
    for name, entry in report["dictionaries"].items():
        assert [r["layer"] for r in entry["reconstruction"]] == list(LAYERS)
        assert entry["reconstruction"][0]["n_tokens"] == 300
        assert set(entry["splicing"]["joint"]) == {"teacher_forced", "teacher_forced_additive",
                                                   "online"}
        assert set(entry["splicing"]["local"]) == ({"3"} if name == "resae" else set())
        assert (entry["reconstruction"][1]["local_fve"] is None) == (name == "layerwise")
        assert set(entry["splicing"]["single"]) == {"1", "3"}
        (red,) = entry["redundancy"]
        assert red["mapped>0.7"] is not None            # the layerwise one borrows A
        assert len(entry["propagation"]) == 1
        assert entry["affine_maps_from"] == "resae"
        assert entry["reconstruction"][1]["residual_fve"] is not None, name
    same_clean = {e["splicing"]["ce_clean"] for e in report["dictionaries"].values()}
    assert len(same_clean) == 1                          # same tokens for both
    markdown = (out / "report.md").read_text()
    for heading in ("## Reconstruction", "## Splicing", "## Redundancy", "## Linear propagation",
                    "fve_l0.png", "delta_ce.png", "redundancy.png"):
        assert heading in markdown
    for png in ("fve_l0.png", "delta_ce.png", "redundancy.png"):
        assert (out / png).stat().st_size > 5000


def test_eval_of_a_perfect_dictionary_alone(
    tmp_path: Path, dictionaries: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
) -> None:
    resae, _ = dictionaries
    model_dir = tmp_path / "tiny-model"
    perfect = save_dictionary(perfect_dictionary(LAYERS, "layerwise"), tmp_path / "perfect",
                              model_dir, tmp_path / "docs")
    out = tmp_path / "alone"
    assert main(["-q", "eval", str(perfect), "--out", str(out), "--splice-windows", "2",
                 "--context-size", "16", "--modes", "online"]) == 0
    entry = json.loads((out / "report.json").read_text())["dictionaries"]["perfect"]
    assert entry["reconstruction"][0]["fve"] == pytest.approx(1, abs=1e-5)
    assert entry["splicing"]["joint"]["online"]["delta_ce"] == pytest.approx(0, abs=1e-4)
    assert list(entry["splicing"]["joint"]) == ["online"]
    assert entry["propagation"] == [] and entry["redundancy"][0]["mapped>0.7"] is None
    with pytest.raises(SystemExit):
        main(["-q", "eval", str(resae), "--out", str(out), "--modes", "sideways"])
    assert "allowed: teacher_forced, teacher_forced_additive, online" in capsys.readouterr().err
    assert main(["-q", "eval", str(resae), "--out", str(out), "--splice-windows", "0"]) == 2
    assert "splice_windows=0" in capsys.readouterr().err


def test_features_build_show_label_search(
    dictionaries: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
) -> None:
    resae, _ = dictionaries
    assert main(["-q", "features", str(resae), "--layer", "1", "--feature", "0"]) == 2
    assert "--build" in capsys.readouterr().err
    assert main(["-q", "features", str(resae), "--build", "--tokens", "200",
                 "--context-size", "24"]) == 0
    assert "200 held-out tokens" in capsys.readouterr().out
    assert main(["-q", "features", str(resae), "--layer", "3", "--feature", "4"]) == 0
    shown = capsys.readouterr().out
    assert "layer 3 feature 4" in shown and "promotes:" in shown and "top contexts:" in shown
    assert main(["-q", "features", str(resae), "--layer", "3", "--feature", "4",
                 "--label", "test label"]) == 0
    assert "label: test label" in capsys.readouterr().out
    assert main(["-q", "features", str(resae), "--search", "w3 w4 w5", "--top", "4"]) == 0
    found = capsys.readouterr().out.splitlines()
    assert "features most active on 'w3 w4 w5'" in found[0]
    assert len(found) == 2 + 2 * 4
    assert main(["-q", "features", str(resae), "--feature", "4"]) == 2
    assert "--feature needs --layer" in capsys.readouterr().err
    assert main(["-q", "features", str(resae), "--layer", "3", "--feature", "99"]) == 2
    assert "allowed 0..63" in capsys.readouterr().err
