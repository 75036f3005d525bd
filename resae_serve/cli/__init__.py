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

SUBCOMMANDS = ("fetch", "capture", "train", "sweep", "import_", "eval", "features", "export",
               "export_saelens", "serve", "client")


def _command_module(name: str) -> str:
    """Module of the subcommand ``name`` (``import`` -> ``import_``, ``export-saelens`` ->
    ``export_saelens``)."""
    return {"import": "import_"}.get(name, name.replace("-", "_"))


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``resae`` argument parser: every subcommand, or just ``only`` (a subcommand's
    module imports what that command needs: ``resae train`` loads no gRPC, vLLM or export
    code)."""
    parser = argparse.ArgumentParser(
        prog="resae",
        description="Train, export and serve Residualized Sparse Autoencoders (ReSAEs).",
    )
    parser.add_argument("--version", action="version", version=f"resae-serve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS if only is None else (only,):
        module = importlib.import_module(f"resae_serve.cli.{name}")
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``resae`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    only = _command_module(command) if command is not None else None
    args = build_parser(only if only in SUBCOMMANDS else None).parse_args(argv)
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
