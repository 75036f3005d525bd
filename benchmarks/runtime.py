"""Feature-runtime encode throughput per backend and token batch, against the matmul bound.

For each token batch (16 … 4096) the encode path of a dictionary (all layers: affine
prediction, residual, encoder matmul, top-k) runs on
  torch eager      ReSAE.encode, the library's own module
  torch runtime    the graph modules the ONNX graphs are traced from, eager
  onnxruntime CPU  the exported encode graph (float32)
and the same matmuls alone ((N, d) @ (d, d_sae) per layer, (N, d) @ (d, d) per residualized
layer) are timed in torch and in onnxruntime, in the same run. Achieved GFLOP/s counts those
matmul FLOPs; "% of bound" divides it by the faster matmul rate measured at that batch.

    python -m benchmarks.runtime [--artifact runs/smollm2-resae-500k] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._common import append_results, machine_description
from resae_serve.artifact import load_artifact
from resae_serve.export.backend_torch import TorchRuntime
from resae_serve.export.convert import export_resae
from resae_serve.export.errors import require
from resae_serve.export.probes import probe_activations
from resae_serve.export.runtime import RuntimeConfig, open_runtime
from resae_serve.export.spec import ExportConfig
from resae_serve.resae import ReSAE

logger = logging.getLogger("benchmarks.runtime")
BATCHES = (16, 64, 256, 512, 1024, 4096)


def timed(calls: dict[str, Callable[[], Any]], seconds: float) -> dict[str, float]:
    """Median seconds per call of each callable, timed in interleaved rounds (so load from
    other processes falls on all of them alike), at least 3 rounds and ``seconds`` each."""
    for call in calls.values():
        call()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in calls}
    while min(len(t) for t in times.values()) < 3 or min(map(sum, times.values())) < seconds:
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def ort_profile(path: Path, feeds: dict[str, np.ndarray], runs: int = 3) -> dict[str, float]:
    """Share of onnxruntime kernel time per op type over a few runs of one graph."""
    ort = require("onnxruntime", purpose="profiling")
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(path.parent / "profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            per_op[op] = per_op.get(op, 0.0) + e["dur"]
    total = sum(per_op.values())
    return {op: t / total for op, t in sorted(per_op.items(), key=lambda kv: -kv[1])}


def matmul_shapes(resae: ReSAE) -> list[tuple[int, int]]:
    """(k, n) of every matmul one token's encode performs."""
    shapes = [(resae.d_model, sae.config.d_sae) for sae in resae.saes]
    if resae.mode == "resae":
        shapes += [(resae.d_model, resae.d_model)] * (len(resae.layers) - 1)
    return shapes


def torch_matmuls(x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """The encoder's matmuls alone, in torch."""
    return [x @ w for w in weights]


def matmul_only_graph(shapes: list[tuple[int, int]], path: Path) -> Path:
    """An ONNX graph doing just these matmuls on one (N, d) input, for the ORT matmul rate."""
    onnx = require("onnx", purpose="the matmul-rate graph")
    helper, rng = onnx.helper, np.random.default_rng(0)
    nodes, inits, outputs = [], [], []
    for i, (k, n) in enumerate(shapes):
        inits.append(onnx.numpy_helper.from_array(
            rng.standard_normal((k, n)).astype(np.float32), f"W{i}"))
        nodes.append(helper.make_node("MatMul", ["x", f"W{i}"], [f"m{i}"]))
        # Return one column only, as encode returns only k codes: the full product is still
        # computed, but not copied out to numpy.
        nodes.append(helper.make_node("Slice", [f"m{i}", "zero", "one", "one"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT,
                                                     ["tokens", 1]))
    for name, value in (("zero", 0), ("one", 1)):
        inits.append(onnx.numpy_helper.from_array(np.array([value], dtype=np.int64), name))
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["tokens", shapes[0][0]])
    graph = helper.make_graph(nodes, "matmuls", [x], outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, default=Path("runs/smollm2-resae-500k"))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--seconds", type=float, default=1.5, help="timing budget per cell")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ort = require("onnxruntime", purpose="this benchmark")
    if not (args.artifact / "manifest.json").is_file():
        sys.stderr.write(f"{args.artifact} holds no dictionary; train one first (see README) "
                         "or pass --artifact\n")
        return 2
    resae, manifest = load_artifact(args.artifact)
    resae = resae.float().eval()
    shapes = matmul_shapes(resae)
    flops_per_token = sum(2 * k * n for k, n in shapes)
    batches = [int(b) for b in args.batches.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        out = export_resae(resae, Path(tmp) / "export", ExportConfig(graphs=("encode",),
                                                                        reference_tokens=0))
        torch_rt = TorchRuntime(resae)
        ort_rt = open_runtime(out.folder, RuntimeConfig(backend="onnxruntime"))
        matmuls = ort.InferenceSession(str(matmul_only_graph(shapes, Path(tmp) / "mm.onnx")),
                                       providers=["CPUExecutionProvider"])
        weights = [torch.randn(k, n) for k, n in shapes]
        rows = []
        profile: dict[str, float] = {}
        profiled = 0
        load = os.getloadavg()[0]
        for n in batches:
            acts = probe_activations(resae, "real-scale", n, seed=n)
            x = acts[resae.layers[0]]
            calls: dict[str, Callable[[], Any]] = {
                "torch eager": partial(resae.encode, acts),
                "torch runtime": partial(torch_rt.encode, acts),
                "onnxruntime": partial(ort_rt.encode, acts),
                "mm torch": partial(torch_matmuls, x, weights),
                "mm onnxruntime": partial(matmuls.run, None, {"x": x.numpy()}),
            }
            with torch.inference_mode():
                t = timed(calls, args.seconds)
            gflops = {k: n * flops_per_token / v / 1e9 for k, v in t.items()}
            bound = max(gflops["mm torch"], gflops["mm onnxruntime"])
            logger.info("N=%d GFLOP/s %s", n, {k: f"{v:.1f}" for k, v in gflops.items()})
            if n == 1024 or (n == batches[-1] and not profile):
                feeds = {f"h_{L}": a.numpy() for L, a in acts.items()}
                feeds.update({f"watch_{L}": np.zeros(0, np.int64) for L in acts})
                profile = ort_profile(out.path(out.graph("encode")), feeds)
                profiled = n
            rows.append(
                f"| {n} | {n / t['torch eager']:,.0f} | {n / t['torch runtime']:,.0f} | "
                f"{n / t['onnxruntime']:,.0f} | {t['torch eager'] / t['onnxruntime']:.2f}× | "
                f"{gflops['mm torch']:.0f} / {gflops['mm onnxruntime']:.0f} | "
                f"{gflops['torch eager']:.0f} ({gflops['torch eager'] / bound:.0%}) | "
                f"{gflops['onnxruntime']:.0f} ({gflops['onnxruntime'] / bound:.0%}) |")
    table = "\n".join([
        "| tokens | torch eager tok/s | torch runtime tok/s | onnxruntime tok/s | ORT / eager | "
        "matmul GFLOP/s torch / ORT | torch eager GFLOP/s (% bound) | "
        "onnxruntime GFLOP/s (% bound) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *rows])
    layout = (f"{manifest.mode}, layers {list(manifest.layers)}, d_model {manifest.d_model}, "
              f"d_sae {[c.d_sae for c in manifest.sae_configs]}, k "
              f"{[c.k for c in manifest.sae_configs]}, {manifest.sae_configs[0].architecture}")
    notes = (f"Dictionary `{args.artifact}` ({layout}); encode of all layers, float32, real-scale "
             f"activations, no watched features; {flops_per_token / 1e6:.1f} MFLOP per token "
             f"in matmuls. onnxruntime {ort.__version__}, default threads. Median of ≥ 3 calls "
             f"and ≥ {args.seconds} s per cell; the matmul rate is measured in the same run at "
             "the same shapes (torch and a MatMul-only ONNX graph), backends interleaved call "
             "by call. onnxruntime kernel time at "
             f"{profiled} tokens: " + ", ".join(f"{op} {share:.1%}" for op, share in
                                              list(profile.items())[:3])
             + f". 1-minute load average {load:.1f} at the start and "
             f"{os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} cores (other jobs "
             "shared the machine, so absolute rates are below an idle machine's; the ratios "
             "are measured side by side). GPU: none was available for this work, so there is "
             "no torch-CUDA / onnxruntime-CUDA / TensorRT table.")
    sys.stdout.write(f"{machine_description()}\n{table}\n\n{notes}\n")
    if not args.no_record:
        append_results("Feature runtime encode throughput, CPU", "python -m benchmarks.runtime",
                       table, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
