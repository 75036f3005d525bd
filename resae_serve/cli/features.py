"""``resae features``: build, show, label and search the feature catalog of a dictionary."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from resae_serve.catalog import (
    CatalogConfig,
    build_catalog,
    format_feature,
    load_catalog,
    save_catalog,
    set_label,
)
from resae_serve.corpus import load_documents
from resae_serve.errors import ResaeError
from resae_serve.evaluation.data import load_dictionaries
from resae_serve.models import load_model

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``resae features``."""
    p = subparsers.add_parser(
        "features",
        help="build, show, label or search a dictionary's feature catalog",
        description="--build measures every feature on held-out text and writes features.json "
        "into the dictionary folder (density, mean/max activation, top contexts, promoted "
        "tokens). --layer L --feature F prints one feature (add --label TEXT to name it). "
        "--search TEXT lists the features most active on TEXT relative to their average.",
    )
    p.add_argument("dictionary", type=Path, help="dictionary folder")
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--build", action="store_true", help="(re)build features.json")
    action.add_argument("--feature", type=int, help="feature id to print (with --layer)")
    action.add_argument("--search", metavar="TEXT", help="find features by text")
    p.add_argument("--layer", type=int, help="layer of --feature, or restrict --search to it")
    p.add_argument("--label", help="with --layer/--feature: set that feature's label "
                   "('' clears it)")
    p.add_argument("--top", type=int, default=10, help="features listed by --search "
                   "(default: %(default)s)")
    p.add_argument("--tokens", type=int, default=CatalogConfig.n_tokens,
                   help="held-out tokens for --build (default: %(default)s)")
    p.add_argument("--context-size", type=int, default=CatalogConfig.context_size,
                   help="tokens per window for --build (default: %(default)s)")
    p.add_argument("--model", help="model folder or embedded name (default: the dictionary's)")
    p.add_argument("--corpus", help="corpus for --build (default: the dictionary's; its "
                   "held-out split is used)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch to build / show / search."""
    if args.feature is not None:
        if args.layer is None:
            raise ResaeError("--feature needs --layer L")
        if args.label is not None:
            info = set_label(args.dictionary, args.layer, args.feature, args.label)
        else:
            info = load_catalog(args.dictionary).feature(args.layer, args.feature)
        sys.stdout.write(format_feature(info) + "\n")
        return 0
    if args.label is not None:
        raise ResaeError("--label needs --layer L --feature F")
    if args.top < 1:
        raise ResaeError(f"--top {args.top}; must be at least 1")
    catalog = None if args.build else load_catalog(args.dictionary)  # fail before the model
    if catalog is not None and args.layer is not None and args.layer not in catalog.layers:
        raise ResaeError(f"--layer {args.layer} is not in this dictionary; its layers are "
                         f"{list(catalog.layers)}")
    model_dir, (dictionary,) = load_dictionaries([args.dictionary], model=args.model,
                                                 corpus=args.corpus)
    model, tokenizer = load_model(model_dir)
    if args.build:
        config = CatalogConfig(n_tokens=args.tokens, context_size=args.context_size)
        documents = load_documents(dictionary.data.corpus, "heldout")
        data = build_catalog(dictionary.resae, model, tokenizer, documents, config,
                             progress=not args.quiet)
        path = save_catalog(args.dictionary, data)
        sys.stdout.write(f"wrote {path} ({data['n_tokens']} held-out tokens, layers "
                         f"{list(dictionary.resae.layers)})\n")
        return 0
    assert catalog is not None
    from resae_serve.evaluation.search import search_features

    layers = None if args.layer is None else (args.layer,)
    hits = search_features(dictionary.resae, model, tokenizer, catalog, args.search,
                           top=args.top, layers=layers, context=dictionary.manifest.context)
    lines = [f"features most active on {args.search!r} relative to their held-out average:",
             f"{'layer':>5} {'feature':>7} {'lift':>8} {'on text':>8} {'average':>8}  "
             "fires on / promotes / label"]
    for hit in hits:
        fires = " ".join(f"{tok!r}:{v:.2f}" for tok, v in hit.fires_on)
        lines.append(f"{hit.layer:>5} {hit.feature:>7} {hit.score:8.1f} {hit.mean_on_text:8.3f} "
                     f"{hit.corpus_mean:8.4f}  {fires}")
        extra = "promotes " + " ".join(repr(t) for t in hit.promoted[:5])
        if hit.label:
            extra = f"label: {hit.label}; " + extra
        lines.append(f"{'':>41}{extra}")
    if not hits:
        lines.append("(no feature fired on this text)")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
