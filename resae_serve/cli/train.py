"""``resae train``: capture, calibrate and train a ReSAE (or layerwise baseline), save it."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from resae_serve.artifact import MANIFEST
from resae_serve.capture import DTYPES
from resae_serve.cli.capture import parse_layers, replaced_folder
from resae_serve.errors import ResaeError
from resae_serve.pipeline import (
    DataConfig,
    check_sae_settings,
    existing_summary,
    train_dictionary,
)
from resae_serve.resae import MODES
from resae_serve.saes import ARCHITECTURES
from resae_serve.train import TrainConfig, TrainError, resolve_device

logger = logging.getLogger(__name__)

# flag name -> config field, for flags whose name differs from the field
_RENAMES = {"arch": "architecture"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``resae train``."""
    p = subparsers.add_parser(
        "train",
        help="train a ReSAE (or a layerwise baseline) and save the dictionary",
        description="Capture activations (cached), fit the affine chain and scales on a "
        "calibration slice, train one SAE per layer in one pass, evaluate on held-out text and "
        "save the dictionary folder with training curves. Settings come from --config (JSON or "
        "TOML with TrainConfig / DataConfig field names) and are overridden by flags. An "
        "interrupted run resumes from OUT.checkpoint.pt when started again.",
    )
    p.add_argument("--out", type=replaced_folder(MANIFEST), required=True,
                   help="dictionary folder to write (replaced as a whole)")
    p.add_argument("--force", action="store_true",
                   help="retrain even if OUT already holds a dictionary with these settings")
    add_settings_arguments(p)
    p.add_argument("--mode", choices=MODES, help="resae (default) or layerwise")
    p.add_argument("--k", type=int, help="active latents per token (default: 32)")
    p.set_defaults(run=run)


def add_settings_arguments(p: argparse.ArgumentParser) -> None:
    """The training settings shared by ``resae train`` and ``resae sweep`` (all but mode and
    k), each overriding ``--config``."""
    p.add_argument("--config", type=Path, help="JSON or TOML file of settings")
    p.add_argument("--model", help="local Hugging Face folder or embedded name "
                   "(default: smollm2-135m)")
    p.add_argument("--corpus", help="named corpus or local path (default: brown)")
    p.add_argument("--layers", type=parse_layers, help="comma-separated block indices")
    p.add_argument("--arch", choices=[a for a in ARCHITECTURES if a != "jumprelu"],
                   help="SAE architecture (default: topk)")
    p.add_argument("--expansion", type=int, help="d_sae = expansion x d_model (default: 8)")
    p.add_argument("--d-sae", type=int, help="latents per layer (overrides --expansion)")
    p.add_argument("--tokens", type=int, help="training tokens (default: 500000)")
    p.add_argument("--batch-size", type=int, help="tokens per step (default: 1024)")
    p.add_argument("--lr", type=float, help="learning rate (default: scaled with d_sae)")
    p.add_argument("--seed", type=int, help="seed (default: 0)")
    p.add_argument("--calibration-tokens", type=int, help="tokens for the affine fit "
                   "(default: 50000)")
    p.add_argument("--eval-tokens", type=int, help="held-out tokens for metrics (default: 20000)")
    p.add_argument("--context-size", type=int, help="tokens per capture window (default: 256)")
    p.add_argument("--device", help="where to capture and train: auto (default: cuda when "
                   "available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="dtype activations are captured, "
                   "cached and fed in (default: bfloat16 on cuda, float32 on cpu); the SAEs "
                   "train in float32")


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ResaeError(f"--config {path}: cannot read ({exc.strerror})") from exc
    try:
        if path.suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        data = json.loads(text)
    except ValueError as exc:
        raise ResaeError(f"--config {path}: not valid {path.suffix[1:].upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise ResaeError(f"--config {path}: expected an object of settings")
    return data


def build_configs(args: argparse.Namespace, not_settings: frozenset[str] = frozenset(),
                  ) -> tuple[DataConfig, TrainConfig]:
    """Merge the config file and flags into the two configs, naming unknown keys
    (``not_settings``: a command's own flags that are not training settings)."""
    settings = _read_config_file(args.config) if args.config else {}
    for flag, value in vars(args).items():
        if value is not None and flag not in {"config", "out", "run", "command", "verbose",
                                               "quiet", "force", *not_settings}:
            settings[_RENAMES.get(flag, flag)] = value
    data_keys = {f.name for f in fields(DataConfig)}
    train_keys = {f.name for f in fields(TrainConfig)}
    unknown = sorted(settings.keys() - data_keys - train_keys)
    if unknown:
        raise ResaeError(f"unknown settings {unknown}; allowed: {sorted(data_keys | train_keys)}")
    if "layers" not in settings:
        raise ResaeError("layers not set: pass --layers 6,12,18,24 or put layers in --config")
    settings["layers"] = tuple(settings["layers"])
    data = DataConfig(**{k: v for k, v in settings.items() if k in data_keys})
    train = TrainConfig(**{k: v for k, v in settings.items() if k in train_keys})
    return data, train


def run(args: argparse.Namespace) -> int:
    """Train (unless already done), then print the held-out metrics per layer."""
    data, train = build_configs(args)
    summary = None if args.force else existing_summary(args.out, data, train)
    if summary is None:
        resolve_device(train.device)  # refuse cuda without CUDA before anything is captured
        check_sae_settings(data, train)
        try:
            summary = train_dictionary(data, train, args.out, progress=not args.quiet)
        except ValueError as exc:  # calibration reports too short a token stream this way
            raise TrainError(str(exc)) from exc
    fits = {row["layer"]: row for row in json.loads(
        (args.out / "manifest.json").read_text())["affine"]}
    lines = [f"{train.mode} dictionary in {args.out} ({summary['tokens_seen']} tokens, "
             f"{summary['steps']} steps); held-out metrics:",
             f"{'layer':>5} {'FVE':>7} {'input FVE':>9} {'L0':>6} {'dead':>6} {'affine R2':>9}"]
    for layer, row in summary["eval"].items():
        r2 = fits.get(int(layer), {}).get("r2")
        lines.append(f"{layer:>5} {row['fve']:7.3f} {row['input_fve']:9.3f} {row['l0']:6.1f} "
                     f"{row['dead_fraction']:6.1%} " + (f"{r2:9.3f}" if r2 is not None else
                                                          f"{'-':>9}"))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
