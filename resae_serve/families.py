"""Which decoder families the engine hooks, and whether a dictionary fits a model (no vLLM).

The engine puts ``resae::steer`` on the decoder blocks of the class vLLM builds for the model's
own architecture (:mod:`resae_serve.engine.model`); the architectures below are the ones whose
block outputs, transparency and interventions are checked against Hugging Face by
``tests/integration/test_families.py``. Any other architecture is refused at start: a model
loaded under another family's class can run silently wrong (its loader skips weights it has
no parameter for).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from resae_serve.errors import ResaeError

SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "Llama (Llama-2, Llama-3, SmolLM2)",
    "MistralForCausalLM": "Mistral",
    "Qwen2ForCausalLM": "Qwen2, Qwen2.5",
    "Qwen3ForCausalLM": "Qwen3",
    "Gemma2ForCausalLM": "Gemma-2",
    "Gemma3ForCausalLM": "Gemma-3 (text)",
    "GPTNeoXForCausalLM": "GPT-NeoX (Pythia)",
    "Phi3ForCausalLM": "Phi-3",
    "Olmo2ForCausalLM": "OLMo-2",
}
"""Hugging Face ``architectures[0]`` -> the family name users know it by."""

# vLLM derives a model's context limit from the first of these keys that the config sets
# (``vllm.config.model._get_and_verify_max_len``); rope scaling is applied by vLLM itself.
_MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                 "model_max_length", "max_sequence_length", "max_seq_length", "seq_len")


class UnsupportedModelError(ResaeError):
    """The model's architecture is not one the engine hooks, or the dictionary does not fit it."""


def read_model_config(folder: Path) -> dict[str, Any]:
    """The (text) config of a Hugging Face model folder as a dict."""
    path = folder / "config.json"
    try:
        config: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UnsupportedModelError(f"{path}: cannot read the model config: {exc}") from exc
    return config


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def supported_list() -> str:
    """The supported architectures, for messages."""
    return ", ".join(f"{arch} ({name})" for arch, name in SUPPORTED_ARCHITECTURES.items())


def model_architecture(folder: Path) -> str:
    """The model's architecture, refused unless the engine hooks it."""
    archs = read_model_config(folder).get("architectures") or []
    if not archs:
        raise UnsupportedModelError(
            f"{folder / 'config.json'}: field 'architectures' is missing; the engine needs it "
            f"to build the model. Supported: {supported_list()}")
    arch = str(archs[0])
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"model {folder}: architecture {arch!r} is not supported by the ReSAE hook. "
            f"Supported: {supported_list()}")
    return arch


def model_max_len(folder: Path) -> int | None:
    """The context limit the model's config declares (``None`` when it declares none)."""
    config = _text_config(read_model_config(folder))
    for key in _MAX_LEN_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_model_fits(folder: Path, dictionary: Path) -> str | None:
    """Refuse a dictionary whose model type, depth, width, layers or weight fingerprint differ
    from the model in ``folder`` (the fingerprint where the dictionary records one). Returns
    the model's fingerprint when it was compared, else ``None``."""
    from resae_serve.artifact import read_manifest
    from resae_serve.fingerprint import model_fingerprint

    manifest = read_manifest(dictionary)
    identity = manifest.model
    fingerprint = model_fingerprint(folder) if identity.fingerprint else None
    check_dictionary_fits(
        folder, model_type=identity.model_type, n_layers=identity.n_layers,
        d_model=manifest.d_model, layers=manifest.layers, fingerprint=identity.fingerprint,
        model_fingerprint=fingerprint, where=f"dictionary {dictionary} (for {identity.name!r})")
    return fingerprint


def check_dictionary_fits(folder: Path, *, model_type: str, n_layers: int, d_model: int,
                          layers: tuple[int, ...], fingerprint: str | None,
                          model_fingerprint: str | None = None, where: str = "dictionary"
                          ) -> None:
    """Refuse a dictionary whose model type, depth, width, layers or weight fingerprint differ
    from the model in ``folder``; the message names each field that differs."""
    config = read_model_config(folder)
    text = _text_config(config)
    ours = {"model_type": text.get("model_type", config.get("model_type")),
            "n_layers": text.get("num_hidden_layers"), "d_model": text.get("hidden_size")}
    theirs = {"model_type": model_type, "n_layers": n_layers, "d_model": d_model}
    diffs = [f"{key} {theirs[key]!r} (model: {ours[key]!r})" for key in ours
             if ours[key] != theirs[key]]
    if fingerprint and model_fingerprint and fingerprint != model_fingerprint:
        diffs.append(f"weight fingerprint {fingerprint} (model: {model_fingerprint})")
    if diffs:
        raise UnsupportedModelError(
            f"{where} does not fit model {folder}: {'; '.join(diffs)}. Serve the model it was "
            "trained on, or train / import a dictionary for this model")
    n_model = ours["n_layers"] if isinstance(ours["n_layers"], int) else n_layers
    if layers and (layers[0] < 0 or layers[-1] >= n_model):
        raise UnsupportedModelError(f"{where}: layers {list(layers)} but the model has "
                                    f"{n_model} blocks (0..{n_model - 1})")
