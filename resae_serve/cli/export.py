"""``resae export``: ONNX graphs (and TensorRT engines) from a dictionary folder, checked."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from resae_serve.cli.capture import replaced_folder
from resae_serve.export.convert import export_artifact
from resae_serve.export.errors import ExportError, ParityError, require
from resae_serve.export.folder import read_export_manifest
from resae_serve.export.probes import captured_activations
from resae_serve.export.spec import EXPORT_MANIFEST, GRAPHS, MIN_OPSET, ExportConfig
from resae_serve.export.validate import summarize, validate_export

logger = logging.getLogger(__name__)


def _graphs(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in GRAPHS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}; allowed: comma-separated names from "
                                         f"{', '.join(GRAPHS)}")
    return names


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``resae export``."""
    p = subparsers.add_parser(
        "export", help="export a dictionary to ONNX graphs (and TensorRT engines)",
        description="Write encode / intervention / decode ONNX graphs and one encode_layer "
        "graph per layer (what `resae serve` monitors with; dynamo exporter, dynamic "
        "token axis, named inputs and outputs) of the dictionary in DIR into EXPORT_DIR with an "
        "export_manifest.json and reference outputs. --check compares every graph with the "
        "torch ReSAE through onnxruntime and fails (exit 2) on a parity error.",
    )
    p.add_argument("dictionary", type=Path, metavar="DIR", help="dictionary folder")
    p.add_argument("--out", type=replaced_folder(EXPORT_MANIFEST), required=True,
                   metavar="EXPORT_DIR", help="export folder to write (replaced as a whole)")
    p.add_argument("--fp16", action="store_true", help="also export float16 graphs")
    p.add_argument("--tensorrt", action="store_true",
                   help="also build TensorRT engines (needs a GPU and resae-serve[gpu])")
    p.add_argument("--check", action="store_true",
                   help="validate the graphs against the torch ReSAE (onnxruntime, CPU)")
    p.add_argument("--check-acts", type=Path, metavar="SHARDS",
                   help="with --check, also compare on captured activations (a `resae "
                   "capture` shard folder holding the dictionary's layers)")
    p.add_argument("--check-tokens", type=int, default=256,
                   help="tokens of --check-acts to use (default: 256)")
    p.add_argument("--graphs", type=_graphs, default=GRAPHS,
                   help=f"graphs to export (default: {','.join(GRAPHS)})")
    p.add_argument("--external-data", action="store_true",
                   help="store weights beside the graphs (default: only above 100 MiB)")
    p.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset (>= {MIN_OPSET})")
    p.add_argument("--max-tokens", type=int, default=4096,
                   help="largest token batch of the TensorRT profile (default: 4096)")
    p.set_defaults(run=run)


def _check_args(args: argparse.Namespace) -> None:
    """Refuse flag combinations the export would ignore or fail on late."""
    if args.check_acts is not None and not args.check:
        raise ExportError(f"--check-acts {args.check_acts} needs --check")
    if args.check_tokens < 1:
        raise ExportError(f"--check-tokens {args.check_tokens}; must be at least 1")
    onnx = require("onnx", purpose="ONNX export")
    newest = int(onnx.defs.onnx_opset_version())
    if args.opset > newest:  # the exporter would silently write a lower opset
        raise ExportError(f"--opset {args.opset}; allowed: {MIN_OPSET}..{newest} (the newest "
                          f"opset of the installed onnx {onnx.__version__})")


def run(args: argparse.Namespace) -> int:
    """Export, then optionally validate and build engines; print what was written."""
    _check_args(args)
    config = ExportConfig(precisions=("float32", "float16") if args.fp16 else ("float32",),
                          graphs=args.graphs, opset=args.opset,
                          external_data=True if args.external_data else None)
    manifest = export_artifact(args.dictionary, args.out, config)
    lines = [f"exported {manifest.fingerprint[:19]}… ({manifest.layout.mode}, layers "
             f"{list(manifest.layout.layers)}) to {args.out}:"]
    lines += [f"  {g.file:24s} {g.bytes / 2**20:8.2f} MiB"
              + (f"  (weights in {g.external_data})" if g.external_data else "")
              for g in manifest.graphs]
    if args.check:
        real = (captured_activations(args.check_acts, manifest.layout.layers, args.check_tokens)
                if args.check_acts else None)
        report = validate_export(args.out, real_acts=real, strict=False)
        lines.append("parity vs torch ReSAE (onnxruntime CPU), worst per graph:")
        lines += [f"  {g.file:24s} "
                  f"{summarize(report.of_graph(g.spec.name, g.spec.precision, g.spec.layer))}"
                  for g in manifest.graphs]
        if not report.passed:  # the summary first, then the one-line reason (exit 2)
            sys.stdout.write("\n".join(lines) + "\n")
            raise ParityError(f"parity check failed: {report.worst().describe()}")
    if args.tensorrt:
        from resae_serve.export.trt_engine import TokenProfile, build_engines

        engines = build_engines(read_export_manifest(args.out),
                                profile=TokenProfile(max_tokens=args.max_tokens,
                                                     opt_tokens=min(256, args.max_tokens)))
        lines += [f"  TensorRT engine {path}" for path in engines.values()]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
