"""Splicing on the embedded SmolLM2: identity dictionaries leave CE unchanged, constant ones
equal mean ablation, and splicing a trained layer costs something."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from resae_serve.capture import LayerCapture
from resae_serve.corpus import load_documents
from resae_serve.evaluation.data import take_windows
from resae_serve.evaluation.splice import evaluate_splicing
from resae_serve.models import fetch_embedded_model, load_model
from tests.unit.test_eval_support import constant_dictionary, perfect_dictionary

pytestmark = pytest.mark.integration
LAYERS = (6, 12)


@pytest.fixture(scope="module")
def embedded() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    fetch_embedded_model()
    return load_model("smollm2-135m")


def test_identity_and_constant_splices_on_smollm2(
    embedded: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    model, tokenizer = embedded
    windows = take_windows(load_documents("brown", "heldout"), tokenizer, n_windows=2,
                           context_size=64, batch_size=2)
    rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in LAYERS}
    with LayerCapture(model, LAYERS) as capture:
        for win in windows:
            out = capture.run(win.input_ids, win.attention_mask)
            for layer in LAYERS:
                rows[layer].append(out[layer][win.keep])
    means = {layer: torch.cat(r).mean(0) for layer, r in rows.items()}
    d = model.config.hidden_size
    dicts = {"identity": perfect_dictionary(LAYERS, "resae", d=d),
             "constant": constant_dictionary(means, "resae")}
    reports = evaluate_splicing(model, windows, dicts, means, progress=False)
    identity, constant = reports["identity"], reports["constant"]
    assert identity.ce_clean < 4.0
    for r in [*identity.single.values(), *identity.joint.values()]:
        assert r.delta_ce == pytest.approx(0, abs=2e-3)
        assert r.kl < 1e-3
    replaced = [r for mode, r in constant.joint.items() if mode != "teacher_forced_additive"]
    for r in [*constant.single.values(), *replaced]:
        assert r.ce == pytest.approx(r.ce_ablate, abs=2e-3)
        assert r.delta_ce > 0.1                      # mean ablation of a middle layer hurts
