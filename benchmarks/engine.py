"""Engine throughput: plain vLLM vs ReSAE steering / monitoring inside the same compiled engine.

One engine (SmolLM2-135M, the ReSAE model class, torch.compile on unless ``--eager``); every
workload runs side by side in one process, so ratios compare like with like:

- plain: no spec (the op is still in the graph and returns at once),
- steer: 4 layers × 2 edits (add + clamp) per request, K distinct configs in the batch,
- monitor: top-8 features at all 4 layers on every request,
- both.

``--stock`` instead runs vLLM's own ``LlamaForCausalLM`` (no op at all) for the plain rows, to
price the idle hook. Usage: ``python -m benchmarks.engine [--dictionary DIR] [--batches 1 8 32]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import append_results

logger = logging.getLogger(__name__)
LAYERS = (6, 12, 18, 24)


def random_dictionary(folder: Path, d_sae: int = 4608, k: int = 32) -> Path:
    """A random resae-mode dictionary of the real one's shape (costs are shape-bound)."""
    from resae_serve.artifact import ModelIdentity, save_artifact
    from resae_serve.resae import ReSAE
    from resae_serve.saes import SAEConfig, build_sae

    torch.manual_seed(0)
    d = 576
    saes = [build_sae(SAEConfig(architecture="topk", d_in=d, d_sae=d_sae, k=k)) for _ in LAYERS]
    affine = [None] + [(torch.eye(d), torch.zeros(d)) for _ in LAYERS[1:]]
    resae = ReSAE(LAYERS, saes, [4.0, 2.0, 2.0, 2.0], mode="resae", affine=affine)
    return save_artifact(resae, folder, ModelIdentity("smollm2-135m", "sha256:bench", "llama",
                                                      30, d))


def _specs(kind: str, batch: int, configs: int) -> list[Any]:
    from resae_serve.engine.spec import MonitorSpec, SteerEdit, SteeringSpec

    specs: list[Any] = []
    for j in range(batch):
        c = j % configs
        edits = tuple(e for layer in LAYERS for e in (SteerEdit(layer, 10 + c, "add", 2.0),
                                                      SteerEdit(layer, 100 + c, "clamp", 1.0)))
        monitor = MonitorSpec(LAYERS, top_k=8)
        if kind == "plain":
            specs.append(None)
        elif kind == "steer":
            specs.append(SteeringSpec(edits=edits))
        elif kind == "monitor":
            specs.append(SteeringSpec(monitor=monitor, key=f"m{j}"))
        else:
            specs.append(SteeringSpec(edits=edits, monitor=monitor, key=f"m{j}"))
    return specs


def _run(llm: Any, kind: str, batch: int, configs: int, max_tokens: int) -> tuple[float, float]:
    from vllm import SamplingParams

    from resae_serve.engine.llm import generate_batch, take_monitor

    prompts = [f"Story number {j}: once upon a time" for j in range(batch)]
    specs = _specs(kind, batch, configs)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = generate_batch(llm, prompts, specs, params)
    if kind in ("monitor", "both"):
        for j in range(batch):
            take_monitor(llm, f"m{j}")
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens / elapsed, elapsed / max_tokens * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dictionary", type=Path, default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--configs", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from resae_serve.engine.llm import build_llm

    folder = args.dictionary or random_dictionary(Path(tempfile.mkdtemp()) / "dict")
    llm = build_llm("smollm2-135m", folder, max_model_len=256, max_num_seqs=max(args.batches),
                    enforce_eager=args.eager)
    _run(llm, "both", 2, 2, 4)  # warm the monitor thread and the first shapes
    rows = []
    for batch in args.batches:
        plain, plain_ms = _run(llm, "plain", batch, 1, args.max_tokens)
        rows.append(f"| {batch} | plain | – | {plain:.0f} | {plain_ms:.1f} | 1.00 |")
        for kind in ("steer", "monitor", "both"):
            for configs in (args.configs if kind != "monitor" and batch > 1 else [1]):
                if configs > batch:
                    continue
                tps, ms = _run(llm, kind, batch, configs, args.max_tokens)
                rows.append(f"| {batch} | {kind} | {configs} | {tps:.0f} | {ms:.1f} | "
                            f"{tps / plain:.2f} |")
                print(rows[-1], flush=True)
    table = ("| batch | workload | K configs | output tok/s | ms / decode step | vs plain |\n"
             "| ---: | --- | ---: | ---: | ---: | ---: |\n" + "\n".join(rows))
    print(table)
    mode = "eager" if args.eager else "compiled (torch.compile, Inductor)"
    if not args.no_append:
        append_results(f"Engine steering / monitoring, SmolLM2-135M, {mode}",
                       "python -m benchmarks.engine " + " ".join(
                           f"{k}={v}" for k, v in vars(args).items()), table,
                       f"{args.max_tokens} generated tokens per request, greedy, float32; "
                       "4 layers, 2 edits per layer (add + clamp), top-8 monitoring.")


if __name__ == "__main__":
    main()
