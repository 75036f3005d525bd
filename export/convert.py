"""Conversion: a dictionary artifact -> ONNX graphs via ``torch.onnx.export(dynamo=True)``.

Each graph of :func:`export.spec.graph_spec` is traced from its module in :mod:`export.graphs`
with a dynamic token axis (and dynamic watch / edit / slot axes), given the spec's input and
output names, stamped with metadata properties and written beside an ``export_manifest.json``
(see :mod:`export.folder`). Checking the graphs is :mod:`export.validate`'s job.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resae_serve import __version__
from resae_serve.artifact import Manifest, load_artifact
from resae_serve.cache import atomic_folder, sha256_file
from resae_serve.resae import ReSAE

from .errors import ExportError, require
from .folder import ExportManifest, GraphEntry, dictionary_fingerprint, read_export_manifest
from .folder import write_json_atomic as _write_json
from .graphs import DTYPES, as_float32, dictionary_layout, graph_module, nest_inputs
from .oracle import oracle_outputs
from .probes import graph_inputs
from .spec import (
    EXPORT_MANIFEST,
    EXPORT_SCHEMA_VERSION,
    ExportConfig,
    GraphSpec,
    graph_specs,
    layer_feeds,
)

logger = logging.getLogger(__name__)

TRACE_TOKENS = 5
"""Token count of the tracing inputs: any size but 0 or 1, which torch.export specialises."""
_CHATTY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch._export", "torch.export")
# Warns once per torchvision op that torchvision is absent, which these graphs never use.
_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs every rewrite at INFO; keep that for ``-v`` (DEBUG) only."""
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    levels = {name: logging.WARNING for name in _CHATTY_LOGGERS}
    levels[_REGISTRATION_LOGGER] = logging.ERROR
    saved = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    try:
        with warnings.catch_warnings():
            # Every token axis is named "tokens" on purpose; the exporter warns it merges them.
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used")
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def export_artifact(artifact_dir: Path, out_dir: Path,
                    config: ExportConfig | None = None) -> ExportManifest:
    """Load the dictionary in ``artifact_dir`` (through :mod:`resae_serve.artifact`) and export
    it into ``out_dir``, which is replaced as a whole once every graph is written."""
    resae, manifest = load_artifact(Path(artifact_dir))
    return export_resae(resae, out_dir, config, source=_source(Path(artifact_dir), manifest))


def _source(artifact_dir: Path, manifest: Manifest) -> dict[str, Any]:
    return {"path": str(artifact_dir.resolve()), "schema_version": manifest.schema_version,
            "model": dict(manifest.model.__dict__)}


def export_resae(resae: ReSAE, out_dir: Path, config: ExportConfig | None = None, *,
                 source: dict[str, Any] | None = None) -> ExportManifest:
    """Export ``resae`` (e.g. one just loaded) into ``out_dir``; see :func:`export_artifact`."""
    config = config or ExportConfig()
    require("onnxscript", purpose="the dynamo ONNX exporter")
    onnx = require("onnx", purpose="ONNX export")
    resae = as_float32(resae)
    layout = dictionary_layout(resae)
    fingerprint = dictionary_fingerprint(resae)
    metadata = {
        "resae.fingerprint": fingerprint,
        "resae.model_fingerprint": str((source or {}).get("model", {}).get("fingerprint", "")),
        "resae.mode": resae.mode, "resae.layers": json.dumps(list(resae.layers)),
        "resae.d_model": str(resae.d_model), "resae.d_sae": json.dumps(list(layout.d_sae)),
        "resae.k": json.dumps(list(layout.k)),
        "resae.export_schema_version": str(EXPORT_SCHEMA_VERSION),
        "resae.package_version": __version__,
    }
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as tmp:
        entries = []
        for precision in config.precisions:
            for name in config.graphs:
                for spec in graph_specs(name, layout, precision, config.opset):
                    entries.append(export_graph(resae, spec, tmp, metadata, config))
        references = _write_references(resae, tmp, config)
        _write_json(tmp / EXPORT_MANIFEST, {
            "format": "resae-export", "schema_version": EXPORT_SCHEMA_VERSION,
            "package_version": __version__,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "exporter": {"torch": torch.__version__, "onnx": onnx.__version__, "dynamo": True,
                         "opset": config.opset},
            "layout": layout.to_dict(), "fingerprint": fingerprint,
            "artifact": source or {},
            "graphs": [e.to_dict() for e in entries],
            "references": references,
            "tolerances": {p: t.__dict__ for p, t in config.tolerances.items()},
            "validation": None,
        })
    logger.info("exported %d graphs of %s to %s", len(entries), fingerprint[:19], out_dir)
    return read_export_manifest(out_dir)


def _dynamic_shapes(spec: GraphSpec, n_layers: int) -> tuple[object, ...]:
    dims: dict[str, Any] = {}
    flat: list[Any] = []
    for tensor in spec.inputs:
        flat.append({axis: dims.setdefault(size, torch.export.Dim(size))
                     for axis, size in enumerate(tensor.dims) if isinstance(size, str)})
    if spec.name == "encode_layer":       # forward(*inputs): the varargs are one argument
        return (tuple(flat),)
    return nest_inputs(spec.name, flat, n_layers)


def _trace_inputs(resae: ReSAE, spec: GraphSpec, seed: int) -> tuple[object, ...]:
    if spec.name == "encode_layer":
        feeds = layer_feeds(spec, dictionary_layout(resae),
                            graph_inputs("encode", resae, "random", TRACE_TOKENS, seed))
    else:
        feeds = graph_inputs(spec.name, resae, "random", TRACE_TOKENS, seed)
    dtype = DTYPES[spec.precision]
    flat = []
    for t in spec.inputs:
        value = torch.from_numpy(feeds[t.name])
        if t.name.startswith("indices_") and value.shape[1] == 1:
            value = value.repeat(1, 2)  # a size-1 slot axis would be specialised to 1
        flat.append(value.to(dtype) if value.is_floating_point() else value)
    return nest_inputs(spec.name, flat, len(resae.layers))


def export_graph(resae: ReSAE, spec: GraphSpec, folder: Path, metadata: dict[str, str],
                 config: ExportConfig) -> GraphEntry:
    """Trace, convert and save one graph; returns its manifest entry."""
    module = graph_module(spec.name, resae, spec.precision, spec.layer)
    args = _trace_inputs(resae, spec, config.seed)
    logger.info("exporting %s (%s, opset %d)", spec.file, spec.precision, spec.opset)
    with _quiet_exporter():
        try:
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=spec.opset,
                input_names=spec.input_names, output_names=spec.output_names,
                dynamic_shapes=_dynamic_shapes(spec, len(resae.layers)), verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; keep the cause attached
            raise ExportError(f"torch.onnx.export(dynamo=True) failed for the {spec.name} graph "
                              f"({spec.precision}): {type(exc).__name__}: {exc}") from exc
    if program is None:  # only the legacy exporter returns None
        raise ExportError(f"torch.onnx.export returned no program for {spec.name}")
    program.model.metadata_props.update(
        {**metadata, "resae.graph": spec.name, "resae.precision": spec.precision,
         **({"resae.layer": str(spec.layer)} if spec.layer is not None else {})})
    program.model.doc_string = (f"resae-serve {spec.name} graph ({spec.precision}) of "
                                f"dictionary {metadata['resae.fingerprint']}")
    weight_bytes = sum(b.numel() * b.element_size() for b in module.buffers())
    external = (config.external_data if config.external_data is not None
                else weight_bytes > config.external_data_threshold)
    path = folder / spec.file
    program.save(str(path), external_data=external)
    data = [p.name for p in folder.glob(f"{spec.file}.data")] if external else []
    if external and not data:
        raise ExportError(f"{spec.file}: external data was requested but no "
                          f"{spec.file}.data was written")
    return GraphEntry(spec, spec.file, data[0] if data else None, sha256_file(path),
                      path.stat().st_size + sum((folder / d).stat().st_size for d in data))


def _write_references(resae: ReSAE, folder: Path, config: ExportConfig) -> dict[str, str]:
    """A few real-scale tokens per float32 graph with the torch ``ReSAE``'s outputs, as .npy."""
    if config.reference_tokens == 0:
        return {}
    written: dict[str, str] = {}
    for name in config.graphs:
        if name == "encode_layer":      # the encode graph's references cover it, per layer
            continue
        feeds = graph_inputs(name, resae, "real-scale", config.reference_tokens,
                             config.seed + 7)
        target = folder / "reference" / name
        target.mkdir(parents=True)
        for key, array in feeds.items():
            np.save(target / f"input.{key}.npy", array)
        for key, array in oracle_outputs(name, resae, feeds).items():
            np.save(target / f"output.{key}.npy", array)
        written[name] = f"reference/{name}"
    return written
