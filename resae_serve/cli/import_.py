"""``resae import``: SAEs of SAELens, sparsify or Gemma Scope as one layerwise dictionary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from resae_serve.importers import SOURCES, import_dictionary, model_identity
from resae_serve.importers.hooks import ALLOWED_HOOKS

_DESCRIPTION = f"""\
Write the SAEs in SRC... (one per layer) as one layerwise dictionary folder for MODEL,
which `resae serve`, `eval`, `features` and `export` take. Library options are folded
into the weights so the codes equal the library's own encode; what cannot be folded is
refused with the file named.

sources:
  saelens     SAELens 5.x / 6.x folders (cfg.json + sae_weights.safetensors): standard
              (ReLU), topk, jumprelu; the layer comes from the hook name
  sparsify    EleutherAI sparsify folders (cfg.json + sae.safetensors), TopK; the layer
              comes from the folder name (its hookpoint, e.g. layers.6); a checkpoint
              folder of several hookpoints expands to all of them
  gemmascope  Gemma Scope params.npz (or the folder holding it), JumpReLU; the file does
              not say its layer: it comes from the conventional path
              layer_<L>/width_16k/average_l0_71/params.npz, or from --layers

hook points accepted (block outputs):
  {", ".join(ALLOWED_HOOKS[:3])},
  {", ".join(ALLOWED_HOOKS[3:])}
"""


def _layers(text: str) -> list[int]:
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}; expected comma-separated block indices, "
                                         "e.g. 6,12") from None
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}; expected block indices >= 0, e.g. 6,12")
    return layers


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}; expected an integer >= 1")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``resae import``."""
    p = subparsers.add_parser(
        "import", help="import pretrained SAEs (SAELens, sparsify, Gemma Scope) as a dictionary",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_DESCRIPTION,
    )
    p.add_argument("source", choices=tuple(SOURCES), help="library the SAEs come from")
    p.add_argument("sources", type=Path, nargs="+", metavar="SRC",
                   help="SAE folders (or a folder of them; for gemmascope, params.npz files)")
    p.add_argument("--model", required=True,
                   help="the model the SAEs read: a Hugging Face folder or embedded name "
                   "(its fingerprint, d_model and block count go into the manifest)")
    p.add_argument("--out", type=Path, required=True, metavar="DICT",
                   help="dictionary folder to write (replaced as a whole)")
    p.add_argument("--layers", type=_layers,
                   help="comma-separated block index per SAE, in the order found (needed for "
                   "Gemma Scope files outside layer_<L>/ folders; elsewhere it must agree)")
    p.add_argument("--k", type=_positive, metavar="K",
                   help="codes per token that sparse encoding keeps for ReLU / JumpReLU SAEs "
                   "(default 32; TopK SAEs keep their own k)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Import, then print what was written."""
    model = model_identity(args.model)
    out = import_dictionary(args.source, args.sources, args.out, model=model,
                            layers=args.layers, k=args.k)
    from resae_serve.artifact import read_manifest

    manifest = read_manifest(out)
    lines = [f"imported {len(manifest.layers)} {args.source} SAEs for {model.name} "
             f"(d_model {model.d_model}) into {out}:"]
    sources = manifest.training.get("sources", {})
    for layer, config in zip(manifest.layers, manifest.sae_configs, strict=True):
        lines.append(f"  layer {layer:3d}  {config.architecture:8s} d_sae {config.d_sae:7d}  "
                     f"k {config.k:4d}  from {sources.get(str(layer), '?')}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
