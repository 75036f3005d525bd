"""The OpenAI-compatible HTTP API against gRPC on one server: tokens/s and time to first token.

    python -m benchmarks.http_vs_grpc [--streams 1,16] [--requests 32] [--tokens 32]
        [--rounds 2] [--dictionary DIR] [--no-record]

One ``resae serve --http-port`` child process (the deployment: SmolLM2-135M compiled, a random
dictionary of the real shape unless ``--dictionary``) answers both protocols. For each number
of concurrent streams and each kind (*plain*; *steered*: an ADD at the first dictionary layer
and a CLAMP at the second, as in ``benchmarks/load.py``), the same ``--requests`` greedy
streamed completions of ``--tokens`` tokens (``ignore_eos``) are sent over gRPC (the project's
client) and over HTTP (the real ``openai`` client, ``stream=True``, the steering in
``extra_body={"resae": …}``), rotating the protocols' order over ``--rounds`` rounds so
drift on a shared machine hits all alike. Each protocol's client is connected before the
timing starts (gRPC: its channel; HTTP: ``streams`` pooled connections, opened by concurrent
``GET /v1/models``), as a long-lived client in production is. Reported per cell: tokens/s
(all tokens / wall time of the round, median over rounds), time to first token p50 (from
sending to the first chunk that carries text), and the ratio HTTP / gRPC.

Client and server share this machine's cores, so a client that spends more CPU per token
leaves the server less. Two HTTP clients are therefore measured beside gRPC: the real
``openai`` client (what users run), and a lean one (``httpx`` streaming the same request and
reading the server-sent events with ``json.loads``), which isolates the server's cost of the
protocol. A second table gives the CPU each side spent per generated token: the client (this
process) and the server's front end (the ``resae serve`` process: gRPC, HTTP and vLLM's
``AsyncLLM`` client; its engine-core and worker children busy-poll, so their CPU time says
nothing about the protocol).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks.http_vs_grpc")
PROMPTS = ("The history of the city begins", "In the laboratory, the scientists",
           "My grandmother used to tell me", "The committee decided that the new")


PROTOCOLS = ("grpc", "http", "http-lean")
"""gRPC (the project's client), HTTP with the ``openai`` client, HTTP with a lean client."""


@dataclass
class Round:
    """One protocol's pass over the requests of a cell."""

    tokens: int
    wall_s: float
    ttft_s: list[float]
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _interventions(info: Any, worker: int) -> list[Any]:
    from resae_serve.server.client import add, clamp

    first, second = info.layers[0], info.layers[min(1, len(info.layers) - 1)]
    return [add(first.layer, (11 + 37 * worker) % first.d_sae, 2.0),
            clamp(second.layer, (101 + 53 * worker) % second.d_sae, 1.0)]


def _resae_body(info: Any, kind: str, worker: int) -> dict[str, Any]:
    """The HTTP body's ``resae`` field of a request of ``kind`` (none when plain)."""
    from google.protobuf import json_format

    if kind != "steered":
        return {}
    return {"resae": {"interventions": [json_format.MessageToDict(x)
                                        for x in _interventions(info, worker)]}}


async def _grpc_round(target: str, kind: str, streams: int, requests: int, tokens: int
                      ) -> Round:
    from resae_serve.server.client import AsyncResaeClient, generate_request

    client = AsyncResaeClient(target, timeout=600)
    info = await client.get_dictionary()
    queue = list(range(requests))
    total, ttft = 0, []

    async def worker(w: int) -> None:
        nonlocal total
        while queue:
            i = queue.pop()
            request = generate_request(
                PROMPTS[i % len(PROMPTS)], max_tokens=tokens, temperature=0.0,
                interventions=_interventions(info, w) if kind == "steered" else [])
            request.sampling.ignore_eos = True
            sent, first = time.perf_counter(), None
            async for response in client.stream(request):
                if response.WhichOneof("kind") == "chunk" and response.chunk.tokens:
                    first = first or time.perf_counter()
                    total += len(response.chunk.tokens)
            if first is not None:
                ttft.append(first - sent)

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(streams)))
    wall = time.perf_counter() - start
    await client.close()
    return Round(total, wall, ttft)


async def _http_round(target: str, http: str, kind: str, streams: int, requests: int,
                      tokens: int) -> Round:
    from openai import AsyncOpenAI

    from resae_serve.server.client import AsyncResaeClient

    grpc_client = AsyncResaeClient(target, timeout=60)
    info = await grpc_client.get_dictionary()
    await grpc_client.close()
    client = AsyncOpenAI(base_url=f"http://{http}/v1", api_key="none", max_retries=0,
                         timeout=600)
    model = (await client.models.list()).data[0].id
    await asyncio.gather(*(client.models.list() for _ in range(streams)))   # open connections
    queue = list(range(requests))
    total, ttft = 0, []

    async def worker(w: int) -> None:
        nonlocal total
        body: dict[str, Any] = {"ignore_eos": True, **_resae_body(info, kind, w)}
        while queue:
            i = queue.pop()
            sent, first = time.perf_counter(), None
            stream = await client.completions.create(
                model=model, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=tokens,
                temperature=0.0, stream=True, stream_options={"include_usage": True},
                extra_body=body)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    first = first or time.perf_counter()
                if chunk.usage is not None:
                    total += chunk.usage.completion_tokens
            if first is not None:
                ttft.append(first - sent)

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(streams)))
    wall = time.perf_counter() - start
    await client.close()
    return Round(total, wall, ttft)


async def _lean_http_round(target: str, http: str, kind: str, streams: int, requests: int,
                           tokens: int) -> Round:
    """As :func:`_http_round`, the same request bodies, read with ``httpx`` and ``json``."""
    import httpx

    from resae_serve.server.client import AsyncResaeClient

    grpc_client = AsyncResaeClient(target, timeout=60)
    info = await grpc_client.get_dictionary()
    await grpc_client.close()
    queue = list(range(requests))
    total, ttft = 0, []
    async with httpx.AsyncClient(base_url=f"http://{http}/v1", timeout=600,
                                 limits=httpx.Limits(max_connections=streams)) as client:
        model = (await client.get("/models")).json()["data"][0]["id"]
        await asyncio.gather(*(client.get("/models") for _ in range(streams)))  # connections

        async def worker(w: int) -> None:
            nonlocal total
            body: dict[str, Any] = {"model": model, "max_tokens": tokens, "temperature": 0.0,
                                    "stream": True, "ignore_eos": True,
                                    "stream_options": {"include_usage": True},
                                    **_resae_body(info, kind, w)}
            while queue:
                i = queue.pop()
                sent, first = time.perf_counter(), None
                async with client.stream("POST", "/completions",
                                         json={**body, "prompt": PROMPTS[i % len(PROMPTS)]}
                                         ) as response:
                    response.raise_for_status()
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if chunk["choices"] and chunk["choices"][0]["text"]:
                            first = first or time.perf_counter()
                        if chunk.get("usage"):
                            total += chunk["usage"]["completion_tokens"]
                if first is not None:
                    ttft.append(first - sent)

        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(streams)))
        wall = time.perf_counter() - start
    return Round(total, wall, ttft)


def _cpu_s(process: Any) -> float:
    """User + system CPU seconds of ``process`` (a ``psutil.Process``)."""
    times = process.cpu_times()
    return float(times.user + times.system)


def _cell(target: str, http: str, kind: str, streams: int, args: argparse.Namespace,
          server: Any) -> dict[str, dict[str, Any]]:
    rounds: dict[str, list[Round]] = {p: [] for p in PROTOCOLS}
    for r in range(args.rounds):
        order = PROTOCOLS[r % 3:] + PROTOCOLS[:r % 3]
        for protocol in order:
            run = (_grpc_round(target, kind, streams, args.requests, args.tokens)
                   if protocol == "grpc" else
                   _http_round(target, http, kind, streams, args.requests, args.tokens)
                   if protocol == "http" else
                   _lean_http_round(target, http, kind, streams, args.requests, args.tokens))
            client_cpu, server_cpu = time.process_time(), _cpu_s(server)
            result = asyncio.run(run)
            result.client_cpu_s = time.process_time() - client_cpu
            result.server_cpu_s = _cpu_s(server) - server_cpu
            if result.tokens != args.requests * args.tokens:
                raise RuntimeError(f"{protocol} {kind} ×{streams}: {result.tokens} tokens, "
                                   f"expected {args.requests * args.tokens}")
            rounds[protocol].append(result)
            logger.info("%s %s ×%d round %d: %.1f tokens/s, TTFT p50 %.0f ms, CPU ms/token "
                        "client %.2f server %.2f", protocol, kind, streams, r,
                        result.tokens_per_s, 1000 * statistics.median(result.ttft_s),
                        1000 * result.client_cpu_s / result.tokens,
                        1000 * result.server_cpu_s / result.tokens)
    cell: dict[str, dict[str, Any]] = {
        p: {"tokens_per_s": statistics.median(x.tokens_per_s for x in rs),
            "ttft_p50_ms": 1000 * statistics.median(t for x in rs for t in x.ttft_s),
            "client_ms": 1000 * statistics.median(x.client_cpu_s / x.tokens for x in rs),
            "server_ms": 1000 * statistics.median(x.server_cpu_s / x.tokens for x in rs)}
        for p, rs in rounds.items()}
    for p in PROTOCOLS[1:]:          # HTTP / gRPC of the same round (adjacent in time)
        pairs = list(zip(rounds[p], rounds["grpc"], strict=True))
        cell[p]["paired_rate"] = [h.tokens_per_s / g.tokens_per_s for h, g in pairs]
        cell[p]["paired_ttft"] = [statistics.median(h.ttft_s) / statistics.median(g.ttft_s)
                                  for h, g in pairs]
    return cell


def _spread(ratios: list[float]) -> str:
    """``median (min–max)`` of per-round ratios."""
    return f"{statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f})"


def main(argv: list[str] | None = None) -> int:
    """Run every cell against one served child process, print and record the table."""
    from benchmarks._common import append_results
    from benchmarks._soak import serve_child
    from benchmarks.engine import random_dictionary

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1,16", help="comma-separated stream counts")
    parser.add_argument("--requests", type=int, default=32, help="calls per round")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per call")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per protocol and cell")
    parser.add_argument("--dictionary", type=Path, help="dictionary (default: random)")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    streams = [int(s) for s in args.streams.split(",")]
    load_before = os.getloadavg()[0]
    rows, cpu_rows, paired_rows = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        dictionary = args.dictionary or random_dictionary(Path(tmp) / "dict")
        http_port = _free_port()
        flags = ["--http-port", str(http_port), "--max-num-seqs", str(max(streams)),
                 "--max-model-len", "512", "--max-tokens", str(max(args.tokens, 64))]
        with serve_child(dictionary, flags, Path(tmp) / "server.log") as (process, port):
            import psutil

            server = psutil.Process(process.pid)
            target, http = f"127.0.0.1:{port}", f"127.0.0.1:{http_port}"
            warm = argparse.Namespace(**{**vars(args), "rounds": 3, "requests": 4})
            _cell(target, http, "steered", 2, warm, server)             # warm every path
            for n in streams:
                for kind in ("plain", "steered"):
                    cell = _cell(target, http, kind, n, args, server)
                    g, h, lean = cell["grpc"], cell["http"], cell["http-lean"]
                    rows.append(f"| {n} | {kind} | {g['tokens_per_s']:.1f} | "
                                f"{h['tokens_per_s']:.1f} | "
                                f"{h['tokens_per_s'] / g['tokens_per_s']:.3f} | "
                                f"{lean['tokens_per_s']:.1f} | "
                                f"{lean['tokens_per_s'] / g['tokens_per_s']:.3f} | "
                                f"{g['ttft_p50_ms']:.0f} | {h['ttft_p50_ms']:.0f} | "
                                f"{lean['ttft_p50_ms']:.0f} |")
                    paired_rows.append(f"| {n} | {kind} | " + " | ".join(
                        _spread(cell[p][key]) for key in ("paired_rate", "paired_ttft")
                        for p in PROTOCOLS[1:]) + " |")
                    cpu_rows.append(f"| {n} | {kind} | " + " | ".join(
                        f"{cell[p]['client_ms']:.3f} | {cell[p]['server_ms']:.3f}"
                        for p in PROTOCOLS) + " |")
    table = "\n".join([
        "| streams | kind | gRPC tokens/s | HTTP (openai) tokens/s | HTTP (openai) / gRPC "
        "| HTTP (lean) tokens/s | HTTP (lean) / gRPC | gRPC TTFT p50 ms "
        "| HTTP (openai) TTFT p50 ms | HTTP (lean) TTFT p50 ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|", *rows, "",
        "| streams | kind | tokens/s HTTP (openai) / gRPC, by round: median (min–max) "
        "| HTTP (lean) / gRPC | TTFT p50 HTTP (openai) / gRPC, by round | HTTP (lean) / gRPC |",
        "|---:|---|---|---|---|---|", *paired_rows, "",
        "| streams | kind | gRPC client CPU ms/token | gRPC server front end "
        "| HTTP (openai) client | HTTP (openai) server front end | HTTP (lean) client "
        "| HTTP (lean) server front end |",
        "|---:|---|---:|---:|---:|---:|---:|---:|", *cpu_rows])
    sys.stdout.write(table + "\n")
    if not args.no_record:
        command = ("python -m benchmarks.http_vs_grpc " + " ".join(argv or sys.argv[1:])).strip()
        append_results(
            "HTTP (OpenAI API) vs gRPC on one server", command, table,
            f"`resae serve --http-port` child "
            f"process (SmolLM2-135M compiled, max_num_seqs {max(streams)}, random dictionary "
            f"of the real shape); {args.requests} greedy streamed calls of {args.tokens} "
            f"tokens per round, {args.rounds} rounds per protocol in rotating order, medians; "
            f"the second table pairs each HTTP round with the gRPC round beside it. "
            f"CPU per token: user + system seconds of the client (this process) and of the "
            f"server's front-end process (not its busy-polling engine children) over a round, "
            f"divided by its tokens. "
            f"1-minute load average {load_before:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
