"""The ``resae`` command line: one sub-module per subcommand.

Each sub-module defines ``add_parser(subparsers)`` and ``run(args) -> int``. Library errors
(:class:`~resae_serve.errors.ResaeError`) and refusals of the operating system (``OSError``) end
the command with one line and exit status 2; anything else (likely a bug) with one line and
exit status 1. ``-v`` logs the traceback of either.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from resae_serve import __version__
from resae_serve.errors import ResaeError

SUBCOMMANDS = ("fetch", "capture", "train", "import_", "eval", "features", "export",
               "export_saelens", "serve", "client")


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
    log = logging.getLogger("resae")
    try:
        return int(args.run(args))
    except ResaeError as exc:
        log.debug("failed", exc_info=True)
        sys.stderr.write(f"resae {args.command}: error: {exc}\n")
        return 2
    except OSError as exc:  # the machine refused: permissions, a full disk, a missing path
        log.debug("failed", exc_info=True)
        what = exc.strerror or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = f": {exc.filename}" if exc.filename is not None and exc.strerror else ""
        sys.stderr.write(f"resae {args.command}: error: {what}{where}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as exc:  # unforeseen, likely a bug: one line here, the traceback with -v
        log.debug("unexpected error", exc_info=True)
        first = (str(exc).strip().splitlines() or [""])[0]
        sys.stderr.write(f"resae {args.command}: unexpected error: {type(exc).__name__}: "
                         f"{first} (-v shows the traceback)\n")
        return 1
