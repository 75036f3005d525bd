"""The ``resae`` command line: one sub-module per subcommand.

Each sub-module defines ``add_parser(subparsers)`` and ``run(args) -> int``. Library errors
(:class:`~resae_serve.errors.ResaeError`) end the command with their message and exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from resae_serve import __version__
from resae_serve.errors import ResaeError

SUBCOMMANDS = ("fetch", "capture", "train", "eval", "features", "export", "serve", "client")


def build_parser() -> argparse.ArgumentParser:
    """The full ``resae`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="resae",
        description="Train, export and serve Residualized Sparse Autoencoders (ReSAEs).",
    )
    parser.add_argument("--version", action="version", version=f"resae-serve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"resae_serve.cli.{name}")
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``resae`` console script."""
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return int(args.run(args))
    except ResaeError as exc:
        logging.getLogger("resae").debug("failed", exc_info=True)
        sys.stderr.write(f"resae {args.command}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
