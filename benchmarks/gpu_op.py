"""Section (a) of ``benchmarks/gpu_check.py``: the ``resae::steer`` op on CUDA, no vLLM.

**Parity inside CUDA-graph capture and replay.** A stand-in decoder stack (4 blocks, each
``residual = hidden + residual; hidden = tanh(residual @ W)``: vLLM's deferred residual add)
calls ``torch.ops.resae.steer`` after blocks 1, 2, 3, where a 3-layer residualized dictionary
sits. The stack with the tables' fixed-shape (graph) body is captured once in a
``torch.cuda.CUDAGraph`` per padded batch; then, step after step, requests come and go with
different edits (add, clamp, scale, ablate, vectors, prompt/generation phases), the host
prepares the tables, and the graph is replayed. Each replay is checked against the oracle: the
eager (variable-shape) body on the CPU, float32, on the same inputs. The monitor's captures
(edited block outputs of monitored tokens) and its codes, encoded on its own CUDA stream, are
checked the same way. TF32 is off for the parity part.

**Op time per layer.** One stand-in decoder layer (``x + W2 gelu(W1 x)``, W1 ``d × 4d``,
bf16: 8·d² weights, about 2/3 of a Llama layer's) captured in a CUDA graph alone, with the op
after it while steering is active on every token (a clamp, i.e. an encode at that layer: the
worst case), and with the op while no row is active at that layer (the device-side flags
skip the work). The op sits at a residual layer (its input includes the affine prediction
``A h_prev + c``). Op time = graph time with the op − the layer's graph time. The dictionary's
weights in float32 (as trained and saved) and in bfloat16.

On CPU (``--device cpu``) the parity part runs the graph body eagerly against the eager body
(no capture) and the timing part uses a tiny shape, so the code path never rots.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from benchmarks._report import Section, fmt, median_seconds
from resae_serve.engine import op
from resae_serve.engine.monitor import Monitor, StepCapture
from resae_serve.engine.spec import (
    Condition,
    MonitorSpec,
    SteerEdit,
    SteeringSpec,
    SteerVector,
)
from resae_serve.engine.tables import CONDITIONAL_NODES, SteeringTables
from resae_serve.resae import ReSAE
from resae_serve.saes import SAEConfig, build_sae

logger = logging.getLogger("benchmarks.gpu_op")
TITLE = "(a) Steering op on CUDA"
BLOCKS, DICT_BLOCKS = 4, (1, 2, 3)


def random_resae(d: int, d_sae: int, layers: tuple[int, ...], device: torch.device,
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> ReSAE:
    """A residualized TopK (k 32) dictionary with random weights and biases, built on
    ``device``."""
    torch.manual_seed(seed)
    with torch.device(device):
        config = SAEConfig(architecture="topk", d_in=d, d_sae=d_sae, k=32)
        saes = [build_sae(config) for _ in layers]
        with torch.no_grad():
            for sae in saes:
                sae.b_enc.normal_(0, 0.05)
                sae.b_dec.normal_(0, 0.1)
        affine = [None] + [(torch.eye(d) + 0.05 * torch.randn(d, d), 0.1 * torch.randn(d))
                           for _ in layers[1:]]
        resae = ReSAE(layers, saes, [1.5 + 0.5 * i for i in range(len(layers))],
                      mode="resae", affine=affine)
    return resae.to(dtype)


class StandInStack:
    """``BLOCKS`` tanh blocks with vLLM's deferred residual add; the op after ``DICT_BLOCKS``."""

    def __init__(self, d: int, device: torch.device, seed: int = 1) -> None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.weights = [(torch.randn(d, d, generator=g) / d ** 0.5).to(device)
                        for _ in range(BLOCKS)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        hidden, residual = x, torch.zeros_like(x)
        for b, w in enumerate(self.weights):
            residual = hidden + residual
            hidden = torch.tanh(residual @ w)
            if b in DICT_BLOCKS:
                torch.ops.resae.steer(hidden, residual, DICT_BLOCKS.index(b))
        return hidden + residual


def _specs(step: int, d: int) -> dict[str, SteeringSpec | None]:
    """Requests of one step; the set and the edits change from step to step."""
    rng = np.random.default_rng(step)
    vector = tuple(float(v) for v in rng.normal(0, 0.5, d))
    f = [int(x) for x in rng.integers(0, 512, 6)]
    pool: dict[str, SteeringSpec | None] = {
        "plain": None,
        "add": SteeringSpec(edits=(SteerEdit(1, f[0], "add", 3.0 + step),)),
        "clamp": SteeringSpec(edits=(SteerEdit(2, f[1], "clamp", 2.0),
                                     SteerEdit(2, f[2], "scale", 0.5),
                                     SteerEdit(3, f[3], "ablate"))),
        "phase": SteeringSpec(edits=(SteerEdit(3, f[4], "clamp", 4.0, "generation"),),
                              vectors=(SteerVector(2, vector, "prompt"),)),
        "monitor": SteeringSpec(edits=(SteerEdit(1, f[5], "clamp", 1.0),),
                                monitor=MonitorSpec((2, 3), top_k=8), key="monitor"),
        # ``when`` gates at value 0 hold on every in-distribution token, so they differ from
        # the ungated edit exactly at position 0 (the first-position rule) and, sticky,
        # through the latch: the gate mask itself is compared below.
        "gated": SteeringSpec(edits=(SteerEdit(2, f[1], "clamp", 3.0,
                                               when=Condition(1, f[0], 0.0)),)),
        "sticky": SteeringSpec(edits=(SteerEdit(3, f[2], "add", 2.0,
                                                when=Condition(2, f[3], 0.0, sticky=True)),),
                               vectors=(SteerVector(3, vector, "all",
                                                    when=Condition(1, f[4], 0.0)),)),
    }
    keep = [k for k in pool if rng.random() < 0.7] or ["add"]
    return {f"{k}-{step // 2}": pool[k] for k in keep}   # requests live for two steps


def _prepare(tables: SteeringTables, specs: dict[str, SteeringSpec | None], counts: list[int],
             starts: list[int], prompts: list[int], n_pass: int) -> None:
    for req in tables.known_requests():
        if req not in specs:
            tables.release(req)
    rows = [tables.claim(req, spec) for req, spec in specs.items()]
    tables.prepare_step(n_pass, rows, np.array(counts), np.array(starts), np.array(prompts))


def _records(monitor: Monitor, tables: SteeringTables, specs: dict[str, SteeringSpec | None],
             counts: list[int], starts: list[int]) -> list[tuple[int, int, list[int]]]:
    """The monitor's records of this pass (the ``monitor`` request's), as the engine's hook
    hands them over: captures gathered after the pass, an event on CUDA."""
    keys = [spec.key if spec is not None and spec.key else req for req, spec in specs.items()]
    step = StepCapture(keys=keys, counts=np.array(counts), starts=np.array(starts),
                       layers=tables.take_captures())
    step.ready = tables.captures_ready()
    monitor.register("monitor", MonitorSpec((2, 3), top_k=8))
    monitor.submit(step)
    return [(r.position, r.layer, sorted(r.top_ids)) for r in monitor.take("monitor")]


def _parity(device: torch.device, quick: bool, section: Section) -> None:
    """Graph-body replays against the CPU eager body, step after step."""
    d, d_sae = (64, 512) if quick else (512, 4096)
    n_steps = 6 if quick else 24
    torch.backends.cuda.matmul.allow_tf32 = False
    cuda = device.type == "cuda"
    oracle_resae = random_resae(d, d_sae, DICT_BLOCKS, torch.device("cpu"))
    dev_resae = random_resae(d, d_sae, DICT_BLOCKS, torch.device("cpu")).to(device)
    oracle = SteeringTables(oracle_resae, max_tokens=64, max_rows=33, screen=False,
                            graph_body=False)
    tables = SteeringTables(dev_resae, max_tokens=64, max_rows=33, device=device,
                            graph_body=True)
    mon_oracle, mon_dev = Monitor(oracle_resae), Monitor(dev_resae)
    stack_cpu = StandInStack(d, torch.device("cpu"))
    stack_dev = StandInStack(d, device)
    graphs: dict[int, tuple[Callable[[], None], torch.Tensor, torch.Tensor]] = {}
    conditional = False

    def runner(n_pass: int) -> tuple[Callable[[], None], torch.Tensor, torch.Tensor]:
        """A replay function for a padded pass of ``n_pass`` tokens, with its static
        input and output buffers."""
        nonlocal conditional
        static_in = torch.zeros(n_pass, d, device=device)
        if not cuda:
            out = torch.zeros(n_pass, d)

            def eager() -> None:
                out.copy_(stack_dev(static_in))
            return eager, static_in, out
        op.install_tables(tables)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):           # warm-up outside capture (vLLM does too)
            stack_dev(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = stack_dev(static_in)
        conditional = CONDITIONAL_NODES.get("status") == "used"
        return graph.replay, static_in, static_out

    worst = worst_cap = 0.0
    mismatched_records = n_records = gate_mismatches = gated = gateable = 0
    for step in range(n_steps):
        specs = _specs(step, d)
        counts = [3 if step % 3 == 0 else 1 for _ in specs]      # prefill-ish, then decode
        starts = [0 if c == 3 else 3 + step for c in counts]
        prompts = [3] * len(specs)
        total = sum(counts)
        n_pass = 8 * -(-total // 8)                                # padded like vLLM's sizes
        x = torch.randn(n_pass, d, generator=torch.Generator().manual_seed(100 + step))
        _prepare(oracle, specs, counts, starts, prompts, n_pass)
        op.install_tables(oracle)
        want = stack_cpu(x.clone())
        want_records = _records(mon_oracle, oracle, specs, counts, starts)
        if n_pass not in graphs:
            _prepare(tables, specs, counts, starts, prompts, n_pass)
            graphs[n_pass] = runner(n_pass)
        replay, static_in, static_out = graphs[n_pass]
        _prepare(tables, specs, counts, starts, prompts, n_pass)
        op.install_tables(tables)
        static_in.copy_(x)
        replay()
        got = static_out.cpu()
        got_records = _records(mon_dev, tables, specs, counts, starts)
        worst = max(worst, float((got - want).abs().max()))
        for i in range(len(DICT_BLOCKS)):      # edited block outputs (h_prev, captures)
            worst_cap = max(worst_cap, float((tables.h_buf[i, :n_pass].cpu()
                                              - oracle.h_buf[i, :n_pass]).abs().max()))
        gate_dev, gate_oracle = tables.gates.gate[:total, 1:].cpu(), oracle.gates.gate[:total, 1:]
        gate_mismatches += int((gate_dev != gate_oracle).sum())
        of_gated = torch.tensor([req.startswith(("gated", "sticky"))      # per token
                                 for req, c in zip(specs, counts, strict=True)
                                 for _ in range(c)])
        gated += int(((gate_oracle > 0).any(dim=1) & of_gated).sum())
        gateable += int(of_gated.sum())
        n_records += len(want_records)
        mismatched_records += sum(a != b for a, b in zip(got_records, want_records, strict=False))
        mismatched_records += abs(len(got_records) - len(want_records))
    op.install_tables(None)
    tol = 1e-4
    ok = worst <= tol and worst_cap <= tol and mismatched_records == 0 and gate_mismatches == 0
    section.ok &= ok
    section.notes.append(
        "Parity of the graph body against the CPU eager body (float32, TF32 off, tolerance "
        f"{tol:g}), stand-in stack d {d}, dictionary d_sae {d_sae} at 3 layers:\n\n"
        "| run | steps | padded batches captured | max abs diff, stack output | max abs diff, "
        "edited block outputs | monitor records equal | `when` gate cells differing "
        "(gates set) | conditional nodes | result |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        f"| {'CUDA graph replay' if cuda else 'graph body, eager (CPU)'} | {n_steps} | "
        f"{len(graphs)} | {worst:.2e} | {worst_cap:.2e} | "
        f"{n_records - mismatched_records}/{n_records} | {gate_mismatches} (a gate set on "
        f"{gated} of {gateable} tokens of gated requests) | {'yes' if conditional else 'no'} | "
        f"{'ok' if ok else 'FAILED'} |\n\n"
        "Gated requests: a clamp ``when`` a feature at an earlier layer is >= 0 and a sticky "
        "add plus a gated vector; the gates (per token and condition) are compared as well.\n\n"
        "Conditional nodes: whether the device-side flags were captured as CUDA-graph "
        "conditional nodes (else the masked body always runs): "
        f"{CONDITIONAL_NODES.get('status', 'not captured (CPU)')}.")


def _layer(d: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    w1 = torch.randn(d, 4 * d, device=device, dtype=torch.bfloat16) / d ** 0.5
    w2 = torch.randn(4 * d, d, device=device, dtype=torch.bfloat16) / (4 * d) ** 0.5

    def layer(x: torch.Tensor) -> torch.Tensor:
        return x + torch.nn.functional.gelu(x @ w1) @ w2
    return layer


def _graphed(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    if device.type != "cuda":
        return fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _time_batch(layer: Callable[[torch.Tensor], torch.Tensor], tables: SteeringTables, d: int,
                batch: int, device: torch.device) -> tuple[float, float, float]:
    """Seconds of: the layer alone; layer + op, clamp on every token; the same captured
    graph replayed with no row active at the op's layer."""
    x = torch.randn(batch, d, device=device, dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    tables.h_buf[0, :batch].normal_()
    out = torch.empty_like(x)

    def plain() -> None:
        out.copy_(layer(x))

    def with_op() -> None:
        out.copy_(layer(x))
        torch.ops.resae.steer(out, residual, 1)

    spec = SteeringSpec(edits=(SteerEdit(1, 7, "clamp", 2.0),))
    for req in tables.known_requests():
        tables.release(req)
    rows = [tables.claim(f"r{j}", spec) for j in range(batch)]
    ones = np.ones(batch, dtype=np.int64)
    tables.prepare_step(batch, rows, ones, ones * 5, ones)              # every token steered
    t_plain = median_seconds(_graphed(plain, device), device, repeats=20)
    steered = _graphed(with_op, device)
    t_active = median_seconds(steered, device, repeats=20)
    idle = [tables.claim(f"idle{j}", SteeringSpec(monitor=MonitorSpec((0,)), key="k"))
            for j in range(batch)]
    tables.prepare_step(batch, idle, ones, ones * 5, ones)               # active, no row here
    t_idle = median_seconds(steered, device, repeats=20)                # same graph, replayed
    return t_plain, t_active, t_idle


def _timing(device: torch.device, quick: bool, section: Section, deadline: float) -> None:
    """Op time per layer against the stand-in layer."""
    torch.backends.cuda.matmul.allow_tf32 = True
    grid = ([(64, 512, torch.float32)] if quick else
            [(d, s, dt) for d in (2048, 4096) for s in (16384, 65536)
             for dt in (torch.bfloat16, torch.float32)])
    batches = (1, 4) if quick else (1, 32, 256)
    for d, d_sae, sae_dtype in grid:
        if time.monotonic() > deadline:
            section.notes.append(f"Skipped (time budget): d {d}, d_sae {d_sae}, "
                                 f"{str(sae_dtype)[6:]} and after.")
            break
        resae = random_resae(d, d_sae, (0, 1), device, dtype=sae_dtype)
        tables = SteeringTables(resae, max_tokens=max(batches), max_rows=5, device=device,
                                dtype=torch.bfloat16, graph_body=True, screen=False)
        layer = _layer(d, device)
        op.install_tables(tables)
        for batch in batches:
            t_plain, t_active, t_idle = _time_batch(layer, tables, d, batch, device)
            section.rows.append([
                str(d), str(d_sae), str(sae_dtype)[6:], str(batch), f"{t_plain * 1e3:.3f}",
                f"{(t_active - t_plain) * 1e3:.3f}", f"{(t_idle - t_plain) * 1e3:.3f}",
                fmt((t_active - t_plain) / t_plain, 2)])
        op.install_tables(None)
        del resae, tables
        if device.type == "cuda":
            torch.cuda.empty_cache()
    section.notes.append(
        "Time rows: stand-in layer time in its CUDA graph; op time (graph with op − layer) with "
        "a clamp on every token (encode at this layer) and with no row active at this layer "
        "(flags skip the work); the active op's time as a multiple of the layer's. Model "
        "activations bfloat16; the dictionary's weights as stated (float32: TF32 allowed).")


def op_section(device: torch.device, quick: bool) -> Section:
    """Parity of the graph body inside CUDA-graph replay, and op time per layer."""
    section = Section(TITLE, ["d_model", "d_sae", "SAE dtype", "batch", "layer ms",
                              "op ms, clamp on every token", "op ms, idle layer",
                              "op / layer"])
    start = time.monotonic()
    _parity(device, quick, section)
    logger.info("op parity done in %.1f s", time.monotonic() - start)
    _timing(device, quick, section, deadline=start + (20 if quick else 150))
    logger.info("op section done in %.1f s", time.monotonic() - start)
    return section
