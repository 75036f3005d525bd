"""The memory plan (``resae_serve.engine.memory``): KV bytes per token from the model config,
the default KV cache from the configuration, weights from safetensors headers, the total."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from resae_serve.artifact import save_artifact
from resae_serve.engine.memory import (
    DICTIONARY_COPIES,
    GIB,
    KV_BLOCK_TOKENS,
    KV_HEADROOM,
    MIB,
    RUNTIME_BYTES,
    MemoryPlanError,
    available_memory,
    default_kv_cache_bytes,
    dtype_bytes,
    kv_bytes_per_token,
    plan_memory,
    safetensors_numel,
    weight_bytes,
)
from tests.unit.resae_fixtures import IDENTITY, tiny_resae

SMOLLM2 = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "head_dim": 64, "hidden_size": 576, "dtype": "float32"}


def test_kv_bytes_per_token_from_the_model_config() -> None:
    assert kv_bytes_per_token(SMOLLM2, 4) == 2 * 30 * 3 * 64 * 4 == 46080
    # no num_key_value_heads (GPT-NeoX): every head; no head_dim: hidden_size / heads
    neox = {"num_hidden_layers": 6, "num_attention_heads": 8, "hidden_size": 512}
    assert kv_bytes_per_token(neox, 2) == 2 * 6 * 8 * 64 * 2
    # a multimodal config keeps the language model under text_config (Gemma-3)
    assert kv_bytes_per_token({"text_config": SMOLLM2}, 2) == 23040
    with pytest.raises(MemoryPlanError, match="'num_hidden_layers' is None"):
        kv_bytes_per_token({"num_attention_heads": 4}, 4)


def test_dtype_bytes() -> None:
    assert dtype_bytes("float32", {}) == 4 and dtype_bytes("bfloat16", {}) == 2
    assert dtype_bytes("auto", {"torch_dtype": "bfloat16"}) == 2
    assert dtype_bytes("auto", {}) == 4                       # unknown: the larger, safe
    with pytest.raises(MemoryPlanError, match="dtype='int4'"):
        dtype_bytes("int4", {})


def test_default_kv_cache_follows_the_configuration() -> None:
    per_token = 46080
    base = default_kv_cache_bytes(per_token, 16, 2048)
    assert base == math.ceil(16 * 2048 * per_token * KV_HEADROOM / MIB) * MIB
    assert base % MIB == 0 and base >= 16 * 2048 * per_token
    # proportional to sequences and to their length (up to the MiB rounding)
    assert abs(default_kv_cache_bytes(per_token, 64, 2048) - 4 * base) <= 4 * MIB
    assert abs(default_kv_cache_bytes(per_token, 16, 8192) - 4 * base) <= 4 * MIB
    with pytest.raises(MemoryPlanError, match="max_num_seqs=0"):
        default_kv_cache_bytes(per_token, 0, 2048)


def test_default_kv_cache_holds_whole_blocks_and_the_null_block() -> None:
    """One sequence of 512 tokens needs 4 blocks of 128 plus vLLM's null block: 10 % headroom
    (563 tokens) would leave vLLM 3 usable blocks and it would refuse to start."""
    per_token = 46080
    assert default_kv_cache_bytes(per_token, 1, 512) >= 5 * KV_BLOCK_TOKENS * per_token
    assert default_kv_cache_bytes(per_token, 2, 130) >= 5 * KV_BLOCK_TOKENS * per_token


def _model(folder: Path) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=4, num_attention_heads=2,
                                         num_key_value_heads=1, max_position_embeddings=64))
    model.save_pretrained(folder)


def test_weights_are_counted_from_safetensors_headers(tmp_path: Path) -> None:
    _model(tmp_path / "model")
    (file,) = (tmp_path / "model").glob("*.safetensors")
    numel, stored = safetensors_numel(file)
    saved = sum(t.numel() for t in load_file(file).values())
    assert numel == saved and stored == 4 * saved
    assert weight_bytes(tmp_path / "model", 2) == 2 * numel


def test_plan_memory_default_explicit_and_gpu(tmp_path: Path) -> None:
    _model(tmp_path / "model")
    dictionary = save_artifact(tiny_resae(), tmp_path / "dict", IDENTITY)
    common = {"dtype": "float32", "max_num_seqs": 4, "max_model_len": 64, "max_configs": 2}
    plan = plan_memory(tmp_path / "model", dictionary, **common)   # type: ignore[arg-type]
    per_token = 2 * 4 * 1 * 4 * 4
    assert plan.kv_bytes_per_token == per_token
    assert plan.kv_cache == default_kv_cache_bytes(per_token, 4, 64)
    assert "max_num_seqs 4 × max_model_len 64" in plan.kv_source
    assert plan.kv_tokens >= 4 * 64
    files = sum(f.stat().st_size for f in dictionary.glob("*.safetensors"))
    assert plan.dictionary == DICTIONARY_COPIES * files and plan.runtime == RUNTIME_BYTES
    assert plan.total == (plan.weights + plan.kv_cache + plan.dictionary + plan.tables
                          + plan.runtime)
    assert "KV cache" in plan.describe() and "GiB" in plan.describe()
    explicit = plan_memory(tmp_path / "model", dictionary, kv_cache_bytes=GIB,  # type: ignore[arg-type]
                           kv_source="engine.kv_cache_gib", **common)
    assert (explicit.kv_cache, explicit.kv_source) == (GIB, "engine.kv_cache_gib")
    gpu = plan_memory(tmp_path / "model", dictionary, on_gpu=True, **common)  # type: ignore[arg-type]
    assert gpu.kv_cache is None and "gpu_memory_utilization" in gpu.kv_source
    assert gpu.kv_tokens == 0


def test_available_memory_is_read() -> None:
    available = available_memory()
    assert available is None or available > 0
