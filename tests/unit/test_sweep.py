"""``resae sweep`` end to end on a tiny model: real training, evaluation, frontier report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from resae_serve.cli import main
from resae_serve.evaluation.frontier import findings, late_gain
from tests.unit.test_eval_support import save_tiny_setup


def test_tiny_sweep_trains_evaluates_reports_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llama: PreTrainedModel,
    tiny_tokenizer: PreTrainedTokenizerFast, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("RESAE_CACHE", str(tmp_path / "cache"))
    model_dir, corpus = save_tiny_setup(tmp_path, tiny_llama, tiny_tokenizer)
    out, report = tmp_path / "sweep", tmp_path / "report"
    argv = ["-q", "sweep", "--out", str(out), "--report", str(report), "--ks", "2,8",
            "--model", str(model_dir), "--corpus", str(corpus), "--layers", "1,3",
            "--tokens", "1024", "--expansion", "2", "--batch-size", "128",
            "--calibration-tokens", "1000", "--eval-tokens", "300", "--context-size", "32",
            "--splice-windows", "2", "--splice-context-size", "24", "--splice-batch-size", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "layerwise" in printed
    names = {"resae-k2", "layerwise-k2", "resae-k8", "layerwise-k8"}
    assert names <= {p.name for p in out.iterdir()}
    table = json.loads((report / "frontier.json").read_text())
    runs = {r["name"]: r for r in table["runs"]}
    assert set(runs) == names
    for name, run in runs.items():
        assert run["tokens_trained"] == 1024 and run["train_wall_s"] > 0
        assert [row["layer"] for row in run["layers"]] == [1, 3]
        assert set(run["joint"]) == {"teacher_forced", "teacher_forced_additive", "online"}
        assert run["l0"] == pytest.approx(run["k"], abs=0.5)          # TopK: L0 = k
        local = run["layers"][1]["local_delta_ce"]
        assert (local is None) == name.startswith("layerwise")
    # the same tokens for every run: one clean CE
    assert len({r["ce_clean"] for r in table["runs"]}) == 1
    assert [r["k"] for r in table["ratios"]] == [2, 8]
    for r in table["ratios"]:
        expected = (runs[f"resae-k{r['k']}"]["joint"]["online"]["delta_ce"]
                    / runs[f"layerwise-k{r['k']}"]["joint"]["online"]["delta_ce"])
        assert r["online"] == pytest.approx(expected)
    markdown = (report / "report.md").read_text()
    for text in ("## Findings", "## Joint replacement", "## Per layer", "ratio_k.png",
                 "joint_delta_ce_l0.png", "fve_l0.png", *findings(table)):
        assert text in markdown
    for png in ("joint_delta_ce_l0.png", "fve_l0.png", "ratio_k.png", "training_fve.png"):
        assert (report / png).stat().st_size > 5000
    assert (out / "eval" / "report.json").is_file()

    # a second call trains nothing, reuses the evaluation, and includes a discussion file
    stamps = {name: (out / name / "manifest.json").stat().st_mtime_ns for name in names}
    eval_stamp = (out / "eval" / "report.json").stat().st_mtime_ns
    (report / "discussion.md").write_text("The claim holds nowhere on this tiny model.\n")
    assert main(argv) == 0
    assert stamps == {name: (out / name / "manifest.json").stat().st_mtime_ns for name in names}
    assert (out / "eval" / "report.json").stat().st_mtime_ns == eval_stamp
    markdown = (report / "report.md").read_text()
    assert "## Discussion" in markdown and "holds nowhere" in markdown
    again = json.loads((report / "frontier.json").read_text())
    assert again["runs"] == table["runs"]

    # a run folder trained with other settings is refused, naming the setting
    capsys.readouterr()
    changed = [a if a != "1024" else "2048" for a in argv]
    assert main(changed) == 2
    assert "tokens 1024 -> 2048" in capsys.readouterr().err


def test_sweep_refuses_bad_grids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["sweep", "--out", str(tmp_path / "s"), "--layers", "1,3"]
    with pytest.raises(SystemExit):
        main([*base, "--ks", "16,x"])
    assert "--ks '16,x'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--modes", "resae,sideways"])
    assert "allowed: resae, layerwise" in capsys.readouterr().err
    assert main([*base, "--ks", "16,16"]) == 2
    assert "ks=[16, 16]" in capsys.readouterr().err


def test_late_gain_compares_the_last_tenth_with_the_tenth_before() -> None:
    history = [{"tokens": i, "fve/3": i / 100} for i in range(100)]
    assert late_gain(history, 3) == pytest.approx(0.1)            # means 0.945 and 0.845
    assert late_gain([{"fve/3": 0.5}] * 100, 3) == pytest.approx(0)
    assert late_gain(history[:15], 3) is None                      # under 2 records a tenth
