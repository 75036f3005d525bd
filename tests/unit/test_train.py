"""The trainer on synthetic activations, and ``resae train`` end to end on a tiny model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from resae_serve.artifact import load_artifact
from resae_serve.cli import main
from resae_serve.train import ReSAETrainer, TrainConfig, TrainError, rebatch
from tests.conftest import make_documents

D = 16


def _stream(n_tokens: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Two 'layers' where the second is mostly a linear map of the first plus sparse parts."""
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(D) + 0.3 * torch.randn(D, D, generator=g)
    dictionary = torch.randn(64, D, generator=g)
    for _ in range(n_tokens // 100):
        codes = torch.rand(100, 64, generator=g) * (torch.rand(100, 64, generator=g) < 0.05)
        h0 = codes @ dictionary
        h1 = h0 @ A.T + 0.5 * (torch.rand(100, 64, generator=g) < 0.05).float() @ dictionary
        yield torch.stack([h0, h1], dim=1)


def _trainer(config: TrainConfig) -> ReSAETrainer:
    sample = next(_stream(200))
    affine = [None, (torch.eye(D), torch.zeros(D))] if config.mode == "resae" else None
    return ReSAETrainer.create(config, d_model=D, scales=[1.0, 1.0], affine=affine,
                               init_sample=sample)


CONFIG = TrainConfig(layers=(2, 5), expansion=4, k=4, tokens=4000, batch_size=200,
                     warmup_steps=2, log_every=2, checkpoint_every=5, seed=3)


def test_training_reduces_loss_and_keeps_invariants() -> None:
    trainer = _trainer(CONFIG)
    trainer.fit(rebatch(_stream(4000), CONFIG.batch_size), progress=False)
    assert trainer.step == 20 and trainer.tokens_seen == 4000
    first, last = trainer.history[0], trainer.history[-1]
    for layer in (2, 5):
        assert last[f"loss/{layer}"] < first[f"loss/{layer}"]
        assert last[f"l0/{layer}"] == pytest.approx(4.0)
    for sae in trainer.resae.saes:
        norms = sae.W_dec.norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)


def test_same_seed_same_weights_and_resume_is_exact(tmp_path: Path) -> None:
    full = _trainer(CONFIG)
    full.fit(rebatch(_stream(4000), CONFIG.batch_size), progress=False)
    again = _trainer(CONFIG)
    again.fit(rebatch(_stream(4000), CONFIG.batch_size), progress=False)
    for a, b in zip(full.resae.state_dict().values(), again.resae.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    # interrupted after 10 steps (a checkpoint is written every 5), then resumed
    checkpoint = tmp_path / "ckpt.pt"
    first = _trainer(CONFIG)
    first.fit(rebatch(_stream(2000), CONFIG.batch_size), checkpoint=checkpoint, progress=False)
    resumed = ReSAETrainer.load_checkpoint(checkpoint, CONFIG, _trainer(CONFIG).resae)
    assert resumed.tokens_seen == 2000
    resumed.fit(rebatch(_stream(4000), CONFIG.batch_size, skip=resumed.tokens_seen),
                progress=False)
    for key, tensor in full.resae.state_dict().items():
        assert torch.equal(tensor, resumed.resae.state_dict()[key]), key
    other = TrainConfig(**{**CONFIG.__dict__, "k": 5})
    with pytest.raises(TrainError, match="other settings"):
        ReSAETrainer.load_checkpoint(checkpoint, other, _trainer(other).resae)


def test_rebatch_skips_and_recuts() -> None:
    chunks = [torch.arange(7), torch.arange(7, 12), torch.arange(12, 20)]
    out = list(rebatch(chunks, 6, skip=3))
    assert [t.tolist() for t in out] == [[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14],
                                         [15, 16, 17, 18, 19]]


@pytest.mark.parametrize(("changes", "message"), [
    ({"mode": "deep"}, "mode='deep'"), ({"layers": (5, 2)}, "strictly increasing"),
    ({"k": 0}, "k=0"), ({"decay_fraction": 1.0}, "decay_fraction=1.0"),
])
def test_bad_train_config(changes: dict[str, object], message: str) -> None:
    with pytest.raises(TrainError, match=message):
        TrainConfig(**{**CONFIG.__dict__, **changes})  # type: ignore[arg-type]


def test_resae_train_cli_on_tiny_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llama: PreTrainedModel,
    tiny_tokenizer: PreTrainedTokenizerFast, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("RESAE_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "docs"
    corpus.mkdir()
    for i, doc in enumerate(make_documents(60, 120)):
        (corpus / f"{i:03d}.txt").write_text(doc)
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"k": 4, "expansion": 2, "batch_size": 128,
                                  "calibration_tokens": 1000, "eval_tokens": 300,
                                  "checkpoint_every": 3}))
    out = tmp_path / "runs" / "dict"  # parent folder does not exist yet
    argv = ["-q", "train", "--config", str(config), "--model", str(model_dir),
            "--corpus", str(corpus), "--layers", "1,3", "--tokens", "1500",
            "--context-size", "32", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "resae dictionary" in printed and "affine R2" in printed
    resae, manifest = load_artifact(out)
    assert manifest.layers == (1, 3) and resae.saes[0].config.d_sae == 64
    assert manifest.training["tokens_seen"] == 1500
    context = manifest.context             # how training read text, for the serving rule
    assert (context.prepend_bos, context.skip_bos, context.outlier_norm_ratio) == (
        True, True, 10.0)
    assert context.reference_norms is not None and len(context.reference_norms) == 2
    assert all(n > 0 for n in context.reference_norms)
    assert (out / "training_curves.png").stat().st_size > 1000
    assert not (tmp_path / "runs" / "dict.checkpoint.pt").exists()
    # unknown setting in the config file is named
    config.write_text(json.dumps({"kk": 4}))
    assert main(argv) == 2
    assert "unknown settings ['kk']" in capsys.readouterr().err
