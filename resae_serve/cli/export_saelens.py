"""``resae export-saelens``: a layerwise dictionary as one SAELens SAE folder per layer."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from resae_serve.saelens_io import DEFAULT_HOOK_TEMPLATE, export_saelens


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``resae export-saelens``."""
    p = subparsers.add_parser(
        "export-saelens", help="export a layerwise dictionary to SAELens folders",
        description="Write one SAELens 6.x SAE folder per layer of the dictionary in DIR, "
        "OUT/layer_<L>/ with cfg.json and sae_weights.safetensors, scales folded into the "
        "weights so each SAE reads raw block outputs (SAE.load_from_disk reads them). Only "
        "layerwise dictionaries (or one-layer resae ones) can be exported.",
    )
    p.add_argument("dictionary", type=Path, metavar="DIR", help="dictionary folder")
    p.add_argument("--out", type=Path, required=True, metavar="OUT",
                   help="folder to write the layer_<L>/ folders into")
    p.add_argument("--hook-template", default=DEFAULT_HOOK_TEMPLATE, metavar="TEMPLATE",
                   help="hook name written into each cfg.json, {layer} replaced by the block "
                   f"index (default: {DEFAULT_HOOK_TEMPLATE}; e.g. model.layers.{{layer}})")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Export, then print the folders written."""
    folders = export_saelens(args.dictionary, args.out, hook_template=args.hook_template)
    lines = [f"exported {len(folders)} SAELens SAEs to {args.out}:"]
    lines += [f"  {folder}" for folder in folders]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
