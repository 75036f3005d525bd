"""Tiny random decoder models of every supported family, saved as Hugging Face folders.

Each model has 3 blocks, d_model 128 and head_dim 64 (vLLM's CPU attention refuses head_dim 16
on AVX2 machines), a word-level tokenizer, and **random biases and norm weights**, so that a
tensor a loader drops (QKV biases, q/k norms, Gemma's extra norms) changes the outputs.
Weights are drawn with a larger spread than the configs' default so that greedy decoding is
well separated (no near-ties between the top two tokens).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 256
N_LAYERS = 3
D_MODEL = 128
MAX_POSITIONS = 512
WORDS = [f"w{i}" for i in range(VOCAB - 4)]

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=256, num_hidden_layers=N_LAYERS,
    num_attention_heads=2, max_position_embeddings=MAX_POSITIONS, bos_token_id=0,
    eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)

# Gemma ties the unembedding to the embedding (vLLM's Gemma has no lm_head).
_GEMMA = {**_COMMON, "tie_word_embeddings": True}


def _configs() -> dict[str, PretrainedConfig]:
    return {
        # Llama-3 style: llama3 rope scaling, rope_theta 5e5, grouped KV heads.
        "llama": LlamaConfig(**_COMMON, num_key_value_heads=1, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}),
        "mistral": MistralConfig(**_COMMON, num_key_value_heads=1, sliding_window=None),
        "qwen2": Qwen2Config(**_COMMON, num_key_value_heads=1),
        "qwen3": Qwen3Config(**_COMMON, num_key_value_heads=1, head_dim=64),
        "gemma2": Gemma2Config(**_GEMMA, num_key_value_heads=1, head_dim=64,
                               query_pre_attn_scalar=64, sliding_window=16,
                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
        "gemma3": Gemma3TextConfig(**_GEMMA, num_key_value_heads=1, head_dim=64,
                                   query_pre_attn_scalar=64, sliding_window=16,
                                   layer_types=["sliding_attention", "sliding_attention",
                                                "full_attention"]),
        "gpt_neox": GPTNeoXConfig(**{k: v for k, v in _COMMON.items()
                                     if k != "tie_word_embeddings"}, use_parallel_residual=True),
        "phi3": Phi3Config(**_COMMON, num_key_value_heads=1),
        "olmo2": Olmo2Config(**_COMMON, num_key_value_heads=1),
    }


FAMILIES = tuple(_configs())
"""Family names: the ``model_type`` of each tiny model, except ``gemma3`` (``gemma3_text``)."""


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over w0..w251 with <bos>=0, <eos>=1, <pad>=2, <unk>=3."""
    vocab = {"<bos>": 0, "<eos>": 1, "<pad>": 2, "<unk>": 3}
    vocab.update({word: i + 4 for i, word in enumerate(WORDS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>",
                                   eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def _randomize(model: PreTrainedModel, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                # norm weights around 1 (Gemma stores w of 1 + w: around 0)
                p.copy_((0.0 if "gemma" in model.config.model_type else 1.0) + 0.3 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)                      # biases
            else:
                p.copy_(noise / p.shape[-1] ** 0.5 * 1.5)  # weights


def build_tiny_model(family: str, folder: Path, seed: int = 0) -> Path:
    """Write the tiny ``family`` model and its tokenizer to ``folder`` (float32)."""
    config = _configs()[family]
    config.torch_dtype = torch.float32
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _randomize(model, seed)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def documents(n_docs: int, words_per_doc: int, seed: int = 0) -> list[str]:
    """Random documents over the tiny vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (words_per_doc,),
                                                      generator=g))
            for _ in range(n_docs)]


def load_reference(folder: Path) -> PreTrainedModel:
    """The Hugging Face reference model (float32, eager attention: SDPA drops Gemma-2's
    attention soft-capping)."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def block_outputs(model: PreTrainedModel, ids: list[int], layers: tuple[int, ...]
                  ) -> dict[int, torch.Tensor]:
    """Hugging Face block outputs ``(n, d)`` of one sequence at ``layers`` (float32)."""
    from resae_serve.capture import LayerCapture

    with LayerCapture(model, layers) as cap, torch.inference_mode():
        acts = cap.run(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    return {layer: acts[layer][0].float() for layer in layers}


def build_dictionary(model_folder: Path, out: Path, layers: tuple[int, ...] = (0, 1, 2),
                     d_sae: int = 256, seed: int = 0) -> Path:
    """A ReSAE for the tiny model: affine maps fitted by least squares on its activations,
    scales from them, random SAEs (TopK, ReLU, JumpReLU by layer) with biases set so that
    a few features fire per token."""
    from resae_serve.artifact import ModelIdentity, save_artifact
    from resae_serve.fingerprint import model_fingerprint
    from resae_serve.resae import ReSAE
    from resae_serve.saes import SAEConfig, build_sae

    model = load_reference(model_folder)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (4, 64), generator=g)
    acts = {layer: torch.cat([block_outputs(model, row.tolist(), layers)[layer] for row in ids])
            for layer in layers}
    affine: list[tuple[torch.Tensor, torch.Tensor] | None] = [None]
    inputs = [acts[layers[0]]]
    for prev, layer in itertools.pairwise(layers):
        x = torch.cat([acts[prev], torch.ones(len(acts[prev]), 1)], 1)
        sol = torch.linalg.lstsq(x, acts[layer]).solution                 # (d + 1, d)
        affine.append((sol[:-1].T.contiguous(), sol[-1].contiguous()))
        inputs.append(acts[layer] - x @ sol)
    scales = [float(u.pow(2).mean().sqrt()) for u in inputs]
    archs = ("topk", "relu", "jumprelu")
    torch.manual_seed(seed)
    saes = []
    for i, u in enumerate(inputs):
        arch = archs[i % len(archs)]
        sae = build_sae(SAEConfig(architecture=arch, d_in=D_MODEL, d_sae=d_sae, k=8))
        with torch.no_grad():
            pre = (u / scales[i] - sae.b_dec) @ sae.W_enc                  # (N, d_sae)
            # about 3 % of tokens fire each feature
            sae.b_enc.copy_(-pre.quantile(0.97, dim=0))
            if hasattr(sae, "threshold"):
                sae.threshold.fill_(0.05)
        saes.append(sae)
    resae = ReSAE(layers, saes, scales, mode="resae", affine=affine)
    config = model.config
    identity = ModelIdentity(model_folder.name, model_fingerprint(model_folder),
                             config.model_type, config.num_hidden_layers, config.hidden_size)
    return save_artifact(resae, out, identity)
