"""gRPC overhead: time to first token and tokens/s through the server versus the engine API.

One process, one engine (SmolLM2-135M, compiled, the ReSAE hook with a random dictionary of
the real shape): the server runs on an event-loop thread as in production; "engine API" runs
:meth:`ResaeEngine.generate` on that same loop, "gRPC" sends the same requests through a
``grpc.aio`` client on a second loop thread over loopback (so the client's Python work shares
the GIL and the 2 cores with the server: a pessimistic setting for gRPC). Both paths alternate
in ``--rounds`` rounds and the median round is reported. Every request: greedy, ``ignore_eos``,
``--tokens`` new tokens, top-8 monitoring at every dictionary layer when ``--monitor``.

Usage: ``python -m benchmarks.server [--streams 1 16] [--tokens 64] [--rounds 3] [--monitor]``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from benchmarks._common import append_results

logger = logging.getLogger("benchmarks.server")
PROMPTS = ["The history of the city begins", "In the laboratory, the scientists",
           "My grandmother used to tell me", "The committee decided that the new"]


class Round(NamedTuple):
    ttft_s: list[float]
    tokens: int
    wall_s: float


async def _concurrently(n: int, one: Callable[[int], Awaitable[tuple[float, int]]]) -> Round:
    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - start
    return Round([r[0] for r in results], sum(r[1] for r in results), wall)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--monitor", action="store_true", help="top-8 monitoring, all layers")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    from benchmarks._inprocess import LoopThread, in_process_server
    from benchmarks.engine import LAYERS
    from resae_serve.engine.spec import MonitorSpec, SamplingSpec
    from resae_serve.server.client import AsyncResaeClient, generate_request, monitor

    width = max(args.streams)
    server_loop, client_loop = LoopThread(), LoopThread()
    with in_process_server(width, args.tokens, 4 * width, kv_cache_gib=2,
                           loop=server_loop) as server:
        engine = server.service.engine
        tokenizer = server.service.tokenizer
        prompt_ids = [list(tokenizer(p)["input_ids"]) for p in PROMPTS]
        mon = MonitorSpec(LAYERS, top_k=8) if args.monitor else None
        request_monitor = monitor(LAYERS, top_k=8) if args.monitor else None

        async def make_client() -> AsyncResaeClient:      # grpc.aio binds to this loop
            return AsyncResaeClient(f"127.0.0.1:{server.port}", timeout=600)

        client = client_loop.run(make_client())

        async def direct_one(i: int) -> tuple[float, int]:
            t0 = time.perf_counter()
            ttft, n = 0.0, 0
            params = SamplingSpec(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
            async for chunk in engine.generate(prompt_ids[i % len(PROMPTS)], params,
                                               monitor=mon):
                if chunk.token_ids and n == 0:
                    ttft = time.perf_counter() - t0
                n += len(chunk.token_ids)
            return ttft, n

        async def grpc_one(i: int) -> tuple[float, int]:
            request = generate_request(token_ids=prompt_ids[i % len(PROMPTS)],
                                       max_tokens=args.tokens, temperature=0.0,
                                       monitor=request_monitor)
            request.sampling.ignore_eos = True
            t0 = time.perf_counter()
            ttft, n = 0.0, 0
            async for response in client.stream(request):
                if response.HasField("chunk") and response.chunk.tokens:
                    if n == 0:
                        ttft = time.perf_counter() - t0
                    n += len(response.chunk.tokens)
            return ttft, n

        # warm-up: both paths, every batch size (compiles nothing new; fills caches)
        for n in args.streams:
            server_loop.run(_concurrently(n, direct_one))
            client_loop.run(_concurrently(n, grpc_one))
        results: dict[tuple[str, int], list[Round]] = {}
        for r in range(args.rounds):
            for n in args.streams:
                for path in ("engine API", "gRPC"):
                    if path == "gRPC":
                        result = client_loop.run(_concurrently(n, grpc_one))
                    else:
                        result = server_loop.run(_concurrently(n, direct_one))
                    results.setdefault((path, n), []).append(result)
                    logger.info("round %d, %d stream(s), %s: %.1f tok/s, TTFT p50 %.0f ms",
                                r + 1, n, path, result.tokens / result.wall_s,
                                1000 * statistics.median(result.ttft_s))
        client_loop.run(client.close())

    rows = ["| streams | path | tokens/s | ratio | TTFT p50 (ms) | TTFT max (ms) |",
            "| ---: | --- | ---: | ---: | ---: | ---: |"]
    summary = []
    for n in args.streams:
        base = None
        for path in ("engine API", "gRPC"):
            rounds = results[(path, n)]
            rates = [x.tokens / x.wall_s for x in rounds]
            rate = statistics.median(rates)
            median_round = rounds[rates.index(rate)] if rate in rates else rounds[0]
            base = base or rate
            ttft = sorted(median_round.ttft_s)
            rows.append(f"| {n} | {path} | {rate:.1f} | {rate / base:.2f} | "
                        f"{1000 * statistics.median(ttft):.0f} | {1000 * ttft[-1]:.0f} |")
            summary.append((n, path, rate / base))
    table = "\n".join(rows)
    sys.stdout.write(table + "\n")
    if not args.no_record:
        command = "python -m benchmarks.server " + " ".join(argv or sys.argv[1:])
        append_results(
            f"gRPC server vs engine API ({args.tokens} tokens per stream"
            + (", top-8 monitoring at 4 layers" if args.monitor else "") + ")",
            command.strip(), table,
            "Same engine, same process; the gRPC client runs on its own event-loop thread "
            "(shares the GIL and 2 cores with the server). Median of "
            f"{args.rounds} alternating rounds; ratio = gRPC / engine API tokens/s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
