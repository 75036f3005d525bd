"""The OpenAI-compatible HTTP API against gRPC on one server: tokens/s and time to first token.

    python -m benchmarks.http_vs_grpc [--streams 1,16] [--requests 32] [--tokens 32]
        [--rounds 2] [--dictionary DIR] [--no-record]

One ``resae serve --http-port`` child process (the deployment: SmolLM2-135M compiled, a random
dictionary of the real shape unless ``--dictionary``) answers both protocols. For each number
of concurrent streams and each kind (*plain*; *steered*: an ADD at the first dictionary layer
and a CLAMP at the second, as in ``benchmarks/load.py``), the same ``--requests`` greedy
streamed completions of ``--tokens`` tokens (``ignore_eos``) are sent over gRPC (the project's
client) and over HTTP (the real ``openai`` client, ``stream=True``, the steering in
``extra_body={"resae": …}``), alternating the protocols for ``--rounds`` rounds so drift on a
shared machine hits both alike. Reported per cell: tokens/s (all tokens / wall time of the
round, median over rounds), time to first token p50 (from sending to the first chunk that
carries text), and the ratio HTTP / gRPC.
"""

from __future__ import annotations

import argparse
import asyncio
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


@dataclass
class Round:
    """One protocol's pass over the requests of a cell."""

    tokens: int
    wall_s: float
    ttft_s: list[float]

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
    from google.protobuf import json_format
    from openai import AsyncOpenAI

    from resae_serve.server.client import AsyncResaeClient

    grpc_client = AsyncResaeClient(target, timeout=60)
    info = await grpc_client.get_dictionary()
    await grpc_client.close()
    client = AsyncOpenAI(base_url=f"http://{http}/v1", api_key="none", max_retries=0,
                         timeout=600)
    model = (await client.models.list()).data[0].id
    queue = list(range(requests))
    total, ttft = 0, []

    async def worker(w: int) -> None:
        nonlocal total
        body: dict[str, Any] = {"ignore_eos": True}
        if kind == "steered":
            body["resae"] = {"interventions": [json_format.MessageToDict(x)
                                               for x in _interventions(info, w)]}
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


def _cell(target: str, http: str, kind: str, streams: int, args: argparse.Namespace
          ) -> dict[str, dict[str, float]]:
    rounds: dict[str, list[Round]] = {"grpc": [], "http": []}
    for r in range(args.rounds):
        order = ("grpc", "http") if r % 2 == 0 else ("http", "grpc")
        for protocol in order:
            run = (_grpc_round(target, kind, streams, args.requests, args.tokens)
                   if protocol == "grpc" else
                   _http_round(target, http, kind, streams, args.requests, args.tokens))
            result = asyncio.run(run)
            if result.tokens != args.requests * args.tokens:
                raise RuntimeError(f"{protocol} {kind} ×{streams}: {result.tokens} tokens, "
                                   f"expected {args.requests * args.tokens}")
            rounds[protocol].append(result)
            logger.info("%s %s ×%d round %d: %.1f tokens/s, TTFT p50 %.0f ms", protocol, kind,
                        streams, r, result.tokens_per_s,
                        1000 * statistics.median(result.ttft_s))
    return {p: {"tokens_per_s": statistics.median(x.tokens_per_s for x in rs),
                "ttft_p50_ms": 1000 * statistics.median(t for x in rs for t in x.ttft_s)}
            for p, rs in rounds.items()}


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
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dictionary = args.dictionary or random_dictionary(Path(tmp) / "dict")
        http_port = _free_port()
        flags = ["--http-port", str(http_port), "--max-num-seqs", str(max(streams)),
                 "--max-model-len", "512", "--max-tokens", str(max(args.tokens, 64))]
        with serve_child(dictionary, flags, Path(tmp) / "server.log") as (_, port):
            target, http = f"127.0.0.1:{port}", f"127.0.0.1:{http_port}"
            warm = argparse.Namespace(**{**vars(args), "rounds": 1, "requests": 4})
            _cell(target, http, "steered", 2, warm)                      # warm both paths
            for n in streams:
                for kind in ("plain", "steered"):
                    cell = _cell(target, http, kind, n, args)
                    g, h = cell["grpc"], cell["http"]
                    rows.append(f"| {n} | {kind} | {g['tokens_per_s']:.1f} | "
                                f"{h['tokens_per_s']:.1f} | "
                                f"{h['tokens_per_s'] / g['tokens_per_s']:.3f} | "
                                f"{g['ttft_p50_ms']:.0f} | {h['ttft_p50_ms']:.0f} |")
    table = "\n".join([
        "| streams | kind | gRPC tokens/s | HTTP tokens/s | HTTP / gRPC | gRPC TTFT p50 ms "
        "| HTTP TTFT p50 ms |", "|---:|---|---:|---:|---:|---:|---:|", *rows])
    sys.stdout.write(table + "\n")
    if not args.no_record:
        command = ("python -m benchmarks.http_vs_grpc " + " ".join(argv or sys.argv[1:])).strip()
        flags = next((line.split(":", 1)[1].split() for line in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
        simd = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
        append_results(
            "HTTP (OpenAI API) vs gRPC on one server", command, table,
            f"CPU flags: {simd or 'none of avx2/avx512'}. `resae serve --http-port` child "
            f"process (SmolLM2-135M compiled, max_num_seqs {max(streams)}, random dictionary "
            f"of the real shape); {args.requests} greedy streamed calls of {args.tokens} "
            f"tokens per round, {args.rounds} rounds per protocol alternating, medians. "
            f"1-minute load average {load_before:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
