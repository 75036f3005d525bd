"""Capture throughput on the embedded model: stop-early versus a full forward, side by side.

Three ways to get the block outputs of layers 6, 12, 18, 24 of SmolLM2-135M (30 blocks):
  stop-early      LayerCapture hooks, the forward pass ends after block 24 (the library default)
  all blocks      the same hooks, every block runs (no unembedding)
  HF full forward ``model(..., output_hidden_states=True)``: all 30 blocks plus the unembedding
and the library's end-to-end ``capture_activations`` (tokenising included). All modes read the
same pre-built windows and are interleaved over several rounds; the median is reported.

    python -m benchmarks.capture [--rounds 3] [--batches 4] [--no-record]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from itertools import islice

import torch

from benchmarks._common import append_results, machine_description
from resae_serve.capture import CaptureConfig, LayerCapture, capture_activations
from resae_serve.corpus import load_documents
from resae_serve.models import load_model
from resae_serve.windows import TokenWindows, iter_token_windows

logger = logging.getLogger("benchmarks.capture")
LAYERS = (6, 12, 18, 24)


def _hooked(model: torch.nn.Module, stop_early: bool) -> Callable[[TokenWindows], int]:
    def run(win: TokenWindows) -> int:
        with LayerCapture(model, LAYERS, stop_early=stop_early) as cap:
            out = cap.run(win.input_ids, win.attention_mask)
        acts = torch.stack([out[layer][win.keep] for layer in LAYERS], dim=1)
        return len(acts)
    return run


def _hf_full(model: torch.nn.Module) -> Callable[[TokenWindows], int]:
    def run(win: TokenWindows) -> int:
        hs = model(input_ids=win.input_ids, attention_mask=win.attention_mask,
                   output_hidden_states=True, use_cache=False).hidden_states
        acts = torch.stack([hs[layer + 1][win.keep] for layer in LAYERS], dim=1)
        return len(acts)
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=4, help="batches of windows per round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context-size", type=int, default=256)
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model, tokenizer = load_model(args.model)
    docs = load_documents("brown", "train")
    windows = list(islice(iter_token_windows(docs, tokenizer, context_size=args.context_size,
                                             batch_size=args.batch_size), args.batches))
    n_tokens = sum(int(w.keep.sum()) for w in windows)
    # No outlier filter here: a dropped token would pull in one more forward batch to reach
    # n_tokens, and the row would time more work than the others.
    config = CaptureConfig(layers=LAYERS, context_size=args.context_size,
                           batch_size=args.batch_size, max_tokens=n_tokens, progress=False,
                           outlier_norm_ratio=None)

    def end_to_end() -> int:
        return sum(len(b.acts) for b in capture_activations(model, tokenizer, docs, config))

    modes: dict[str, Callable[[], int]] = {
        "stop-early (LayerCapture)": lambda: sum(map(_hooked(model, True), windows)),
        "all blocks (LayerCapture)": lambda: sum(map(_hooked(model, False), windows)),
        "HF full forward (output_hidden_states)": lambda: sum(map(_hf_full(model), windows)),
        "capture_activations end to end, stop-early": end_to_end,
    }
    rates: dict[str, list[float]] = {name: [] for name in modes}
    with torch.inference_mode():
        modes["stop-early (LayerCapture)"]()  # warm-up
        for round_ in range(args.rounds):
            for name, fn in modes.items():
                start = time.perf_counter()
                count = fn()
                rates[name].append(count / (time.perf_counter() - start))
                logger.info("round %d %-45s %8.0f tok/s", round_, name, rates[name][-1])

    baseline = statistics.median(rates["HF full forward (output_hidden_states)"])
    rows = ["| mode | tokens/s (median) | min–max | vs HF full forward |",
            "| --- | ---: | ---: | ---: |"]
    for name, values in rates.items():
        med = statistics.median(values)
        rows.append(f"| {name} | {med:.0f} | {min(values):.0f}–{max(values):.0f} "
                    f"| {med / baseline:.2f}× |")
    table = "\n".join(rows)
    sys.stdout.write(f"{machine_description()}\n{table}\n")
    if not args.no_record:
        append_results(
            "Capture throughput, SmolLM2-135M, layers 6,12,18,24",
            "python -m benchmarks.capture " + " ".join(sys.argv[1:]),
            table,
            f"{args.rounds} rounds × {n_tokens} captured tokens (windows of "
            f"{args.context_size}, batch {args.batch_size}, BOS skipped), float32, eager.",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
