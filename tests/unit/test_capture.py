"""Captured block outputs equal Hugging Face's hidden states, for every supported family."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from resae_serve.blocks import find_decoder_blocks
from resae_serve.capture import (
    ActivationBatch,
    CaptureConfig,
    LayerCapture,
    _drop_outliers,
    capture_activations,
)
from resae_serve.errors import CaptureError
from tests.conftest import N_LAYERS, VOCAB, make_documents

ATOL = 1e-5  # float32: the same kernels run, only the hooks differ


def _final_norm(model: PreTrainedModel) -> torch.nn.Module:
    """The norm HF applies before storing hidden_states[-1] (test-only per-family table)."""
    base = model.base_model
    for name in ("norm", "ln_f", "final_layer_norm"):
        if hasattr(base, name):
            return getattr(base, name)
    raise AssertionError(f"no final norm on {type(base).__name__}")


def _inputs(batch: int = 3, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(VOCAB, (batch, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0  # right padding on one row
    return input_ids, attention_mask


def test_blocks_found_generically(tiny_model: PreTrainedModel) -> None:
    name, blocks = find_decoder_blocks(tiny_model)
    assert len(blocks) == N_LAYERS
    assert name in {"model.layers", "transformer.h", "gpt_neox.layers"}


@pytest.mark.parametrize("stop_early", [True, False])
def test_capture_matches_output_hidden_states(
    tiny_model: PreTrainedModel, stop_early: bool
) -> None:
    input_ids, attention_mask = _inputs()
    layers = tuple(range(N_LAYERS))
    with torch.no_grad():
        reference = tiny_model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        ).hidden_states
        with LayerCapture(tiny_model, layers, stop_early=stop_early) as cap:
            captured = cap.run(input_ids, attention_mask)
    real = attention_mask.bool()
    for layer in layers[:-1]:
        diff = (captured[layer] - reference[layer + 1])[real].abs().max().item()
        assert diff <= ATOL, f"layer {layer}: max abs diff {diff}"
    # HF applies the final norm to its last entry; we keep the raw block output.
    last = layers[-1]
    diff = (_final_norm(tiny_model)(captured[last]) - reference[-1])[real].abs().max().item()
    assert diff <= ATOL, f"last layer: max abs diff {diff}"


def test_stop_early_skips_later_blocks(tiny_llama: PreTrainedModel) -> None:
    calls: list[str] = []
    _, blocks = find_decoder_blocks(tiny_llama)
    handles = [blocks[3].register_forward_hook(lambda *_: calls.append("block3")),
               tiny_llama.lm_head.register_forward_hook(lambda *_: calls.append("lm_head"))]
    input_ids, attention_mask = _inputs()
    with torch.no_grad(), LayerCapture(tiny_llama, (0, 1)) as cap:
        out = cap.run(input_ids, attention_mask)
    assert set(out) == {0, 1} and calls == []
    with torch.no_grad(), LayerCapture(tiny_llama, (0, 1), stop_early=False) as cap:
        cap.run(input_ids, attention_mask)
    assert calls == ["block3"]  # full forward of the base model, still no unembedding
    for handle in handles:
        handle.remove()
    # hooks are gone: a later plain forward is untouched
    assert tiny_llama(input_ids).logits.shape == (3, 12, VOCAB)


def test_layer_out_of_range_names_allowed_range(tiny_llama: PreTrainedModel) -> None:
    with pytest.raises(CaptureError, match=r"layers \[4\] out of range.*0\.\.3"):
        LayerCapture(tiny_llama, (1, 4))
    with pytest.raises(CaptureError, match="layers is empty"):
        LayerCapture(tiny_llama, ())


def test_capture_activations_skips_bos_and_padding(
    tiny_llama: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    docs = make_documents(5, 13)
    config = CaptureConfig(layers=(2, 0), context_size=8, batch_size=2, pack=False,
                           progress=False)
    batches = list(capture_activations(tiny_llama, tiny_tokenizer, docs, config))
    acts = torch.cat([b.acts for b in batches])
    position = torch.cat([b.position for b in batches])
    token_ids = torch.cat([b.token_ids for b in batches])
    # 13 words per doc in windows of 7 content tokens: 7 + 6 kept per doc, BOS never kept
    assert acts.shape == (5 * 13, 2, 32)
    assert (position > 0).all()
    assert tiny_tokenizer.bos_token_id not in token_ids.tolist()
    assert tiny_tokenizer.pad_token_id not in token_ids.tolist()
    # Values equal a plain forward on the first window.
    first = tiny_tokenizer(docs[0], add_special_tokens=False)["input_ids"][:7]
    ids = torch.tensor([[tiny_tokenizer.bos_token_id, *first]])
    with torch.no_grad():
        hs = tiny_llama(input_ids=ids, output_hidden_states=True).hidden_states
    # layers come out sorted: (2, 0) -> [0, 2]
    torch.testing.assert_close(acts[:7, 0], hs[1][0, 1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(acts[:7, 1], hs[3][0, 1:], atol=ATOL, rtol=0)


def test_capture_max_tokens_dtype_and_shuffle(
    tiny_llama: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    docs = make_documents(20, 30)
    base = CaptureConfig(layers=(1,), context_size=16, batch_size=4, progress=False,
                         max_tokens=250)
    plain = list(capture_activations(tiny_llama, tiny_tokenizer, docs, base))
    assert sum(len(b.acts) for b in plain) == 250
    bf16 = CaptureConfig(**{**base.__dict__, "dtype": "bfloat16"})
    assert next(capture_activations(tiny_llama, tiny_tokenizer, docs, bf16)).acts.dtype == (
        torch.bfloat16
    )
    mixed = CaptureConfig(**{**base.__dict__, "shuffle_buffer": 64, "seed": 3})
    run1 = torch.cat([b.acts for b in capture_activations(tiny_llama, tiny_tokenizer, docs, mixed)])
    run2 = torch.cat([b.acts for b in capture_activations(tiny_llama, tiny_tokenizer, docs, mixed)])
    ordered = torch.cat([b.acts for b in plain])
    torch.testing.assert_close(run1, run2, atol=0, rtol=0)  # seeded
    assert not torch.equal(run1, ordered)  # shuffled
    key = lambda t: t[:, 0, 0].sort().values  # noqa: E731 - same multiset of tokens
    torch.testing.assert_close(key(run1), key(ordered), atol=0, rtol=0)


def test_empty_corpus_is_a_clear_error(
    tiny_llama: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    config = CaptureConfig(layers=(1,), progress=False)
    with pytest.raises(CaptureError, match="captured no tokens"):
        list(capture_activations(tiny_llama, tiny_tokenizer, ["", "   "], config))


def test_bad_config_values() -> None:
    with pytest.raises(CaptureError, match="dtype='int8'"):
        CaptureConfig(layers=(1,), dtype="int8")  # type: ignore[arg-type]
    with pytest.raises(CaptureError, match="max_tokens=0"):
        CaptureConfig(layers=(1,), max_tokens=0)


def test_massive_activation_tokens_are_dropped_from_every_field() -> None:
    acts = torch.randn(50, 2, 8)
    acts[7, 1] *= 100  # an attention-sink-like token at the second layer
    batch = ActivationBatch(acts, torch.arange(50), torch.zeros(50, dtype=torch.long),
                            torch.arange(50))
    kept = _drop_outliers(batch, ratio=10.0)
    assert len(kept.acts) == 49 and 7 not in kept.token_ids.tolist()
    assert torch.equal(kept.acts, torch.cat([acts[:7], acts[8:]]))
