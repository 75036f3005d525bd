"""Bounded load on the gRPC server: concurrent mixed Generate streams, latency and memory.

    python -m benchmarks.load --streams 16 --duration 60 [--requests N] [--tokens 32]
        [--mix plain=0.4,steered=0.3,monitored=0.3] [--max-num-seqs N]
        [--target HOST:PORT [--server-pid PID] | --serve [--dictionary DIR]]
        [--out docs/load-results.json] [--no-record]
    python -m benchmarks.load --overload [--max-pending 4] [--burst 12] [--tokens 32]

``--streams`` workers (asyncio tasks on one client loop, one channel) each send Generate
calls back to back until ``--requests`` calls were started or ``--duration`` seconds passed,
whichever comes first: no call starts after the deadline, calls still running
``--grace`` seconds after it are cancelled (counted as ``CUT``). Each call picks its kind by
``--mix``: *plain*; *steered*, an ADD at the first dictionary layer and a CLAMP at the second,
on feature ids derived from the worker index (so workers hold distinct steering configs);
*monitored*, the top-8 features at every dictionary layer. Every call is greedy with
``ignore_eos`` and ``--tokens`` new tokens. Per call it records the status code, the time to
the first token (from sending), per-token latency (the gap between token chunks divided by
the chunk's tokens, one sample per token) and the tokens received. A thread samples the RSS
of the server process and its children (vLLM EngineCore and worker) every second, and of each
process apart every ``--rss-interval`` seconds (growth per process, RSS per minute).

``--serve`` runs ``python -m resae_serve serve`` as a child process (the deployment: its own
processes, the KV cache sized to the job unless ``--kv-cache-gib``), on a random dictionary of
the real shape with the real fingerprint unless ``--dictionary``; the soak of
``docs/RELIABILITY.md`` is ``--serve --streams 64 --duration 600 --max-num-seqs 16`` (and 64).

Without ``--target`` the server runs in this process (as in ``benchmarks/server.py``: a random
dictionary of the real shape with the real model's fingerprint, the compiled engine) on its own
event-loop thread, so client and server share the GIL and the cores: a pessimistic setting.
``--overload`` starts it with a small ``--max-pending`` and fires ``--burst`` (default 3 ×
max_pending) simultaneous calls: the overflow must end RESOURCE_EXHAUSTED at once, the
rejections' latency is compared with the accepted calls' time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from benchmarks._inprocess import in_process_server
from benchmarks._memory import MemorySampler, MemoryStats, listening_pid
from benchmarks._soak import ProcessSampler, rss_tables, serve_child

logger = logging.getLogger("benchmarks.load")
KINDS = ("plain", "steered", "monitored")
DEFAULT_MIX = "plain=0.4,steered=0.3,monitored=0.3"
PROMPTS = ("The history of the city begins", "In the laboratory, the scientists",
           "My grandmother used to tell me", "The committee decided that the new",
           "Once upon a time, in a small village", "The results of the experiment show")
CUT = "CUT"
"""Code of a call cancelled by the load generator at deadline + grace."""


@dataclass(frozen=True)
class LoadConfig:
    """One load run's settings."""

    streams: int = 16
    """Concurrent workers, each with at most one call in flight."""
    duration_s: float = 60.0
    """No call starts after this many seconds."""
    requests: int | None = None
    """Stop starting calls after this many (None: only the duration limits the run)."""
    tokens: int = 32
    """New tokens per call (``ignore_eos``, so every completed call has exactly this many)."""
    mix: tuple[tuple[str, float], ...] = (("plain", 0.4), ("steered", 0.3), ("monitored", 0.3))
    """Kinds and their weights."""
    grace_s: float = 10.0
    """Calls still running this long after the deadline are cancelled."""
    top_k: int = 8
    """Monitored calls report this many features per token and layer."""
    seed: int = 0
    """Seeds each worker's choice of kinds."""

    def __post_init__(self) -> None:
        if self.streams < 1:
            raise ValueError(f"streams={self.streams}; must be >= 1")
        if not self.duration_s > 0:
            raise ValueError(f"duration_s={self.duration_s}; must be > 0")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"requests={self.requests}; must be >= 1 or None")
        if self.tokens < 1:
            raise ValueError(f"tokens={self.tokens}; must be >= 1")
        if self.grace_s < 0:
            raise ValueError(f"grace_s={self.grace_s}; must be >= 0")
        unknown = [k for k, _ in self.mix if k not in KINDS]
        if unknown or not self.mix:
            raise ValueError(f"mix kinds {unknown or 'none'}; allowed: {', '.join(KINDS)}")
        if any(w < 0 or not math.isfinite(w) for _, w in self.mix) or \
                sum(w for _, w in self.mix) <= 0:
            raise ValueError(f"mix weights {[w for _, w in self.mix]}; finite, >= 0, sum > 0")


def parse_mix(text: str) -> tuple[tuple[str, float], ...]:
    """``"plain=0.4,steered=0.3"`` → ``(("plain", 0.4), ("steered", 0.3))``."""
    pairs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, weight = part.partition("=")
        try:
            pairs.append((kind.strip(), float(weight)))
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"mix item {part!r}; expected KIND=WEIGHT with KIND in "
                             f"{', '.join(KINDS)}")
    return tuple(pairs)


class RequestRecord(NamedTuple):
    """One Generate call as the client saw it."""

    kind: str
    """plain, steered or monitored."""
    code: str
    """gRPC status name, ``CUT`` (cancelled by us) or ``NO_SUMMARY`` (ended without one)."""
    ttft_s: float | None
    """Sending to the first token chunk; None without tokens."""
    token_latency_s: tuple[float, ...]
    """Per-token latency after the first chunk (gap / tokens of the chunk, one per token)."""
    tokens: int
    """Tokens received."""
    latency_s: float
    """Sending to the end of the call (OK, error or cut)."""
    detail: str
    """Status details of a failed call."""


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# ----------------------------------------------------------------------------- calls

async def send(client: Any, kind: str, request: Any, records: list[RequestRecord]) -> None:
    """Stream one Generate call and append its :class:`RequestRecord` (also when cancelled)."""
    sent = time.perf_counter()
    first: float | None = None
    last = sent
    gaps: list[float] = []
    tokens, code, detail = 0, "NO_SUMMARY", ""
    try:
        async for response in client.stream(request):
            which = response.WhichOneof("kind")
            if which == "chunk" and response.chunk.tokens:
                now, n = time.perf_counter(), len(response.chunk.tokens)
                if first is None:
                    first = now
                else:
                    gaps += [(now - last) / n] * n
                last, tokens = now, tokens + n
            elif which == "summary":
                code = "OK"
    except grpc.aio.AioRpcError as exc:
        code, detail = exc.code().name, exc.details() or ""
    except asyncio.CancelledError:
        code = CUT
        raise
    finally:
        records.append(RequestRecord(kind, code, None if first is None else first - sent,
                                     tuple(gaps), tokens, time.perf_counter() - sent, detail))


def build_request(kind: str, worker: int, serial: int, info: Any, config: LoadConfig) -> Any:
    """A GenerateRequest of ``kind`` for ``worker`` (``info``: the GetDictionary reply)."""
    from resae_serve.server.client import add, clamp, generate_request, monitor

    layers = [x.layer for x in info.layers]
    interventions, mon = [], None
    if kind == "steered":
        second = info.layers[min(1, len(layers) - 1)]
        interventions = [add(layers[0], (11 + 37 * worker) % info.layers[0].d_sae, 2.0),
                         clamp(second.layer, (101 + 53 * worker) % second.d_sae, 1.0)]
    elif kind == "monitored":
        mon = monitor(layers, top_k=min(config.top_k, info.limits.max_top_k))
    request = generate_request(PROMPTS[(worker + serial) % len(PROMPTS)],
                               max_tokens=config.tokens, temperature=0.0,
                               interventions=interventions, monitor=mon)
    request.sampling.ignore_eos = True
    return request


@dataclass
class LoadResult:
    """What a load run measured (times in seconds, memory in MiB)."""

    config: LoadConfig
    requests: int
    by_kind: dict[str, dict[str, int]]
    """Calls per kind and status code."""
    errors: int
    """Calls that ended neither OK nor CUT."""
    cut: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    ttft_p99_s: float | None
    token_p50_s: float | None
    token_p90_s: float | None
    token_p99_s: float | None
    memory: MemoryStats | None
    error_details: list[str] = field(default_factory=list)
    """Up to 10 distinct ``code: details`` of the errors."""


async def run_load(target: str, config: LoadConfig, *, token: str | None = None,
                   server_pid: int | None = None, progress_s: float = 10.0) -> LoadResult:
    """Run ``config`` against the server at ``target`` (must be called on the client loop)."""
    from resae_serve.server.client import AsyncResaeClient

    client = AsyncResaeClient(target, token=token,
                              timeout=config.duration_s + config.grace_s + 120)
    records: list[RequestRecord] = []
    try:
        info = await client.get_dictionary()
        if config.tokens > info.limits.max_tokens:
            raise ValueError(f"tokens={config.tokens} is above the server's max_tokens="
                             f"{info.limits.max_tokens}")
        kinds, weights = zip(*config.mix, strict=True)
        started = 0
        start = time.perf_counter()
        deadline = start + config.duration_s

        def claim() -> bool:
            nonlocal started
            if time.perf_counter() >= deadline or started == (config.requests or -1):
                return False
            started += 1
            return True

        async def worker(i: int) -> None:
            rng = random.Random(config.seed * 100_003 + i)
            serial = 0
            while claim():
                kind = rng.choices(kinds, weights)[0]
                await send(client, kind, build_request(kind, i, serial, info, config), records)
                serial += 1

        async def progress() -> None:
            while True:
                await asyncio.sleep(progress_s)
                elapsed = time.perf_counter() - start
                logger.info("%5.0f s: %d calls done, %d running, %.1f tokens/s", elapsed,
                            len(records), started - len(records),
                            sum(r.tokens for r in records) / elapsed)

        with (MemorySampler(server_pid) if server_pid else contextlib.nullcontext()) as sampler:
            reporter = asyncio.create_task(progress())
            tasks = [asyncio.create_task(worker(i)) for i in range(config.streams)]
            _, running = await asyncio.wait(tasks, timeout=config.duration_s + config.grace_s)
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            wall = time.perf_counter() - start
            reporter.cancel()
            for task in tasks:                 # a bug in the generator itself, not a call error
                failure = None if task.cancelled() else task.exception()
                if failure is not None:
                    raise failure
    finally:
        await client.close()
        await asyncio.sleep(0.2)    # let gRPC deliver the cancelled calls' last events here
    return summarize(config, records, wall, sampler.stats() if sampler else None)


def summarize(config: LoadConfig, records: list[RequestRecord], wall_s: float,
              memory: MemoryStats | None) -> LoadResult:
    """Aggregate the records of a run."""
    by_kind: dict[str, Counter[str]] = {k: Counter() for k, _ in config.mix}
    for r in records:
        by_kind[r.kind][r.code] += 1
    errors = [r for r in records if r.code not in ("OK", CUT)]
    ttft = [r.ttft_s for r in records if r.code == "OK" and r.ttft_s is not None]
    per_token = [g for r in records if r.code == "OK" for g in r.token_latency_s]
    tokens = sum(r.tokens for r in records)
    return LoadResult(
        config, len(records), {k: dict(c) for k, c in by_kind.items()}, len(errors),
        sum(r.code == CUT for r in records), tokens, wall_s, tokens / wall_s,
        percentile(ttft, 50), percentile(ttft, 90), percentile(ttft, 99),
        percentile(per_token, 50), percentile(per_token, 90), percentile(per_token, 99), memory,
        sorted({f"{r.code}: {r.detail}" for r in errors})[:10])


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{1000 * value:.0f}"


def load_tables(result: LoadResult) -> str:
    """Markdown: calls by kind and status code, then the run's figures."""
    codes = sorted({c for counts in result.by_kind.values() for c in counts},
                   key=lambda c: (c != "OK", c))
    rows = ["| kind | " + " | ".join(codes) + " | calls |",
            "| --- | " + " | ".join("---:" for _ in codes) + " | ---: |"]
    for kind, counts in result.by_kind.items():
        rows.append(f"| {kind} | " + " | ".join(str(counts.get(c, 0)) for c in codes)
                    + f" | {sum(counts.values())} |")
    m = result.memory
    figures = [
        ("calls / errors / cut", f"{result.requests} / {result.errors} / {result.cut}"),
        ("tokens, wall", f"{result.tokens}, {result.wall_s:.1f} s"),
        ("throughput", f"{result.tokens_per_s:.1f} tokens/s"),
        ("TTFT p50 / p90 / p99", f"{_ms(result.ttft_p50_s)} / {_ms(result.ttft_p90_s)} / "
                                 f"{_ms(result.ttft_p99_s)} ms"),
        ("per-token latency p50 / p90 / p99",
         f"{_ms(result.token_p50_s)} / {_ms(result.token_p90_s)} / "
         f"{_ms(result.token_p99_s)} ms"),
    ]
    if m is not None:
        figures.append((f"server RSS ({m.processes} processes) start / end / max",
                        f"{m.start_mib:.0f} / {m.end_mib:.0f} / {m.max_mib:.0f} MiB"))
        figures.append(("RSS growth", f"{m.growth_mib:+.0f} MiB over {m.samples} samples"))
    return "\n".join([*rows, "", "| figure | value |", "| --- | ---: |",
                      *(f"| {k} | {v} |" for k, v in figures)])


# ----------------------------------------------------------------------------- overload

@dataclass
class OverloadResult:
    """A burst of simultaneous calls against a small ``max_pending``."""

    burst: int
    tokens: int
    codes: dict[str, int]
    rejected: int
    """Calls that ended RESOURCE_EXHAUSTED."""
    rejection_p50_s: float | None
    rejection_max_s: float | None
    accepted_ttft_p50_s: float | None
    accepted_ttft_max_s: float | None
    rejection_details: list[str]
    """Distinct status details of the rejections."""
    records: list[RequestRecord] = field(repr=False, default_factory=list)


async def run_overload(target: str, burst: int, tokens: int, *,
                       token: str | None = None) -> OverloadResult:
    """Fire ``burst`` plain calls at once; measure rejections against accepted calls."""
    from resae_serve.server.client import AsyncResaeClient

    config = LoadConfig(streams=1, tokens=tokens)
    client = AsyncResaeClient(target, token=token, timeout=600)
    records: list[RequestRecord] = []
    try:
        info = await client.get_dictionary()
        requests = [build_request("plain", i, 0, info, config) for i in range(burst)]
        await asyncio.gather(*(send(client, "plain", r, records) for r in requests))
    finally:
        await client.close()
    rejected = [r for r in records if r.code == "RESOURCE_EXHAUSTED"]
    accepted = [r.ttft_s for r in records if r.code == "OK" and r.ttft_s is not None]
    latency = [r.latency_s for r in rejected]
    return OverloadResult(burst, tokens, dict(Counter(r.code for r in records)), len(rejected),
                          percentile(latency, 50), max(latency, default=None),
                          percentile(accepted, 50), max(accepted, default=None),
                          sorted({r.detail for r in rejected}), records)


def overload_table(result: OverloadResult, max_pending: int | None) -> str:
    """Markdown: outcomes of the burst and how fast each kind came back."""
    codes = ", ".join(f"{c} {n}" for c, n in sorted(result.codes.items()))
    return "\n".join([
        "| burst | max_pending | outcomes | rejection p50 / max (ms) | accepted TTFT p50 / max "
        "(ms) |", "| ---: | ---: | --- | ---: | ---: |",
        f"| {result.burst} | {max_pending or '?'} | {codes} | {_ms(result.rejection_p50_s)} / "
        f"{_ms(result.rejection_max_s)} | {_ms(result.accepted_ttft_p50_s)} / "
        f"{_ms(result.accepted_ttft_max_s)} |"])


# ----------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds")
    parser.add_argument("--requests", type=int, default=None, help="stop after N calls")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--mix", default=DEFAULT_MIX)
    parser.add_argument("--grace", type=float, default=10.0, help="seconds past the deadline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", help="HOST:PORT of a running server (default: in-process)")
    parser.add_argument("--token", help="bearer token for --target")
    parser.add_argument("--server-pid", type=int, help="pid to sample with --target")
    parser.add_argument("--overload", action="store_true")
    parser.add_argument("--max-pending", type=int, default=4, help="in-process --overload")
    parser.add_argument("--burst", type=int, help="default 3 × max_pending")
    parser.add_argument("--serve", action="store_true",
                        help="run `resae serve` as a child process (default: in-process)")
    parser.add_argument("--dictionary", type=Path,
                        help="--serve: dictionary folder (default: random, real shape)")
    parser.add_argument("--max-num-seqs", type=int, help="engine batch (default: --streams)")
    parser.add_argument("--max-model-len", type=int, default=512, help="--serve")
    parser.add_argument("--kv-cache-gib", type=float, default=None,
                        help="KV cache GiB (default: --serve the server's own sizing, "
                             "in-process 1)")
    parser.add_argument("--rss-interval", type=float, default=5.0,
                        help="seconds between per-process RSS samples")
    parser.add_argument("--out", type=Path, help="JSON (default docs/load[-overload]-results)")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    config = LoadConfig(streams=args.streams, duration_s=args.duration, requests=args.requests,
                        tokens=args.tokens, mix=parse_mix(args.mix), grace_s=args.grace,
                        seed=args.seed)
    burst = args.burst or 3 * args.max_pending
    seqs = args.max_num_seqs or (burst if args.overload else args.streams)
    pending = args.max_pending if args.overload else 4 * args.streams
    load_before = os.getloadavg()[0]
    processes: list[Any] = []
    in_process = not (args.target or args.serve)
    with contextlib.ExitStack() as stack:
        if args.target:
            target, pid = args.target, args.server_pid or listening_pid(args.target)
            if pid is None:
                logger.warning("server pid unknown (give --server-pid): no memory sampling")
        elif args.serve:
            child, port = stack.enter_context(_served(args, seqs, pending))
            target, pid = f"127.0.0.1:{port}", child.pid
        else:
            server = stack.enter_context(in_process_server(
                seqs, args.tokens, pending, math.ceil(args.kv_cache_gib or 1)))
            target, pid = f"127.0.0.1:{server.port}", os.getpid()
        if args.overload:
            n_warm = min(burst, args.max_pending)
            logger.info("warm-up: %d calls", n_warm)
            asyncio.run(run_load(target, LoadConfig(streams=n_warm, requests=n_warm,
                                                    tokens=args.tokens, mix=(("plain", 1),)),
                                 token=args.token))
            result: Any = asyncio.run(run_overload(target, burst, args.tokens, token=args.token))
            max_pending = None if args.target else args.max_pending
            table = overload_table(result, max_pending)
            data: dict[str, Any] = {**asdict(result), "max_pending": max_pending}
            data["records"] = [r._asdict() for r in result.records]
        else:
            warm = LoadConfig(streams=config.streams, requests=config.streams,
                              tokens=config.tokens, mix=config.mix)
            logger.info("warm-up: %d calls", warm.requests)
            asyncio.run(run_load(target, warm, token=args.token))
            with (ProcessSampler(pid, args.rss_interval) if pid
                  else contextlib.nullcontext()) as sampler:
                result = asyncio.run(run_load(target, config, token=args.token,
                                              server_pid=pid))
            table = load_tables(result)
            data = asdict(result)
            if sampler is not None:
                processes = sampler.series()
                table += "\n\n" + rss_tables(processes)
                data["processes"] = [asdict(p) for p in processes]
        if in_process:
            data["server_after"] = after = server.wait_idle()
            table += ("\n\nServer after the run (polled up to 30 s): "
                      + ", ".join(f"{k} {v}" for k, v in after.items()))
            if any(after.values()):
                logger.error("the server is not idle 30 s after the run: %s", after)
    load_after = os.getloadavg()[0]
    sys.stdout.write(table + "\n")
    out = args.out or Path("docs") / ("load-overload-results.json" if args.overload
                                      else "load-results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**data, "target": args.target or "in-process",
                               "load_average": [load_before, load_after]}, indent=2))
    logger.info("wrote %s", out)
    if not args.no_record:
        _record(args, argv, table, load_before, load_after)
    return 0


@contextlib.contextmanager
def _served(args: argparse.Namespace, seqs: int, pending: int) -> Iterator[tuple[Any, int]]:
    """``resae serve`` as a child process for ``--serve`` (a random dictionary unless given)."""
    import tempfile

    from benchmarks.engine import random_dictionary

    with tempfile.TemporaryDirectory() as tmp:
        dictionary = args.dictionary or random_dictionary(Path(tmp) / "dict")
        flags = ["--max-num-seqs", str(seqs), "--max-model-len", str(args.max_model_len),
                 "--max-pending", str(pending), "--max-tokens", str(max(args.tokens, 64))]
        if args.kv_cache_gib is not None:
            flags += ["--kv-cache-gib", str(args.kv_cache_gib)]
        with serve_child(dictionary, flags, Path(tmp) / "server.log") as served:
            yield served


def _record(args: argparse.Namespace, argv: list[str] | None, table: str, load_before: float,
            load_after: float) -> None:
    from benchmarks._common import append_results

    command = ("python -m benchmarks.load " + " ".join(argv or sys.argv[1:])).strip()
    seqs = args.max_num_seqs or args.streams
    kv = (f"KV cache {args.kv_cache_gib:g} GiB" if args.kv_cache_gib is not None
          else "KV cache sized by the server")
    where = (f"server at {args.target}" if args.target else
             f"`resae serve` child process (SmolLM2-135M compiled, max_num_seqs {seqs}, "
             f"max_model_len {args.max_model_len}, {kv}; random dictionary of the real shape: "
             "4 layers × 4608 latents, k 32)" if args.serve else
             "in-process server (SmolLM2-135M compiled, random dictionary of the real shape: "
             "4 layers × 4608 latents, k 32; client and server share the GIL and the cores)")
    load = f"1-minute load average {load_before:.1f} at the start, {load_after:.1f} at the end."
    if args.overload:
        append_results(f"gRPC overload: {args.burst or 3 * args.max_pending} simultaneous "
                       f"Generate calls, {args.tokens} tokens", command, table,
                       f"{where}. Rejection latency is sending to the RESOURCE_EXHAUSTED "
                       f"status; TTFT is sending to the first token; after a warm-up of "
                       f"{min(args.burst or 3 * args.max_pending, args.max_pending)} calls. "
                       f"{load}")
    else:
        append_results(f"gRPC load: {args.streams} streams, {args.duration:g} s, {args.tokens} "
                       f"tokens, mix {args.mix}", command, table,
                       f"{where}. Greedy, ignore_eos; steered = ADD + CLAMP at two layers, "
                       "feature ids per worker; monitored = top-8 at all layers. Per-token "
                       "latency = gap between token chunks / tokens in the chunk; TTFT from "
                       "sending. RSS sampled every second (this process and its children: vLLM "
                       "EngineCore, worker, resource tracker), after a warm-up of one call per "
                       f"stream. {load}")


if __name__ == "__main__":
    sys.exit(main())
