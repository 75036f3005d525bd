"""Pretrained-SAE fixtures for the import tests, written by hand in each library's format.

Writers (no SAE library needed): :func:`write_saelens_fixture` (SAELens 5.x / 6.x folder),
:func:`write_sparsify_fixture` (one sparsify hookpoint folder), :func:`write_gemmascope_fixture`
(Gemma Scope ``params.npz`` under ``layer_<L>/width_16k/average_l0_71/``). Reference encoders
reproducing each library's ``encode`` from its source (cited on each) are the oracle when the
library is not installed; the tests also check the writers and encoders against the real
``sae-lens`` and ``eai-sparsify`` packages when they are.

To build an imported dictionary for a model folder (e.g. for a serving test)::

    model_dir = save_tiny_model(tmp_path / "model")          # or any HF model folder
    folder = build_imported_dictionary(model_dir, tmp_path / "dict", source="saelens",
                                       layers=(1, 3))
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from resae_serve.importers import import_dictionary, model_identity

D_MODEL, N_LAYERS, D_SAE, K = 64, 4, 128, 8
ATOL = 1e-4


def save_tiny_model(folder: Path, *, d_model: int = D_MODEL, n_layers: int = N_LAYERS,
                    seed: int = 0) -> Path:
    """A random Llama (config + safetensors weights, no tokenizer) saved in ``folder``."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=d_model, intermediate_size=2 * d_model,
        num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128))
    model.save_pretrained(folder)
    return folder


def model_d_model(model_dir: Path) -> int:
    """``hidden_size`` of a saved model folder."""
    return int(json.loads((Path(model_dir) / "config.json").read_text())["hidden_size"])


def random_tensors(d_in: int, d_sae: int = D_SAE, *, seed: int = 0,
                   threshold: bool = False) -> dict[str, torch.Tensor]:
    """SAELens-layout weights with non-zero biases and decoder rows that are not unit norm."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
               "b_enc": 0.1 * torch.randn(d_sae, generator=g),
               "W_dec": 0.5 * torch.randn(d_sae, d_in, generator=g) / d_in**0.5,
               "b_dec": 0.2 * torch.randn(d_in, generator=g)}
    if threshold:
        tensors["threshold"] = 0.3 * torch.rand(d_sae, generator=g)
    return tensors


def activations(d_in: int = D_MODEL, n: int = 64, seed: int = 7) -> torch.Tensor:
    """(n, d_in) float32 stand-ins for block outputs (non-zero mean, spread > 1)."""
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(n, d_in, generator=g) + 0.3


# ---------------------------------------------------------------------- SAELens


def write_saelens_fixture(
    folder: Path, *, d_in: int = D_MODEL, d_sae: int = D_SAE, layer: int = 1,
    hook_name: str | None = None, architecture: str = "topk", k: int = K, version: int = 6,
    apply_b_dec_to_input: bool = True, seed: int = 0, **cfg: Any,
) -> Path:
    """A SAELens SAE folder: ``cfg.json`` + ``sae_weights.safetensors``.

    ``architecture``: ``standard`` | ``topk`` | ``jumprelu``. Version 6 writes the nested
    layout of ``SAEConfig.to_dict`` (``sae_lens/saes/sae.py``, 6.x), version 5 the flat one
    (``hook_layer`` at the top, TopK as ``standard`` + ``activation_fn_str: topk``). ``cfg``
    adds or overrides top-level fields (e.g. ``rescale_acts_by_decoder_norm``).
    """
    hook_name = hook_name or f"blocks.{layer}.hook_resid_post"
    base: dict[str, Any] = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
                            "apply_b_dec_to_input": apply_b_dec_to_input,
                            "normalize_activations": "none"}
    if version >= 6:
        base |= {"reshape_activations": "none", "architecture": architecture,
                 "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version":
                              "6.54.12", "model_name": "tiny", "hook_name": hook_name,
                              "hook_head_index": None}}
        if architecture == "topk":
            base |= {"k": k, "rescale_acts_by_decoder_norm": False}
    else:
        index = int(hook_name.split(".")[1]) if hook_name.startswith("blocks.") else layer
        topk = architecture == "topk"
        base |= {"architecture": "standard" if topk else architecture,
                 "activation_fn_str": "topk" if topk else "relu",
                 "activation_fn_kwargs": {"k": k} if topk else {},
                 "model_name": "tiny", "hook_name": hook_name, "hook_layer": index,
                 "hook_head_index": None, "finetuning_scaling_factor": False,
                 "context_size": 128, "prepend_bos": True, "sae_lens_training_version": "5.9.1"}
    base |= cfg
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(base))
    save_file(random_tensors(d_in, d_sae, seed=seed, threshold=architecture == "jumprelu"),
              str(folder / "sae_weights.safetensors"))
    return folder


def saelens_encode(folder: Path, x: torch.Tensor) -> torch.Tensor:
    """SAELens' ``encode`` of raw ``x`` (N, d_in) -> (N, d_sae), reproduced from its source.

    ``SAE.process_sae_in`` (``sae_lens/saes/sae.py``): ``x − b_dec · apply_b_dec_to_input``;
    ``StandardSAE.encode`` (``standard_sae.py``): ReLU; ``TopKSAE.encode`` + ``TopK``
    (``topk_sae.py``): pre times ``‖W_dec‖`` rows if ``rescale_acts_by_decoder_norm``, top-k,
    ReLU; ``JumpReLUSAE.encode`` (``jumprelu_sae.py``): ``relu(pre) · (pre > threshold)``.
    Normalisation other than ``none`` is not reproduced (the real library checks those).
    """
    cfg = json.loads((folder / "cfg.json").read_text())
    w = {name: t.double() for name, t in load_file(str(folder / "sae_weights.safetensors")).items()}
    x = x.double() - w["b_dec"] * float(cfg.get("apply_b_dec_to_input", True))
    pre = x @ w["W_enc"] + w["b_enc"]
    architecture = cfg.get("architecture", "standard")
    if cfg.get("activation_fn_str") == "topk":  # 5.x TopK
        architecture, cfg["k"] = "topk", cfg["activation_fn_kwargs"]["k"]
    if architecture == "topk":
        if cfg.get("rescale_acts_by_decoder_norm", False):
            pre = pre * w["W_dec"].norm(dim=-1)
        values, indices = pre.topk(cfg["k"], dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())
    if architecture == "jumprelu":
        return pre.relu() * (pre > w["threshold"])
    return pre.relu()


# ---------------------------------------------------------------------- sparsify


def write_sparsify_fixture(folder: Path, *, d_in: int = D_MODEL, num_latents: int = D_SAE,
                           k: int = K, seed: int = 0, **cfg: Any) -> Path:
    """A sparsify SAE folder named after its hookpoint (e.g. ``…/layers.2``).

    As ``SparseCoder.save_to_disk`` (``sparsify/sparse_coder.py``): ``cfg.json`` = the
    ``SparseCoderConfig`` fields (``sparsify/config.py``) + ``d_in``; ``sae.safetensors`` =
    ``encoder.weight [d_sae, d_in]``, ``encoder.bias``, ``W_dec [d_sae, d_in]``, ``b_dec``
    (+ ``W_skip`` when ``skip_connection``).
    """
    base: dict[str, Any] = {"activation": "topk", "expansion_factor": 32,
                            "normalize_decoder": True, "num_latents": num_latents, "k": k,
                            "multi_topk": False, "skip_connection": False, "transcode": False}
    base |= cfg
    base["d_in"] = d_in
    t = random_tensors(d_in, num_latents, seed=seed)
    tensors = {"encoder.weight": t["W_enc"].T.contiguous(), "encoder.bias": t["b_enc"],
               "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if base["skip_connection"]:
        tensors["W_skip"] = torch.zeros(d_in, d_in)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(base))
    save_file(tensors, str(folder / "sae.safetensors"))
    return folder


def sparsify_encode(folder: Path, x: torch.Tensor) -> torch.Tensor:
    """Sparsify's ``SparseCoder.encode`` as dense codes (N, d_sae), from its source.

    ``sparse_coder.py``: ``x − b_dec`` (not for transcoders); ``fused_encoder.py``:
    ``relu(x Wᵀ + b)``, then ``topk(k)``; the (values, indices) pair scattered into zeros.
    """
    cfg = json.loads((folder / "cfg.json").read_text())
    w = {name: t.double() for name, t in load_file(str(folder / "sae.safetensors")).items()}
    pre = torch.relu((x.double() - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    values, indices = pre.topk(cfg["k"], dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, indices, values)


# ---------------------------------------------------------------------- Gemma Scope


def write_gemmascope_fixture(root: Path, *, layer: int, d_in: int = D_MODEL,
                             d_sae: int = D_SAE, seed: int = 0) -> Path:
    """``root/layer_<L>/width_16k/average_l0_71/params.npz`` with W_enc, W_dec, b_enc, b_dec,
    threshold (float32), the layout of the ``google/gemma-scope-*-res`` releases."""
    path = root / f"layer_{layer}" / "width_16k" / "average_l0_71" / "params.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    t = random_tensors(d_in, d_sae, seed=seed, threshold=True)
    arrays: dict[str, Any] = {name: tensor.numpy() for name, tensor in t.items()}
    np.savez(path, **arrays)
    return path


def gemmascope_encode(path: Path, x: torch.Tensor) -> torch.Tensor:
    """Gemma Scope's JumpReLU encode (the Gemma Scope tutorial's ``JumpReLUSAE.encode``, and
    SAELens' ``JumpReLUSAE`` with ``apply_b_dec_to_input: false`` from
    ``get_gemma_2_config_from_hf``): ``pre = x W_enc + b_enc``; ``(pre > θ) · relu(pre)``."""
    with np.load(path) as data:
        w = {name: torch.from_numpy(data[name]).double() for name in data.files}
    pre = x.double() @ w["W_enc"] + w["b_enc"]
    return (pre > w["threshold"]) * pre.relu()


# ---------------------------------------------------------------------- dictionaries


def build_imported_dictionary(model_dir: Path, out: Path, *, source: str = "saelens",
                              layers: Sequence[int] = (1, 3), seed: int = 0) -> Path:
    """Import random ``source`` SAEs (one per layer, d_in = the model's hidden size) for the
    model in ``model_dir`` as the dictionary folder ``out``; sources go to ``out-src/``."""
    d_in = model_d_model(model_dir)
    src = out.with_name(out.name + "-src")
    paths: list[Path] = []
    for i, layer in enumerate(layers):
        if source == "saelens":
            paths.append(write_saelens_fixture(src / f"layer_{layer}", d_in=d_in, layer=layer,
                                               seed=seed + i))
        elif source == "sparsify":
            paths.append(write_sparsify_fixture(src / f"layers.{layer}", d_in=d_in,
                                                seed=seed + i))
        elif source == "gemmascope":
            paths.append(write_gemmascope_fixture(src, layer=layer, d_in=d_in, seed=seed + i))
        else:
            raise ValueError(f"source={source!r}; allowed: saelens, sparsify, gemmascope")
    return import_dictionary(source, paths, out, model=model_identity(str(model_dir)))
