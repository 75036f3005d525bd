"""The export folder: ``export_manifest.json`` beside the graphs, and the dictionary fingerprint.

    export_manifest.json   schema version, package version, dictionary layout and fingerprint,
                           source artifact, one entry per graph (file, precision, opset, named
                           inputs/outputs, SHA-256), validation results, TensorRT engines
    encode.onnx, …         float32 graphs; ``*.fp16.onnx`` float16 ones; ``*.onnx.data``
                           external weights where written
    reference/<graph>/     ``input.<name>.npy`` / ``output.<name>.npy``: a few tokens with the
                           torch ``ReSAE``'s outputs, for checks that need nothing but numpy
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resae_serve.resae import ReSAE

from .errors import ExportError
from .spec import EXPORT_MANIFEST, EXPORT_SCHEMA_VERSION, DictionaryLayout, GraphSpec, TensorSpec


def dictionary_fingerprint(resae: ReSAE) -> str:
    """``sha256:<hex>`` over mode, layers, scales, SAE configs and every tensor's values.

    Content-based, so two artifacts holding the same dictionary agree whatever their files.
    """
    digest = hashlib.sha256(json.dumps({
        "mode": resae.mode, "layers": list(resae.layers),
        "saes": [sae.config.to_dict() for sae in resae.saes],
    }, sort_keys=True).encode())
    for name, tensor in sorted(resae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


@dataclass(frozen=True)
class GraphEntry:
    """One graph file of an export folder."""

    spec: GraphSpec
    file: str
    external_data: str | None
    """Name of the weights file beside it, or ``None`` when the weights are inside."""
    sha256: str
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        s = self.spec
        return {"graph": s.name, "layer": s.layer, "precision": s.precision, "opset": s.opset,
                "file": self.file,
                "external_data": self.external_data, "sha256": self.sha256, "bytes": self.bytes,
                "inputs": [t.to_dict() for t in s.inputs],
                "outputs": [t.to_dict() for t in s.outputs]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GraphEntry:
        def tensors(key: str) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["dims"])) for t in d[key])

        spec = GraphSpec(d["graph"], d["precision"], d["opset"], tensors("inputs"),
                         tensors("outputs"), d.get("layer"))
        return cls(spec, d["file"], d.get("external_data"), d["sha256"], d["bytes"])


@dataclass(frozen=True)
class ExportManifest:
    """The parsed ``export_manifest.json``."""

    folder: Path
    layout: DictionaryLayout
    fingerprint: str
    """:func:`dictionary_fingerprint` of the exported dictionary."""
    artifact: dict[str, Any]
    """Source folder, model identity, package version."""
    graphs: tuple[GraphEntry, ...]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    def graph(self, name: str, precision: str = "float32",
              layer: int | None = None) -> GraphEntry:
        """The entry of graph ``name`` in ``precision`` (``layer``: of a per-layer graph),
        with a clear error when absent."""
        for entry in self.graphs:
            if (entry.spec.name == name and entry.spec.precision == precision
                    and entry.spec.layer == layer):
                return entry
        have = [entry.spec.file for entry in self.graphs]
        what = name if layer is None else f"{name} (layer {layer})"
        raise ExportError(f"{self.folder}: no {what} graph in {precision}; the folder holds "
                          f"{have} (export with --fp16 for float16 graphs, and with the "
                          "default --graphs for encode_layer)")

    def path(self, entry: GraphEntry) -> Path:
        return self.folder / entry.file


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON through a temporary sibling, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
    Path(tmp).replace(path)


def read_raw_manifest(folder: Path) -> dict[str, Any]:
    """The JSON of ``folder/export_manifest.json``, checked for format and schema version."""
    path = Path(folder) / EXPORT_MANIFEST
    if not path.is_file():
        raise ExportError(f"{path} not found: {folder} is not a resae export folder "
                          "(create one with `resae export DICTIONARY --out FOLDER`)")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise ExportError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != "resae-export":
        raise ExportError(f"{path}: field 'format' is not 'resae-export'")
    version = raw.get("schema_version")
    if version != EXPORT_SCHEMA_VERSION:
        raise ExportError(f"{path}: schema_version={version!r}; this resae-serve reads "
                          f"{EXPORT_SCHEMA_VERSION}; export the dictionary again")
    return raw


def read_export_manifest(folder: Path) -> ExportManifest:
    """Parse an export folder's manifest."""
    folder = Path(folder)
    raw = read_raw_manifest(folder)
    try:
        return ExportManifest(folder, DictionaryLayout.from_dict(raw["layout"]),
                              raw["fingerprint"], raw["artifact"],
                              tuple(GraphEntry.from_dict(g) for g in raw["graphs"]), raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"{folder / EXPORT_MANIFEST}: field {exc} is missing or "
                          "invalid") from exc


def update_manifest(folder: Path, key: str, value: Any) -> None:
    """Set one top-level section (``validation``, ``tensorrt``) of the manifest."""
    raw = read_raw_manifest(folder)
    raw[key] = value
    write_json_atomic(Path(folder) / EXPORT_MANIFEST, raw)
