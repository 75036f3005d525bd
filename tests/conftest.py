"""Shared fixtures: tiny random models built from configs (no downloads), a tiny tokenizer."""

from __future__ import annotations

import os

# Before anything imports transformers: tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96
N_LAYERS = 4
WORDS = [f"w{i}" for i in range(VOCAB - 4)]


def _tiny(family: str) -> PreTrainedModel:
    common = {"vocab_size": VOCAB}
    if family == "llama":
        model: PreTrainedModel = LlamaForCausalLM(LlamaConfig(
            **common, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(
            **common, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(
            **common, n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=128))
    elif family == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(
            **common, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
            num_attention_heads=4, max_position_embeddings=128))
    else:
        raise ValueError(family)
    return model.eval()


FAMILIES = ("llama", "qwen2", "gpt2", "gpt_neox")


@pytest.fixture(params=FAMILIES)
def tiny_model(request: pytest.FixtureRequest) -> PreTrainedModel:
    """A 4-block random model of each supported family, seeded."""
    torch.manual_seed(0)
    return _tiny(request.param)


@pytest.fixture
def tiny_llama() -> PreTrainedModel:
    torch.manual_seed(0)
    return _tiny("llama")


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over w0..w91 with <bos>=0, <eos>=1, <pad>=2, <unk>=3."""
    vocab = {"<bos>": 0, "<eos>": 1, "<pad>": 2, "<unk>": 3}
    vocab.update({word: i + 4 for i, word in enumerate(WORDS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>",
    )


def make_documents(n_docs: int, words_per_doc: int, seed: int = 0) -> list[str]:
    """Random documents over the tiny vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return [
        " ".join(WORDS[i] for i in torch.randint(len(WORDS), (words_per_doc,), generator=g))
        for _ in range(n_docs)
    ]
