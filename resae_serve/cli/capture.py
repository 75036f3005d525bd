"""``resae capture``: stream activations of chosen layers, print throughput, optionally save."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from resae_serve.capture import DTYPES, ActivationBatch, CaptureConfig, capture_activations
from resae_serve.corpus import DEFAULT_CORPUS, load_documents
from resae_serve.models import DEFAULT_MODEL, load_model

logger = logging.getLogger(__name__)


class _TokenCounter:
    """Counts the tokens of a batch stream as it passes through."""

    def __init__(self) -> None:
        self.n_tokens = 0

    def count(self, stream: Iterator[ActivationBatch]) -> Iterator[ActivationBatch]:
        for batch in stream:
            self.n_tokens += len(batch.acts)
            yield batch


def parse_layers(text: str) -> tuple[int, ...]:
    """Parse ``"6,12,18"`` into block indices, naming the bad item on error."""
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--layers {text!r}: expected comma-separated block indices, e.g. 6,12,18"
        ) from None


def parse_device(text: str) -> str:
    """A torch device this machine can use (``cpu``, ``cuda``, ``cuda:1``), checked up front."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device; e.g. cpu, cuda, "
                                         "cuda:1") from None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:  # torch reports a missing backend either way
        reason = (str(exc).strip().split(". ")[0].splitlines() or [type(exc).__name__])[0]
        raise argparse.ArgumentTypeError(f"{text!r} is not usable here ({reason.rstrip('.')})"
                                         ) from None
    return text


def output_folder(text: str) -> Path:
    """An ``--out`` folder to write into: any path except an existing file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is an existing file; give a folder")
    return path


def replaced_folder(marker: str) -> Callable[[str], Path]:
    """An ``--out`` folder that is replaced as a whole: it must be new, empty, or an earlier
    output (holding ``marker``), so that nothing else in it is deleted."""

    def parse(text: str) -> Path:
        path = output_folder(text)
        if path.is_dir() and not (path / marker).is_file() and any(path.iterdir()):
            raise argparse.ArgumentTypeError(
                f"{text!r} holds files but no {marker}; it would be replaced as a whole, so "
                "give a new or empty folder (or an earlier output to overwrite)")
        return path

    return parse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``resae capture``."""
    p = subparsers.add_parser(
        "capture",
        help="capture residual-stream activations at chosen layers",
        description="Run the model over a corpus in fixed-length token windows and capture the "
        "output of the chosen decoder blocks (HF hidden_states[l+1]), stopping the forward "
        "pass after the deepest one. Prints throughput; with --out writes safetensors shards.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="local Hugging Face model folder or embedded name (default: %(default)s)")
    p.add_argument("--corpus", default=DEFAULT_CORPUS,
                   help="named corpus, .txt file, folder of .txt, or .jsonl with a 'text' field "
                   "(default: %(default)s)")
    p.add_argument("--split", default="train", choices=("train", "heldout", "all"))
    p.add_argument("--layers", type=parse_layers, default=(6, 12, 18, 24),
                   help="comma-separated block indices (default: 6,12,18,24)")
    p.add_argument("--context-size", type=int, default=256, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="storage dtype of activations")
    p.add_argument("--model-dtype", default="float32", choices=sorted(DTYPES),
                   help="dtype the model runs in")
    p.add_argument("--device", type=parse_device,
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device to run the model on (default: %(default)s)")
    p.add_argument("--no-skip-bos", dest="skip_bos", action="store_false",
                   help="keep the BOS position")
    p.add_argument("--no-prepend-bos", dest="prepend_bos", action="store_false",
                   help="do not start windows with BOS")
    p.add_argument("--no-pack", dest="pack", action="store_false",
                   help="one document per window (padded) instead of packing")
    p.add_argument("--keep-outliers", action="store_true",
                   help="keep tokens with massive norms (>10x the batch median, attention sinks)")
    p.add_argument("--full-forward", dest="stop_early", action="store_false",
                   help="run every block instead of stopping after the deepest requested one")
    p.add_argument("--shuffle-buffer", type=int, default=0,
                   help="shuffle through a buffer of this many tokens (0: corpus order)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=output_folder, default=None,
                   help="write safetensors shards here")
    p.add_argument("--tokens-per-shard", type=int, default=65_536)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Capture, report throughput, write shards when asked."""
    config = CaptureConfig(
        layers=args.layers, context_size=args.context_size, batch_size=args.batch_size,
        dtype=args.dtype, prepend_bos=args.prepend_bos, skip_bos=args.skip_bos,
        pack=args.pack, stop_early=args.stop_early,
        outlier_norm_ratio=None if args.keep_outliers else 10.0, max_tokens=args.max_tokens,
        shuffle_buffer=args.shuffle_buffer, seed=args.seed,
        progress=not args.quiet,
    )
    documents = load_documents(args.corpus, args.split)
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.model_dtype], device=args.device)
    logger.info("capturing layers %s of %s on %s", list(config.layers), args.model, args.device)
    counter = _TokenCounter()
    stream = counter.count(capture_activations(model, tokenizer, documents, config))
    start = time.perf_counter()
    if args.out is not None:
        from resae_serve.shards import write_shards

        write_shards(stream, args.out, layers=tuple(sorted(set(config.layers))),
                     tokens_per_shard=args.tokens_per_shard,
                     metadata={"model": str(args.model), "corpus": str(args.corpus),
                               "split": args.split, "config": config.__dict__})
    else:
        for _ in stream:
            pass
    n_tokens = counter.n_tokens
    seconds = time.perf_counter() - start
    sys.stdout.write(
        f"captured {n_tokens} tokens x {len(config.layers)} layers in {seconds:.1f} s: "
        f"{n_tokens / seconds:.0f} tokens/s"
        + (f"; shards in {args.out}" if args.out else "") + "\n"
    )
    return 0
