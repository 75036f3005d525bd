"""Training throughput on the embedded model, stage by stage, against the machine's matmul rate.

Stages, each timed on its own over the same activations:
  capture      model forward to block 24 + hooks (layers 6, 12, 18, 24), tokens/s
  affine fit   streaming float64 statistics for the 3 pairs, tokens/s; then the closed-form
               solve with the λ grid, seconds
  SAE step     one optimiser step of 4 TopK SAEs (8× expansion, k=32), tokens/s and achieved
               GFLOP/s, counting the three dense products per layer (encoder forward, the
               encoder's weight and input gradients: 6·B·d·d_sae) against the fp32 matmul rate
               measured here at the same shape

    python -m benchmarks.train [--tokens 16384] [--no-record]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from benchmarks._common import append_results, machine_description
from resae_serve.affine import AffineStats, fit_affine
from resae_serve.capture import CaptureConfig, capture_activations
from resae_serve.corpus import load_documents
from resae_serve.models import load_model
from resae_serve.train import ReSAETrainer, TrainConfig, rebatch

logger = logging.getLogger("benchmarks.train")
LAYERS = (6, 12, 18, 24)


def matmul_gflops(m: int, k: int, n: int, repeats: int = 10) -> float:
    """Measured fp32 GEMM rate at shape (m, k) @ (k, n)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16_384)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model, tokenizer = load_model("smollm2-135m")
    config = CaptureConfig(layers=LAYERS, max_tokens=args.tokens, progress=False)
    start = time.perf_counter()
    acts = torch.cat([b.acts for b in capture_activations(
        model, tokenizer, load_documents("brown", "train"), config)])
    capture_rate = len(acts) / (time.perf_counter() - start)
    d = acts.shape[-1]

    start = time.perf_counter()
    stats = [(AffineStats(d, d), AffineStats(d, d)) for _ in LAYERS[1:]]
    split = int(len(acts) * 0.9)
    for i, (fit_part, held_part) in enumerate(stats, start=1):
        fit_part.update(acts[:split, i - 1], acts[:split, i])
        held_part.update(acts[split:, i - 1], acts[split:, i])
    stats_rate = len(acts) / (time.perf_counter() - start)
    start = time.perf_counter()
    fits = [fit_affine(a, b) for a, b in stats]
    solve_seconds = time.perf_counter() - start

    train = TrainConfig(layers=LAYERS, tokens=len(acts), batch_size=args.batch_size,
                        checkpoint_every=0, log_every=10_000)
    trainer = ReSAETrainer.create(
        train, d_model=d, scales=[1.0] * len(LAYERS),
        affine=[None, *((f.A, f.c) for f in fits)], init_sample=acts[:4096])
    batches = list(rebatch([acts], args.batch_size))
    trainer.train_step(batches[0])  # warm-up
    start = time.perf_counter()
    for batch in batches[1:]:
        trainer.train_step(batch)
    seconds = time.perf_counter() - start
    n_train = sum(len(b) for b in batches[1:])
    d_sae = trainer.resae.saes[0].config.d_sae
    achieved = 6 * n_train * d * d_sae * len(LAYERS) / seconds / 1e9
    peak = matmul_gflops(args.batch_size, d, d_sae)

    rows = [
        "| stage | throughput | note |", "| --- | ---: | --- |",
        f"| capture (stop-early, 4 layers) | {capture_rate:.0f} tok/s | SmolLM2-135M fp32 |",
        f"| affine statistics (3 pairs, float64) | {stats_rate:.0f} tok/s | one pass |",
        f"| affine solve (3 pairs, 9-point λ grid) | {solve_seconds:.2f} s | eigh once per pair |",
        f"| SAE step (4 × TopK {d}→{d_sae}, k=32, batch {args.batch_size}) "
        f"| {n_train / seconds:.0f} tok/s | {achieved:.0f} GFLOP/s of {peak:.0f} measured "
        f"({achieved / peak:.0%}) |",
    ]
    table = "\n".join(rows)
    sys.stdout.write(f"{machine_description()}\n{table}\n")
    if not args.no_record:
        append_results("Training stages, SmolLM2-135M, layers 6,12,18,24",
                       "python -m benchmarks.train " + " ".join(sys.argv[1:]), table,
                       f"{len(acts)} captured tokens; GEMM rate measured at "
                       f"({args.batch_size}×{d})·({d}×{d_sae}) fp32 in the same run.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
