"""Training throughput on the embedded model, stage by stage, against the machine's matmul rate.

Stages, each timed on its own over the same activations:
  capture      model forward to block 24 + hooks (layers 6, 12, 18, 24), tokens/s
  affine fit   streaming float64 statistics for the 3 pairs, tokens/s; then the closed-form
               solve with the λ grid, seconds
  SAE step     one optimiser step of 4 TopK SAEs (8× expansion, k=32), tokens/s and achieved
               GFLOP/s, counting the one dense product per layer (the encoder forward,
               2·B·d·d_sae; its backward is sparse) against the fp32 matmul rate measured
               here at the same shape

    python -m benchmarks.train [--tokens 16384] [--no-record]

With ``--peer``, trains this project's TopK SAE and the real EleutherAI sparsify
``SparseCoder`` (plus SAELens' TopK with ``--saelens``) on the same activations of one
SmolLM2 layer, step by step in turn in one process so that the machine's noise hits all
alike, and reports tokens/s, held-out FVE and the ratio to sparsify:

    python -m benchmarks.train --peer [--device cpu|cuda] [--layer 12] [--steps 60]
        [--repeats 3] [--saelens] [--no-record]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch

from benchmarks._common import append_results, machine_description
from benchmarks._peers import PeerTrainer
from resae_serve.affine import AffineStats, fit_affine
from resae_serve.capture import CaptureConfig, capture_activations
from resae_serve.corpus import Split, load_documents
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
    parser.add_argument("--peer", action="store_true",
                        help="side by side with sparsify (and SAELens) on one layer")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (--peer)")
    parser.add_argument("--layer", type=int, default=12, help="SmolLM2 block (--peer)")
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps (--peer)")
    parser.add_argument("--d-sae", type=int, default=4608, help="latents (--peer)")
    parser.add_argument("--k", type=int, default=32, help="active latents (--peer)")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam lr (--peer)")
    parser.add_argument("--warmup-steps", type=int, default=0,
                        help="linear lr warm-up, every trainer (--peer)")
    parser.add_argument("--decay-fraction", type=float, default=0.0,
                        help="final fraction of steps with linear lr decay (--peer)")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out (--peer)")
    parser.add_argument("--repeats", type=int, default=1, help="seeds 0.. (--peer)")
    parser.add_argument("--saelens", action="store_true", help="add SAELens (--peer)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.peer:
        return run_peer(args)

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
    trainer.train_step(batches[0], log=False)  # warm-up
    start = time.perf_counter()
    for batch in batches[1:]:
        trainer.train_step(batch, log=False)  # as fit() between logging steps
    seconds = time.perf_counter() - start
    n_train = sum(len(b) for b in batches[1:])
    d_sae = trainer.resae.saes[0].config.d_sae
    achieved = 2 * n_train * d * d_sae * len(LAYERS) / seconds / 1e9
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


def peer_activations(layer: int, n_train: int, n_eval: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train (shuffled) and held-out activations of one SmolLM2 block on the Brown corpus,
    divided by the train RMS per element (captured once, then read from the cache)."""
    from resae_serve.affine import ScaleStats
    from resae_serve.pipeline import DataConfig, cached_activations
    from resae_serve.shards import read_shards

    def load(split: Split, n: int, shuffle: bool) -> torch.Tensor:
        folder = cached_activations(DataConfig(), (layer,), split, n, seed=0, shuffle=shuffle,
                                    progress=False)
        return torch.cat([b.acts[:, 0].float() for b in read_shards(folder)])[:n]

    train, heldout = load("train", n_train, True), load("heldout", n_eval, False)
    stats = ScaleStats()
    stats.update(train)
    return train / stats.rms, heldout / stats.rms


def heldout_fve(trainer: PeerTrainer, heldout: torch.Tensor, device: str) -> float:
    """Pooled FVE ``1 - Σ‖x - x̂‖² / Σ‖x - x̄‖²`` in float64 over the held-out tokens."""
    err = total = 0.0
    mean = heldout.double().mean(0)
    for chunk in heldout.split(4096):
        x = chunk.to(device)
        x_hat = trainer.reconstruct(x).double().cpu()
        err += float((chunk.double() - x_hat).pow(2).sum())
        total += float((chunk.double() - mean).pow(2).sum())
    return 1.0 - err / total


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def run_peer(args: argparse.Namespace) -> int:
    """Train the peers step by step in turn; print and record tokens/s and held-out FVE."""
    from benchmarks._peers import PEERS, PeerSettings

    names = ["resae", "sparsify"] + (["saelens"] if args.saelens else [])
    train, heldout = peer_activations(args.layer, args.steps * args.batch_size,
                                      args.eval_tokens)
    load_before = os.getloadavg()[0]
    settings = PeerSettings(d_in=train.shape[1], d_sae=args.d_sae, k=args.k, lr=args.lr,
                            steps=args.steps, batch_size=args.batch_size, device=args.device,
                            warmup_steps=args.warmup_steps, decay_fraction=args.decay_fraction)
    seconds = {name: 0.0 for name in names}
    fves: dict[str, list[float]] = {name: [] for name in names}
    timed_tokens = 0
    for seed in range(args.repeats):
        trainers = [PEERS[name](settings, train[:4096], seed) for name in names]
        schedule = trainers[0].lr_at  # type: ignore[union-attr]
        data = train.to(args.device)
        for step in range(args.steps):
            x = data[step * args.batch_size:(step + 1) * args.batch_size]
            for j in range(len(names)):  # rotate who goes first
                name, trainer = names[(step + j) % len(names)], trainers[(step + j) % len(names)]
                _sync(args.device)
                start = time.perf_counter()
                trainer.step(x, schedule(step))
                _sync(args.device)
                if step:  # step 0 warms up allocators and kernels
                    seconds[name] += time.perf_counter() - start
            if step:
                timed_tokens += len(x)
        for name, trainer in zip(names, trainers, strict=True):
            fves[name].append(heldout_fve(trainer, heldout, args.device))
            logger.info("seed %d %s: held-out FVE %.4f", seed, name, fves[name][-1])
    rate = {name: timed_tokens / seconds[name] for name in names}
    fve = {name: sum(v) / len(v) for name, v in fves.items()}
    rows = ["| trainer | tokens/s | vs sparsify | held-out FVE | FVE − sparsify |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for name in names:
        rows.append(f"| {PEERS[name].name} | {rate[name]:.0f} | "
                    f"{rate[name] / rate['sparsify']:.2f}× | {fve[name]:.4f} | "
                    f"{fve[name] - fve['sparsify']:+.4f} |")
    table = "\n".join(rows)
    sys.stdout.write(f"{machine_description()}\n{table}\n")
    if not args.no_record:
        append_results(
            f"TopK SAE training side by side, SmolLM2-135M layer {args.layer}, {args.device}",
            "python -m benchmarks.train " + " ".join(sys.argv[1:]), table,
            f"{settings.d_in} → {settings.d_sae}, k {settings.k}, batch {settings.batch_size}, "
            f"Adam {settings.lr:g} ({settings.warmup_steps} warm-up steps, linear decay over the "
            f"last {settings.decay_fraction:.0%}, for all), "
            f"{settings.steps} steps × {args.repeats} seed(s); the trainers take turns step by "
            "step in one process (step 0 untimed); FVE pooled over "
            f"{len(heldout)} held-out Brown tokens, inputs divided by the train RMS. "
            f"Load average {load_before:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after (other work on the machine slows every trainer "
            "alike; compare the ratios).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
