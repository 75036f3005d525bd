"""TensorRT engines from the exported ONNX graphs, with token-axis profiles, cached.

An engine is specific to the graph, the TensorRT version and the GPU, so its cache key hashes
the dictionary fingerprint, the graph file's SHA-256, the precision, the profile, the TensorRT
version and the GPU name; a hit is loaded instead of rebuilt. ``tensorrt`` is imported only
here, when an engine is needed (``pip install 'resae-serve[gpu]'``). Not exercised in CI (no
GPU): the tests check the error raised where TensorRT is absent.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from resae_serve.cache import cache_dir

from .errors import ExportError, require
from .folder import ExportManifest, GraphEntry, update_manifest
from .spec import TOKENS, GraphSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenProfile:
    """One optimisation profile: sizes of the token axis, and of the watch / edit / slot axes."""

    min_tokens: int = 1
    opt_tokens: int = 256
    max_tokens: int = 4096
    max_aux: int = 256
    """Largest watch list, edits per token or code slots per token."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_tokens <= self.opt_tokens <= self.max_tokens or self.max_aux < 1:
            raise ExportError(f"profile {asdict(self)}: need 1 <= min_tokens <= opt_tokens <= "
                              "max_tokens and max_aux >= 1")

    def shapes(self, spec: GraphSpec) -> dict[str, tuple[tuple[int, ...], ...]]:
        """``{input: (min, opt, max)}`` shapes of every input of ``spec``."""
        def size(d: int | str, which: int) -> int:
            if isinstance(d, int):
                return d
            if d == TOKENS:
                return (self.min_tokens, self.opt_tokens, self.max_tokens)[which]
            return (1, min(8, self.max_aux), self.max_aux)[which]

        return {t.name: tuple(tuple(size(d, w) for d in t.dims) for w in range(3))
                for t in spec.inputs}


def engine_key(manifest: ExportManifest, entry: GraphEntry, profile: TokenProfile,
               trt_version: str, gpu: str) -> str:
    """Hex key naming the engine of one graph, profile, TensorRT version and GPU."""
    data = {"fingerprint": manifest.fingerprint, "graph": entry.sha256,
            "precision": entry.spec.precision, "profile": asdict(profile),
            "tensorrt": trt_version, "gpu": gpu}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:20]


def _gpu_name() -> str:
    import torch

    if not torch.cuda.is_available():
        raise ExportError("TensorRT engines need a CUDA GPU; torch sees none "
                          "(torch.cuda.is_available() is False)")
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} sm_{major}{minor}"


def build_engine(manifest: ExportManifest, entry: GraphEntry, *,
                 profile: TokenProfile | None = None, cache: Path | None = None) -> Path:
    """Path of the serialized engine for ``entry``, built unless the cache holds it."""
    trt = require("tensorrt", purpose="building TensorRT engines")
    profile = profile or TokenProfile()
    cache = Path(cache) if cache else cache_dir("tensorrt")
    cache.mkdir(parents=True, exist_ok=True)
    key = engine_key(manifest, entry, profile, trt.__version__, _gpu_name())
    path = cache / f"{entry.spec.name}.{entry.spec.precision}.{key}.engine"
    if path.is_file():
        logger.info("TensorRT engine cache hit: %s", path)
        return path
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # explicit batch is the only mode from 10 on
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(manifest.path(entry))):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT cannot parse {entry.file}: {errors}")
    config: Any = builder.create_builder_config()
    if entry.spec.precision == "float16":
        config.set_flag(trt.BuilderFlag.FP16)
    trt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.shapes(entry.spec).items():
        trt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(trt_profile)
    logger.info("building TensorRT engine for %s (tokens %d..%d); this takes a while",
                entry.file, profile.min_tokens, profile.max_tokens)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine for {entry.file}; rerun with "
                          "-v for the builder log")
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(path)
    return path


def build_engines(manifest: ExportManifest, *, profile: TokenProfile | None = None,
                  cache: Path | None = None) -> dict[str, str]:
    """Engines for every graph of an export folder; recorded in its manifest."""
    profile = profile or TokenProfile()
    built = {entry.file: str(build_engine(manifest, entry, profile=profile, cache=cache))
             for entry in manifest.graphs}
    update_manifest(manifest.folder, "tensorrt", {"profile": asdict(profile), "engines": built})
    return built
