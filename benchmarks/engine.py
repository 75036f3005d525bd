"""Engine throughput: plain vLLM vs ReSAE steering / monitoring inside the same compiled engine.

One engine (SmolLM2-135M, the ReSAE model class, torch.compile on unless ``--eager``); every
workload runs side by side in one process, so ratios compare like with like:

- plain: no spec (the op is still in the graph and returns at once),
- steer: 2 edits per request (the issue's workload): add a feature at one dictionary layer and
  clamp one at the next (config ``c`` uses layers ``c`` and ``c + 1`` mod 4, so K distinct
  configs spread their clamps over all 4 layers),
- monitor: top-8 features at all 4 layers on every request,
- both: steer + monitor,
- steer ×4, both ×4: a heavier variant, add + clamp at every one of the 4 layers (8 edits per
  request; a clamp encode at every layer).

``--profile`` skips vLLM and times the hook's pieces for one decode step of ``--profile-batch``
requests ("both ×4" workload, K distinct configs) with the same tables, op body and monitor code the
engine runs: host fill (spec lookup + ``prepare_step``), the op body per layer (encode for
clamp, deltas, capture copy), the monitor's encode of that step and its record building.
``--runtimes torch onnxruntime`` compares the monitor's feature runtimes (issue 14): one engine
per runtime, one after the other in one run, each measuring plain, monitor-only (top-8 at all 4
layers) and steer + monitor (2 edits + that monitoring) at ``--batches``, interleaved rounds;
ratios are against the plain cell of the same engine. Before the engines, the monitor's
per-layer encode through each runtime is timed without vLLM (1 thread, as in the worker)
against a bare matmul of the encoder's shape measured in the same run.
Usage: ``python -m benchmarks.engine [--dictionary DIR] [--batches 1 8 32] [--profile]
[--runtimes torch onnxruntime]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch

from benchmarks._common import append_results

logger = logging.getLogger(__name__)
LAYERS = (6, 12, 18, 24)


def random_dictionary(folder: Path, d_sae: int = 4608, k: int = 32) -> Path:
    """A random resae-mode dictionary of the real one's shape (costs are shape-bound)."""
    from resae_serve.artifact import ModelIdentity, save_artifact
    from resae_serve.fingerprint import model_fingerprint
    from resae_serve.models import resolve_model
    from resae_serve.resae import ReSAE
    from resae_serve.saes import SAEConfig, build_sae

    torch.manual_seed(0)
    d = 576
    saes = [build_sae(SAEConfig(architecture="topk", d_in=d, d_sae=d_sae, k=k)) for _ in LAYERS]
    affine = [None] + [(torch.eye(d), torch.zeros(d)) for _ in LAYERS[1:]]
    resae = ReSAE(LAYERS, saes, [4.0, 2.0, 2.0, 2.0], mode="resae", affine=affine)
    fingerprint = model_fingerprint(resolve_model("smollm2-135m"))  # the engine checks it
    return save_artifact(resae, folder, ModelIdentity("smollm2-135m", fingerprint, "llama", 30,
                                                      d))


def _specs(kind: str, batch: int, configs: int) -> list[Any]:
    from resae_serve.engine.spec import MonitorSpec, SteerEdit, SteeringSpec

    specs: list[Any] = []
    for j in range(batch):
        c = j % configs
        pairs = ([(LAYERS[c % 4], LAYERS[(c + 1) % 4])] if "×4" not in kind
                 else [(layer, layer) for layer in LAYERS])
        edits = tuple(e for add_at, clamp_at in pairs
                      for e in (SteerEdit(add_at, 10 + c, "add", 2.0),
                                SteerEdit(clamp_at, 100 + c, "clamp", 1.0)))
        monitor = MonitorSpec(LAYERS, top_k=8)
        if kind == "plain":
            specs.append(None)
        elif kind.startswith("steer"):
            specs.append(SteeringSpec(edits=edits))
        elif kind == "monitor":
            specs.append(SteeringSpec(monitor=monitor, key=f"m{j}"))
        else:
            specs.append(SteeringSpec(edits=edits, monitor=monitor, key=f"m{j}"))
    return specs


class Measured(NamedTuple):
    tokens_per_s: float
    step_ms: float
    """Wall time per generated token of a request (prefill included)."""
    forward_ms: float
    """Per forward pass in the worker: the whole model, the hook's host work, the op."""
    host_ms: float
    op_ms: float


def _run(llm: Any, kind: str, batch: int, configs: int, max_tokens: int) -> Measured:
    from vllm import SamplingParams

    from resae_serve.engine import rpc
    from resae_serve.engine.llm import generate_batch

    prompts = [f"Story number {j}: once upon a time" for j in range(batch)]
    specs = _specs(kind, batch, configs)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    before = rpc.stats(llm)
    start = time.perf_counter()
    outs = generate_batch(llm, prompts, specs, params)
    if kind.startswith(("monitor", "both")):
        for j in range(batch):
            rpc.take(llm, f"m{j}")
    elapsed = time.perf_counter() - start
    after = rpc.stats(llm)
    steps = max(1, after.steps - before.steps)
    per_step = {k: (getattr(after, k) - getattr(before, k)) / steps * 1000
                for k in ("forward_s", "hook_host_s", "op_s")}
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return Measured(tokens / elapsed, elapsed / max_tokens * 1000, per_step["forward_s"],
                    per_step["hook_host_s"], per_step["op_s"])


def _timed(fn: Any, repeat: int = 30) -> float:
    """Median wall time of ``fn()`` in ms (after two warm-up calls)."""
    fn(), fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1000


def profile_op(folder: Path, batch: int, configs: int) -> str:
    """Per-step cost of the hook's pieces at one decode step of ``batch`` requests (no vLLM)."""
    import numpy as np

    from resae_serve.artifact import load_artifact
    from resae_serve.engine.hook import StepHook
    from resae_serve.engine.monitor import Monitor, StepCapture
    from resae_serve.engine.tables import SteeringTables

    resae, _ = load_artifact(folder)
    tables = SteeringTables(resae, max_tokens=2048, max_rows=2 * 32 + 1)
    monitor = Monitor(resae)
    hook = StepHook(tables, monitor)
    specs = {f"r{j}": s for j, s in enumerate(_specs("both ×4", batch, configs))}

    # what RunnerBatch reads, for a pure decode step (1 token per request)
    runner = SimpleNamespace(
        input_batch=SimpleNamespace(req_ids=list(specs),
                                    num_computed_tokens_cpu=np.full(batch, 40),
                                    num_prompt_tokens=np.full(batch, 8)),
        query_start_loc=SimpleNamespace(np=np.arange(batch + 1)),
        requests={k: SimpleNamespace(sampling_params=SimpleNamespace(
            extra_args=s.to_extra_args())) for k, s in specs.items()})
    hook.bind(runner)
    scale = float(resae.scales[0])      # block outputs of the dictionary's scale
    hidden = scale * torch.randn(batch, resae.d_model) / resae.d_model ** 0.5
    residual = scale * torch.randn(batch, resae.d_model) / resae.d_model ** 0.5
    n_layers = len(resae.layers)

    def host() -> None:
        hook.before_forward(batch)
        hook._step = None

    def layer_op(i: int) -> Any:
        return lambda: tables.apply(i, hidden.clone(), residual)

    host()
    for i in range(n_layers):
        tables.apply(i, hidden.clone(), residual)
    step = StepCapture(keys=[s.key for s in specs.values()], counts=np.ones(batch, dtype=np.int64),
                       starts=np.full(batch, 40), layers=tables.take_captures())
    monitor.flush()        # the specs registered by host() are in place
    inputs = [resae.sae_input(i, hidden + residual, hidden + residual if i else None)
              for i in range(n_layers)]

    def sae_encodes() -> None:
        with torch.no_grad():
            for i in range(n_layers):
                resae.saes[i].encode_sparse(inputs[i])

    def monitor_step() -> None:
        monitor._summarize(step)
        monitor.results.clear()

    screens = tables.screens

    def op_without_screen() -> float:
        tables.screens = [None] * n_layers
        try:
            return sum(_timed(layer_op(i)) for i in range(n_layers))
        finally:
            tables.screens = screens

    def pieces() -> list[float]:
        return [_timed(host), sum(_timed(layer_op(i)) for i in range(n_layers)),
                op_without_screen(), _timed(sae_encodes), _timed(monitor_step),
                *gemm_pieces()]

    from resae_serve.engine.gemm import EncoderGemm

    u = [inp.contiguous() for inp in inputs]
    packed = [EncoderGemm(sae) for sae in resae.saes]
    halves = [(s._handler, s._ops) for s in screens if s is not None]
    u16 = [x.bfloat16() for x in u]

    def gemm_pieces() -> list[float]:
        pairs = list(zip(u, resae.saes, packed, strict=True))
        with torch.no_grad():
            return [_timed(lambda: [x @ sae.W_enc for x, sae, _ in pairs]),
                    _timed(lambda: [g(x) for x, _, g in pairs]),
                    _timed(lambda: [ops.onednn_mm(h, x, None)
                                    for x, (h, ops) in zip(u16, halves, strict=True)])
                    if len(halves) == len(u16) else 0.0]

    names = ["host fill (new specs parsed once; prepare_step)",
             "op body, 4 layers (clamp read through the bfloat16 screen, deltas, copies)",
             "op body, 4 layers, float32 encode for the clamp read",
             "torch SAE encodes alone, 4 layers (matmul + top-k)",
             "monitor thread, one step: encodes + records, 4 layers",
             f"encoder GEMMs alone, 4 layers × {batch} rows: torch.matmul, float32",
             "… packed oneDNN (EncoderGemm), float32",
             "… packed oneDNN, bfloat16 (the screen's)"]
    threads = torch.get_num_threads()
    columns = {threads: pieces()}
    torch.set_num_threads(1)
    columns[1] = pieces()
    torch.set_num_threads(threads)
    head = " | ".join(f"ms, {t} thread{'s' * (t > 1)}" for t in columns)
    decided = [1 - s.reads_resolved_exactly / max(1, s.reads) for s in screens if s]
    names[1] += f" ({min(decided, default=0):.0%}–{max(decided, default=0):.0%} decided by it)"
    return (f"| piece (batch {batch}, K={configs}, one decode step) | {head} |\n"
            f"| --- |{' ---: |' * len(columns)}\n"
            + "\n".join(f"| {name} | " + " | ".join(f"{c[r]:.2f}" for c in columns.values())
                         + " |" for r, name in enumerate(names)))


def encode_rates(folder: Path, tokens: tuple[int, ...] = (1, 8, 32, 256)) -> str:
    """The monitor's per-layer encode through each runtime against a bare float32 matmul of
    the encoder's shape (``tokens × d_model @ d_model × d_sae``), one thread, in this run."""
    from resae_serve.artifact import load_artifact
    from resae_serve.engine.encoders import build_encoder
    from resae_serve.export.cache import cached_export

    resae, _ = load_artifact(folder)
    export = cached_export(folder).folder
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    encoders = {name: build_encoder(resae, name, export) for name in ("torch", "onnxruntime")}
    i = 1                                    # a residual layer: affine prediction included
    sae = resae.saes[i]
    rows = []
    try:
        for n in tokens:
            h = float(resae.scales[i]) * torch.randn(n, resae.d_model)
            h_prev = float(resae.scales[i - 1]) * torch.randn(n, resae.d_model)
            w = sae.W_enc.detach().contiguous()
            with torch.no_grad():
                mm = _timed(lambda h=h, w=w: h @ w)
            flops = 2 * n * resae.d_model * sae.config.d_sae
            cells = [f"{mm:.3f}", f"{flops / mm / 1e6:.1f}"]
            for encoder in encoders.values():
                ms = _timed(lambda h=h, h_prev=h_prev, e=encoder: e.codes(i, h, h_prev, [3], 8))
                cells += [f"{ms:.3f}", f"{n / ms * 1000:,.0f}", f"{mm / ms:.2f}"]
            rows.append(f"| {n} | " + " | ".join(cells) + " |")
    finally:
        torch.set_num_threads(threads)
    return ("| tokens | matmul ms | matmul GFLOP/s | torch encode ms | torch tokens/s | "
            "torch matmul share | ORT encode ms | ORT tokens/s | ORT matmul share |\n"
            "| ---: |" + " ---: |" * 8 + "\n" + "\n".join(rows))


def compare_runtimes(folder: Path, runtimes: list[str], batches: list[int], rounds: int,
                     max_tokens: int, eager: bool) -> str:
    """Plain / monitor / steer + monitor per batch, one engine per monitor runtime."""
    import gc

    from resae_serve.engine.llm import build_llm

    rows = []
    for runtime in runtimes:
        llm = build_llm("smollm2-135m", folder, max_model_len=256,
                        max_num_seqs=max(batches), enforce_eager=eager, runtime=runtime)
        try:
            _run(llm, "both", 2, 1, 4)            # warm the monitor thread and first shapes
            for batch in batches:
                cells = ("plain", "monitor", "both")
                runs: dict[str, list[Measured]] = {kind: [] for kind in cells}
                for _ in range(rounds):
                    for kind in cells:
                        runs[kind].append(_run(llm, kind, batch, 1, max_tokens))
                plain = statistics.median(m.tokens_per_s for m in runs["plain"])
                for kind in cells:
                    m = Measured(*(statistics.median(v) for v in zip(*runs[kind], strict=True)))
                    name = {"plain": "plain", "monitor": "monitor only",
                            "both": "steer (2 edits) + monitor"}[kind]
                    rows.append(f"| {runtime} | {batch} | {name} | {m.tokens_per_s:.0f} | "
                                f"{m.forward_ms:.1f} | {m.tokens_per_s / plain:.3f} |")
                    print(rows[-1], flush=True)
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
    return ("| monitor runtime | batch | workload | output tok/s | forward ms | vs plain |\n"
            "| --- | ---: | --- | ---: | ---: | ---: |\n" + "\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dictionary", type=Path, default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--configs", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--profile", action="store_true", help="time the hook's pieces only")
    parser.add_argument("--profile-batch", type=int, default=32)
    parser.add_argument("--profile-configs", type=int, default=32)
    parser.add_argument("--runtimes", nargs="+", choices=("torch", "onnxruntime"),
                        help="compare the monitor's feature runtimes (see the docstring)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.runtimes:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        folder = args.dictionary or random_dictionary(Path(tempfile.mkdtemp()) / "dict")
        rates = encode_rates(folder)
        print(rates, flush=True)
        table = compare_runtimes(folder, args.runtimes, args.batches, args.rounds,
                                 args.max_tokens, args.eager)
        print(table)
        if not args.no_append:
            mode = "eager" if args.eager else "compiled (torch.compile, Inductor)"
            append_results(
                f"Monitor feature runtimes: torch vs onnxruntime, SmolLM2-135M, {mode}",
                "python -m benchmarks.engine --runtimes " + " ".join(args.runtimes)
                + f" --batches {' '.join(map(str, args.batches))} --rounds {args.rounds}",
                rates + "\n\n" + table,
                "First table: one layer's monitor encode (layer 12, residual: affine "
                "prediction + encoder + top-8 + 1 watched feature), 1 thread, median of 30 "
                "calls, against a bare float32 matmul of the encoder's shape in the same run "
                "(matmul share = matmul ms / encode ms). Second: one engine per runtime, "
                f"{args.max_tokens} greedy tokens per request, 1 steering config, top-8 "
                f"monitoring at all 4 layers, median of {args.rounds} interleaved rounds; "
                "vs plain = the same engine's plain cell.")
        return
    if args.profile:
        folder = args.dictionary or random_dictionary(Path(tempfile.mkdtemp()) / "dict")
        table = profile_op(folder, args.profile_batch, args.profile_configs)
        print(table)
        if not args.no_append:
            append_results("Engine op pieces, one decode step (no vLLM)",
                           "python -m benchmarks.engine --profile", table,
                           "Workload both ×4 (add + clamp at all 4 layers, top-8 monitoring); "
                           "random dictionary of the real shape; median of 30 calls per piece. "
                           "Inside the engine the worker runs 1 torch thread.")
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from resae_serve.engine import rpc
    from resae_serve.engine.llm import build_llm

    folder = args.dictionary or random_dictionary(Path(tempfile.mkdtemp()) / "dict")
    llm = build_llm("smollm2-135m", folder, max_model_len=256, max_num_seqs=max(args.batches),
                    enforce_eager=args.eager)
    _run(llm, "both", 2, 2, 4)  # warm the monitor thread and the first shapes
    first = rpc.stats(llm)
    rows = []
    for batch in args.batches:
        cells = [("plain", 1)] + [
            (kind, configs) for kind in ("steer", "monitor", "both", "steer ×4", "both ×4")
            for configs in (args.configs if kind != "monitor" and batch > 1 else [1])
            if configs <= batch]
        runs: dict[tuple[str, int], list[Measured]] = {cell: [] for cell in cells}
        for _ in range(args.rounds):           # interleaved: drift hits every cell alike
            for kind, configs in cells:
                runs[kind, configs].append(_run(llm, kind, batch, configs, args.max_tokens))
        plain = statistics.median(m.tokens_per_s for m in runs["plain", 1])
        for (kind, configs), measured in runs.items():
            m = Measured(*(statistics.median(v) for v in zip(*measured, strict=True)))
            rows.append(f"| {batch} | {kind} | {configs if kind != 'plain' else '–'} | "
                        f"{m.tokens_per_s:.0f} | {m.step_ms:.1f} | {m.forward_ms:.1f} | "
                        f"{m.host_ms:.2f} | {m.op_ms:.2f} | {m.tokens_per_s / plain:.2f} |")
            print(rows[-1], flush=True)
    table = ("| batch | workload | K configs | output tok/s | ms / token step | forward ms | "
             "hook host ms | op ms (all layers) | vs plain |\n"
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n" + "\n".join(rows))
    last = rpc.stats(llm)
    reads = last.screened_reads - first.screened_reads
    exact = last.screened_reads_resolved_exactly - first.screened_reads_resolved_exactly
    screen = (f"bfloat16 screen: {reads:.0f} edited-feature reads, {exact:.0f} "
              f"({exact / max(1, reads):.1%}) resolved exactly." if reads else
              "bfloat16 screen off or not applicable.")
    print(table)
    print(screen)
    mode = "eager" if args.eager else "compiled (torch.compile, Inductor)"
    if not args.no_append:
        append_results(f"Engine steering / monitoring, SmolLM2-135M, {mode}",
                       "python -m benchmarks.engine " + " ".join(
                           f"{k}={v}" for k, v in vars(args).items()), table,
                       f"{args.max_tokens} generated tokens per request, greedy, float32; "
                       "dictionary of 4 layers; steer = 2 edits per request (add at one "
                       "layer, clamp at the next), ×4 = add + clamp at all 4 layers; top-8 "
                       "monitoring at all 4 layers; "
                       f"median of {args.rounds} interleaved rounds per cell. forward / hook "
                       "host / op: per forward pass in the worker (EngineStats). " + screen)


if __name__ == "__main__":
    main()
