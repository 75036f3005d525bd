"""Server-wide monitors and conditional edits: decode throughput against plain, side by side.

One in-process server (the compiled SmolLM2-135M engine, a random dictionary of the real one's
shape: 4 layers × 4608 latents, k 32; ``benchmarks/_inprocess.py``) and one gRPC client with
``--streams`` concurrent streams of greedy ``--tokens``-token requests (``ignore_eos``).
Cells, interleaved over ``--rounds`` rounds (medians; ratios against the plain cell):

- plain: no policy, plain requests;
- 16 monitors: the server's policy holds 16 ``record`` monitors (4 per dictionary layer) that
  apply to every request; their events go to the metrics and the event hub;
- conditional edit: no policy; every request clamps one feature at the second dictionary
  layer ``when`` a feature at the first reaches a value (evaluated inside the op);
- 16 monitors firing on every token: the same monitors at threshold 0 (every in-distribution
  token fires all 16: an event storm, far beyond any real alerting threshold);
- the same + idle subscriber: with a ``WatchEvents`` subscriber that never reads (the
  transport's window fills, then its buffer; the oldest events are dropped and counted).

The policy is switched between cells on the server's engine (``set_guards``), as a config
reload would. Usage: ``python -m benchmarks.watch [--streams 32] [--requests 64] [--tokens 32]
[--rounds 3] [--threshold 1.0]``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from typing import Any, NamedTuple

from benchmarks._common import append_results
from benchmarks._inprocess import LoopThread, in_process_server

logger = logging.getLogger(__name__)
PROMPTS = ["Once upon a time, in a small village,", "The capital of France is",
           "def fibonacci(n):", "The best way to learn a language is"]
CELLS = ("plain", "16 monitors", "conditional edit", "16 monitors firing on every token",
         "16 monitors firing on every token + idle subscriber")


class Round(NamedTuple):
    tokens: int
    seconds: float
    events: float
    dropped: float


def _monitors(threshold: float) -> Any:
    """16 record monitors, 4 per dictionary layer of ``benchmarks.engine.LAYERS``."""
    from benchmarks.engine import LAYERS
    from resae_serve.engine.guards import ServerMonitor
    from resae_serve.server.config import WatchSettings

    return WatchSettings(monitors=tuple(
        ServerMonitor(f"m{i}_{j}", layer, 7 + 113 * j, threshold)
        for i, layer in enumerate(LAYERS) for j in range(4)), subscriber_buffer=1024)


def _conditional(info: Any, threshold: float) -> Any:
    from resae_serve.server.client import edit
    from resae_serve.server.v1 import resae_pb2 as pb

    first, second = info.layers[0].layer, info.layers[1].layer
    sent = edit(second, 101, "clamp", 0.0)
    sent.when.CopyFrom(pb.Condition(layer=first, feature=7, value=threshold))
    return sent


async def _round(target: str, cell: str, args: argparse.Namespace, info: Any) -> Round:
    from resae_serve.server.client import AsyncResaeClient, generate_request

    client = AsyncResaeClient(target, timeout=600)
    queue = list(range(args.requests))
    total = 0
    interventions = [_conditional(info, args.threshold)] if cell == "conditional edit" else []

    async def worker() -> None:
        nonlocal total
        while queue:
            i = queue.pop()
            request = generate_request(PROMPTS[i % len(PROMPTS)], max_tokens=args.tokens,
                                       temperature=0.0, interventions=interventions)
            request.sampling.ignore_eos = True
            async for response in client.stream(request):
                if response.WhichOneof("kind") == "chunk":
                    total += len(response.chunk.tokens)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.streams)))
    wall = time.perf_counter() - start
    await client.close()
    return Round(total, wall, 0.0, 0.0)


def _counter(server: Any, name: str) -> float:
    """Sum of a Prometheus counter over its labels, from the server's registry."""
    total = 0.0
    for family in server.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


def run(args: argparse.Namespace) -> str:
    import grpc

    from resae_serve.engine.guards import GuardPolicy
    from resae_serve.server.client import AsyncResaeClient
    from resae_serve.server.v1 import resae_pb2 as pb
    from resae_serve.server.v1.resae_pb2_grpc import ResaeServiceStub

    server_loop, client_loop = LoopThread(), LoopThread()
    runs: dict[str, list[Round]] = {cell: [] for cell in CELLS}
    settings = _monitors(args.threshold)
    with in_process_server(args.streams, args.tokens, max(64, args.streams * 2), 2,
                           loop=server_loop, watch=settings) as server:
        target = f"127.0.0.1:{server.port}"

        async def dictionary() -> Any:
            client = AsyncResaeClient(target, timeout=600)
            try:
                return await client.get_dictionary()
            finally:
                await client.close()

        info = client_loop.run(dictionary())
        policy = settings.policy()
        storm = _monitors(0.0).policy()
        hub = server.watch_hub

        async def set_policy(p: Any) -> None:
            server.engine.set_guards(p, hub)

        async def idle_subscriber() -> Any:
            channel = grpc.aio.insecure_channel(target)
            call = ResaeServiceStub(channel).WatchEvents(pb.WatchEventsRequest())
            await call.wait_for_connection()
            return channel, call

        async def close(pair: Any) -> None:
            pair[1].cancel()
            await pair[0].close()

        client_loop.run(_round(target, "plain", argparse.Namespace(
            requests=args.streams, streams=args.streams, tokens=4, threshold=args.threshold),
            info))                                                        # warm-up
        for r in range(args.rounds):
            for cell in CELLS:
                server_loop.run(set_policy(storm if "every token" in cell else
                                           policy if "monitors" in cell else GuardPolicy()))
                idle = (client_loop.run(idle_subscriber()) if "subscriber" in cell else None)
                events = _counter(server, "resae_monitor_fired_tokens_total")
                dropped = _counter(server, "resae_watch_dropped_events_total")
                measured = client_loop.run(_round(target, cell, args, info))
                if idle is not None:
                    client_loop.run(close(idle))
                measured = measured._replace(
                    events=_counter(server, "resae_monitor_fired_tokens_total") - events,
                    dropped=_counter(server, "resae_watch_dropped_events_total") - dropped)
                runs[cell].append(measured)
                logger.info("round %d %s: %.0f tok/s, %d events, %d dropped", r, cell,
                            measured.tokens / measured.seconds, measured.events,
                            measured.dropped)
        server_loop.run(set_policy(GuardPolicy()))
    plain = statistics.median(m.tokens / m.seconds for m in runs["plain"])
    rows = []
    for cell in CELLS:
        rate = statistics.median(m.tokens / m.seconds for m in runs[cell])
        paired = [(m.tokens / m.seconds) / (p.tokens / p.seconds)      # same round's plain
                  for m, p in zip(runs[cell], runs["plain"], strict=True)]
        events = statistics.median(m.events for m in runs[cell])
        dropped = statistics.median(m.dropped for m in runs[cell])
        rows.append(f"| {cell} | {args.streams} | {rate:.0f} | {rate / plain:.3f} | "
                    f"{statistics.median(paired):.3f} ({min(paired):.3f}–{max(paired):.3f}) | "
                    f"{events:.0f} | {dropped:.0f} |")
    return ("| workload | streams | output tok/s | vs plain | vs plain of the same round: "
            "median (min–max) | monitor events / round | dropped / round |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n" + "\n".join(rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=1.0,
                        help="the 16 monitors' threshold and the edit's condition value")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    table = run(args)
    print(table)
    if not args.no_append:
        append_results("Server-wide monitors and conditional edits (issue 16)",
                       "python -m benchmarks.watch " + " ".join(argv or sys.argv[1:]), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
