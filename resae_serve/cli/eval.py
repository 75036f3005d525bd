"""``resae eval``: evaluate a dictionary (optionally against a baseline) and write a report."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from resae_serve.cli.capture import output_folder
from resae_serve.evaluation.report import EvalConfig, run_evaluation, write_report
from resae_serve.evaluation.splice import SPLICE_MODES

logger = logging.getLogger(__name__)


def parse_splice_modes(text: str) -> tuple[str, ...]:
    """``--modes teacher_forced,online`` as a tuple, naming what is allowed on error."""
    modes = tuple(m.strip().replace("-", "_") for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in SPLICE_MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"--modes {text!r}; allowed: "
                                         f"{', '.join(SPLICE_MODES)} (comma-separated)")
    return modes


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``resae eval``."""
    defaults = EvalConfig()
    p = subparsers.add_parser(
        "eval",
        help="reconstruction, splicing, redundancy and propagation metrics, as a report",
        description="Evaluate DIR (and each --against dictionary on the same tokens): "
        "held-out reconstruction per layer, CE under splicing of each layer alone (and, for a "
        "ReSAE, rebuilt locally from the clean previous layer) and all jointly (teacher-forced, "
        "teacher-forced additive and online), decoder redundancy between layers, and the "
        "linear-propagation check. Writes report.json, report.md and PNG plots into --out.",
    )
    p.add_argument("dictionary", type=Path, help="dictionary folder")
    p.add_argument("--against", type=Path, action="append", default=[],
                   help="another dictionary to compare with (repeatable)")
    p.add_argument("--out", type=output_folder, required=True, help="report folder to write")
    p.add_argument("--model", help="model folder or embedded name (default: the dictionary's)")
    p.add_argument("--corpus", help="corpus whose held-out split is used (default: the "
                   "dictionary's)")
    p.add_argument("--eval-tokens", type=int, help="held-out tokens for reconstruction "
                   "(default: the dictionary's eval_tokens)")
    p.add_argument("--splice-windows", type=int, default=defaults.splice_windows,
                   help="windows for splicing (default: %(default)s)")
    p.add_argument("--context-size", type=int, default=defaults.context_size,
                   help="tokens per splicing window (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size,
                   help="windows per forward pass (default: %(default)s)")
    p.add_argument("--modes", type=parse_splice_modes, default=defaults.modes,
                   help="joint splicing modes, comma-separated (default: "
                   f"{','.join(SPLICE_MODES)})")
    p.add_argument("--propagation-features", type=int, default=defaults.propagation_features,
                   help="features per layer for the propagation check, 0 skips it "
                   "(default: %(default)s)")
    p.add_argument("--propagation-windows", type=int, default=defaults.propagation_windows,
                   help="windows for the propagation check (default: %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the feature sample")
    p.set_defaults(run=run)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The headline numbers of a report, one block per dictionary."""
    lines = []
    for name, d in report["dictionaries"].items():
        s = d["splicing"]
        fve = " ".join(f"{r['layer']}:{r['fve']:.3f}" for r in d["reconstruction"])
        lines += [f"{name} ({d['mode']})", f"  FVE per layer       {fve}",
                  f"  CE clean {s['ce_clean']:.4f}; sum of single dCE "
                  f"{s['sum_single_delta_ce']:.4f}"]
        for mode, r in s["joint"].items():
            lines.append(f"  joint {mode:<15} dCE {r['delta_ce']:.4f}  KL {r['kl']:.4f}  "
                         f"interaction {s['interaction'][mode]:+.4f}")
        for r in d["redundancy"]:
            mapped = ("" if r["mapped>0.7"] is None else
                      f"; mapped >0.7 {r['mapped>0.7']:.1%} >0.9 {r['mapped>0.9']:.1%}")
            lines.append(f"  redundancy {r['layer']} vs {r['previous']}: raw >0.7 "
                         f"{r['raw>0.7']:.1%} >0.9 {r['raw>0.9']:.1%}{mapped}")
        for r in d["propagation"]:
            lines.append(f"  propagation {r['layer']}->{r['next_layer']}: cos {r['cosine']:.3f}"
                         f", norm ratio {r['norm_ratio']:.3f}, new {r['new_fraction']:.3f}")
    return lines


def run(args: argparse.Namespace) -> int:
    """Evaluate, write the report, print the headline numbers."""
    config = EvalConfig(eval_tokens=args.eval_tokens, splice_windows=args.splice_windows,
                        context_size=args.context_size, batch_size=args.batch_size,
                        modes=args.modes, propagation_features=args.propagation_features,
                        propagation_windows=args.propagation_windows, seed=args.seed)
    report, raw = run_evaluation([args.dictionary, *args.against], config, model=args.model,
                                 corpus=args.corpus, progress=not args.quiet)
    paths = write_report(args.out, report, raw)
    sys.stdout.write("\n".join([*summary_lines(report),
                                "wrote " + ", ".join(str(p) for p in paths)]) + "\n")
    return 0
