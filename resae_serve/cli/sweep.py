"""``resae sweep``: the sparsity–fidelity frontier, ReSAE vs layerwise, as one command."""

from __future__ import annotations

import argparse
import sys

from resae_serve.cli.capture import output_folder
from resae_serve.cli.eval import parse_splice_modes
from resae_serve.cli.train import add_settings_arguments, build_configs
from resae_serve.evaluation.report import EvalConfig
from resae_serve.resae import MODES
from resae_serve.sweep import SweepConfig, run_sweep
from resae_serve.train import resolve_device

# sweep flags that are not training settings (build_configs must not read them)
_OWN_FLAGS = frozenset({"report", "ks", "modes", "splice_windows", "splice_context_size",
                        "splice_batch_size", "splice_modes"})


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--ks {text!r}: expected comma-separated integers, e.g. 16,32,64,128") from None


def _dict_modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"--modes {text!r}; allowed: {', '.join(MODES)} "
                                         "(comma-separated)")
    return modes


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``resae sweep``."""
    defaults, evaluation = SweepConfig(), SweepConfig().evaluation
    p = subparsers.add_parser(
        "sweep",
        help="train ReSAE and layerwise dictionaries over a grid of k, evaluate them on the "
        "same tokens and write the frontier report",
        description="Train one dictionary per mode and k (same layers, width, data and seed; "
        "the activations are captured once), skipping runs already in OUT with these "
        "settings; evaluate all of them together (reconstruction, splicing alone, local and "
        "joint in every mode) and write REPORT/report.md with frontier.json and plots. "
        "Training settings are those of `resae train`.",
    )
    p.add_argument("--out", type=output_folder, required=True,
                   help="folder of the runs (one dictionary folder each) and their evaluation")
    p.add_argument("--report", type=output_folder,
                   help="folder of the frontier report (default: OUT/report)")
    p.add_argument("--force", action="store_true", help="retrain every run")
    p.add_argument("--ks", type=_ints, default=defaults.ks,
                   help="comma-separated k values (default: 16,32,64,128)")
    p.add_argument("--modes", type=_dict_modes, default=defaults.modes,
                   help="comma-separated dictionary modes (default: resae,layerwise)")
    p.add_argument("--splice-windows", type=int, default=evaluation.splice_windows,
                   help="held-out windows for splicing (default: %(default)s)")
    p.add_argument("--splice-context-size", type=int, default=evaluation.context_size,
                   help="tokens per splicing window (default: %(default)s)")
    p.add_argument("--splice-batch-size", type=int, default=evaluation.batch_size,
                   help="windows per forward pass (default: %(default)s)")
    p.add_argument("--splice-modes", type=parse_splice_modes, default=evaluation.modes,
                   help="joint splicing modes (default: all)")
    add_settings_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the sweep and print where the report is."""
    data, base = build_configs(args, _OWN_FLAGS)
    resolve_device(base.device)   # refuse cuda without CUDA before anything is captured
    evaluation = EvalConfig(splice_windows=args.splice_windows,
                            context_size=args.splice_context_size,
                            batch_size=args.splice_batch_size, modes=args.splice_modes,
                            propagation_features=0)
    sweep = SweepConfig(ks=args.ks, modes=args.modes, evaluation=evaluation)
    report_dir = args.report or args.out / "report"
    table = run_sweep(data, base, sweep, args.out, report_dir, force=args.force,
                      progress=not args.quiet)
    lines = [f"{'k':>4} {'mode':<10} {'L0':>6} {'FVE':>7} "
             + " ".join(f"{'dCE ' + m[:10]:>16}" for m in sweep.evaluation.modes)]
    for r in table["runs"]:
        lines.append(f"{r['k']:>4} {r['mode']:<10} {r['l0']:6.1f} {r['fve']:7.4f} "
                     + " ".join(f"{r['joint'][m]['delta_ce']:16.4f}"
                                for m in sweep.evaluation.modes))
    lines.append(f"wrote {report_dir / 'report.md'}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
