"""Dictionaries with known behaviour for the evaluation tests, and checks of those builders.

- :func:`perfect_dictionary`: ReLU SAEs with ``W_enc = [I, −I]``, ``W_dec = [I; −I]``, so
  ``D(E(u)) = relu(u) − relu(−u) = u`` exactly; through the chain this reconstructs every layer.
- :func:`constant_dictionary`: SAEs that never fire and decode to ``b_dec``, set so that every
  layer reconstructs to a given mean vector (= mean ablation).
- :func:`random_dictionary`: random TopK SAEs with non-trivial biases, maps and scales.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from resae_serve.artifact import ModelIdentity, save_artifact
from resae_serve.evaluation.data import take_windows
from resae_serve.fingerprint import model_fingerprint
from resae_serve.pipeline import DataConfig
from resae_serve.resae import Mode, ReSAE
from resae_serve.saes import SAEConfig, build_sae
from resae_serve.windows import TokenWindows
from tests.conftest import make_documents

D = 32  # hidden size of the tiny models in tests/conftest.py


def random_affine(layers: Sequence[int], seed: int = 0, d: int = D,
                  ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    g = torch.Generator().manual_seed(seed)
    return [None] + [(torch.eye(d) + 0.2 * torch.randn(d, d, generator=g),
                      0.1 * torch.randn(d, generator=g)) for _ in layers[1:]]


def perfect_dictionary(layers: Sequence[int], mode: Mode = "resae", d: int = D,
                       scales: Sequence[float] | None = None) -> ReSAE:
    saes = []
    for _ in layers:
        sae = build_sae(SAEConfig(architecture="relu", d_in=d, d_sae=2 * d, k=d))
        eye = torch.eye(d)
        with torch.no_grad():
            sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
            sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
            sae.b_enc.zero_()
            sae.b_dec.zero_()
        saes.append(sae)
    scales = scales or [1.5 + i for i in range(len(layers))]
    affine = random_affine(layers, d=d) if mode == "resae" else None
    return ReSAE(layers, saes, scales, mode=mode, affine=affine)


def constant_dictionary(means: dict[int, torch.Tensor], mode: Mode = "resae") -> ReSAE:
    layers = sorted(means)
    d = len(means[layers[0]])
    affine = random_affine(layers, d=d) if mode == "resae" else None
    scales = [2.0] * len(layers)
    saes = []
    for i, layer in enumerate(layers):
        sae = build_sae(SAEConfig(architecture="relu", d_in=d, d_sae=4, k=2))
        target = means[layer]
        if mode == "resae" and i:
            A, c = affine[i]  # type: ignore[index, misc]
            target = target - (A @ means[layers[i - 1]] + c)
        with torch.no_grad():
            sae.W_enc.zero_()
            sae.b_enc.fill_(-1.0)           # never fires
            sae.b_dec.copy_(target / scales[i])
        saes.append(sae)
    return ReSAE(layers, saes, scales, mode=mode, affine=affine)


def random_dictionary(layers: Sequence[int], mode: Mode = "resae", *, d: int = D,
                      d_sae: int = 64, k: int = 4, seed: int = 0,
                      architecture: str = "topk") -> ReSAE:
    torch.manual_seed(seed)
    config = SAEConfig(architecture=architecture, d_in=d, d_sae=d_sae, k=k)  # type: ignore[arg-type]
    saes = [build_sae(config) for _ in layers]
    with torch.no_grad():
        for sae in saes:
            sae.b_enc.normal_(0, 0.1)
            sae.b_dec.normal_(0, 0.1)
            sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
    affine = random_affine(layers, seed=seed, d=d) if mode == "resae" else None
    return ReSAE(layers, saes, [0.5 + 0.25 * i for i in range(len(layers))], mode=mode,
                 affine=affine)


def tiny_windows(tokenizer: PreTrainedTokenizerFast, n_windows: int = 4, context_size: int = 24,
                 batch_size: int = 2) -> list[TokenWindows]:
    return take_windows(make_documents(20, 50, seed=5), tokenizer, n_windows=n_windows,
                        context_size=context_size, batch_size=batch_size)


def save_tiny_setup(tmp_path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast,
                    ) -> tuple[Path, Path]:
    """A saved model folder and a local corpus folder (60 documents)."""
    model_dir = tmp_path / "tiny-model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "docs"
    corpus.mkdir()
    for i, doc in enumerate(make_documents(60, 120)):
        (corpus / f"{i:03d}.txt").write_text(doc)
    return model_dir, corpus


def save_dictionary(resae: ReSAE, folder: Path, model_dir: Path, corpus: Path) -> Path:
    """Save ``resae`` as an artifact whose training summary points at ``model_dir``/``corpus``."""
    identity = ModelIdentity(name=str(model_dir), fingerprint=model_fingerprint(model_dir),
                             model_type="llama", n_layers=4, d_model=resae.d_model)
    data = DataConfig(model=str(model_dir), corpus=str(corpus), context_size=32,
                      capture_batch_size=4, eval_tokens=300)
    return save_artifact(resae, folder, identity, training={
        "data_config": asdict(data), "train_config": {"seed": 0}, "tokens_seen": 0})


# ---------------------------------------------------------------------- checks of the builders


def test_perfect_dictionary_reconstructs_exactly() -> None:
    for mode in ("resae", "layerwise"):
        resae = perfect_dictionary((1, 3), mode)  # type: ignore[arg-type]
        acts = {1: torch.randn(10, D), 3: torch.randn(10, D)}
        out = resae(acts)
        for layer in (1, 3):
            torch.testing.assert_close(out[layer], acts[layer], atol=1e-5, rtol=0)


def test_constant_dictionary_reconstructs_the_means() -> None:
    means = {1: torch.randn(D), 3: torch.randn(D)}
    for mode in ("resae", "layerwise"):
        resae = constant_dictionary(means, mode)  # type: ignore[arg-type]
        out = resae({1: torch.randn(5, D), 3: torch.randn(5, D)})
        for layer in (1, 3):
            torch.testing.assert_close(out[layer], means[layer].expand(5, D), atol=1e-5, rtol=0)
