"""Long fuzz run of the gRPC server against the oracle of ``tests/integration/fuzz_oracle``.

    python -m benchmarks.fuzz_server --cases 10000 [--seed N] [--out docs/fuzz-results.json]

Starts its own server (the test harness's random dictionary with a catalog, ``base_config``
limits, a real vLLM CPU engine), draws ``--cases`` requests and raw byte strings for every RPC
from the same strategies as ``tests/integration/test_server_fuzz.py`` (Hypothesis ``@given``
runs called programmatically, one per RPC, raw-or-typed and round, each seeded from
``--seed``: no shrinking, no example database; GetDictionary has a single typed request, so
the rest of its share goes to Generate), sends each one and compares its status with the
oracle's. Counts cases per RPC and status code, mismatches (should be 0;
answers to :data:`KNOWN_BUGS` are counted apart), hangs (a call running past ``--hang-s``),
engine crashes (health not SERVING; the run stops there), the server's idleness and health at
the end, RSS of this process and of the engine processes before and after, and wall time.
Writes a JSON summary (``--out``) and logs a table. ``--cases 50`` is a quick smoke check
(the engine start, about two minutes, dominates).
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks.fuzz_server")
CHECK_EVERY = 200
"""Cases between health and idleness checks (also after every INTERNAL/UNKNOWN/UNAVAILABLE)."""
MAX_EXAMPLES_KEPT = 50


def memory_mb() -> dict[str, float]:
    """RSS of this process (gRPC server, tokenizer) and of its children (vLLM engine), MiB."""
    try:
        import psutil
    except ImportError:                   # /proc fallback: this process only
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        import resource

        return {"server_process": pages * resource.getpagesize() / 2**20}
    me = psutil.Process()
    children = 0
    for child in me.children(recursive=True):
        try:
            children += child.memory_info().rss
        except psutil.Error:              # exited meanwhile
            continue
    return {"server_process": me.memory_info().rss / 2**20, "engine_processes": children / 2**20}


def describe(payload: Any) -> dict[str, Any]:
    """A mismatching case, reproducible: its text form (cut) and its bytes (base64, if small)."""
    data = payload if isinstance(payload, bytes) else payload.SerializeToString()
    text = repr(payload[:200]) if isinstance(payload, bytes) else str(payload)
    return {"raw_bytes": isinstance(payload, bytes), "size": len(data), "text": text[:2000],
            "base64": base64.b64encode(data).decode() if len(data) <= 65536 else None}


@dataclass
class Tally:
    """Everything counted during a run."""

    by_rpc: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    """Observed status code names per RPC."""
    expected: Counter[str] = field(default_factory=Counter)
    """The oracle's status code names."""
    raw: Counter[str] = field(default_factory=Counter)
    """Raw byte strings sent, per RPC."""
    seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    """Call durations per RPC."""
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    """The first :data:`MAX_EXAMPLES_KEPT` mismatching cases, reproducible."""
    n_mismatches: int = 0
    known_bugs: Counter[str] = field(default_factory=Counter)
    """INTERNAL answers to requests of a known bug, per bug (not mismatches)."""
    hangs: int = 0
    crash: str | None = None
    """Why the run stopped early (engine gone, health not SERVING, harness error)."""
    not_idle: int = 0
    """Periodic checks that found the server still busy after 30 s."""
    cases: int = 0


def _health(channel: Any) -> str:
    """The server's overall health status name, or why it could not be asked."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=10).status
    except grpc.RpcError as exc:
        return f"unreachable ({exc.code().name})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))


def _check_server(server: Any, channel: Any, tally: Tally) -> None:
    """Record a crash (engine gone or health not SERVING) or a server that stays busy."""
    health = _health(channel)
    if server.service.engine is None or health != "SERVING":
        engine = "up" if server.service.engine is not None else f"down ({server.service.failure})"
        tally.crash = f"after {tally.cases} cases: health {health}, engine {engine}"
        return
    held = server.wait_idle(30.0)
    if any(held.values()):
        tally.not_idle += 1
        logger.warning("not idle after %d cases: %s", tally.cases, held)


def quotas(n_cases: int, raw_share: int) -> dict[tuple[str, bool], int]:
    """Cases per ``(rpc, raw bytes?)``: :data:`RPC_WEIGHTS` proportions, typed requests 4 to
    raw ``raw_share`` (largest remainders, so they sum to ``n_cases``)."""
    from tests.integration.fuzz_strategies import RPC_WEIGHTS

    weights = {(rpc, raw): w * (raw_share if raw else 4)
               for rpc, w in RPC_WEIGHTS.items() for raw in (False, True)}
    total = sum(weights.values())
    exact = {k: n_cases * w / total for k, w in weights.items()}
    out = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: out[k] - exact[k])[:n_cases - sum(out.values())]:
        out[k] += 1
    return out


def send_case(server: Any, channel: Any, tally: Tally, rpc: str, payload: Any,
              hang_s: float) -> None:
    """Send one case, judge it against the oracle and count it."""
    import grpc

    from tests.integration.fuzz_oracle import default_oracle, problems, send

    raw = isinstance(payload, bytes)
    oracle = default_oracle()
    verdict = oracle.verdict_for_bytes(rpc, payload) if raw else oracle.verdict(payload)
    outcome = send(channel, rpc, payload, hang_s)
    tally.cases += 1
    tally.by_rpc[rpc][outcome.code.name] += 1
    tally.expected[verdict.code.name] += 1
    tally.raw[rpc] += raw
    tally.seconds[rpc].append(outcome.seconds)
    if outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        tally.hangs += 1
    found = problems(rpc, payload, verdict, outcome)
    if found and verdict.known_bug and outcome.code == grpc.StatusCode.INTERNAL:
        tally.known_bugs[verdict.known_bug] += 1
    elif found:
        tally.n_mismatches += 1
        logger.warning("case %d %s: %s", tally.cases, rpc, "; ".join(found))
        if len(tally.mismatches) < MAX_EXAMPLES_KEPT:
            tally.mismatches.append({"case": tally.cases, "rpc": rpc, "problems": found,
                                     "expected": verdict.code.name, "reason": verdict.reason,
                                     "observed": outcome.code.name,
                                     "details": outcome.details[:500], **describe(payload)})
    if (outcome.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                         grpc.StatusCode.UNAVAILABLE) or tally.cases % CHECK_EVERY == 0):
        _check_server(server, channel, tally)


def run_cases(server: Any, channel: Any, n_cases: int, seed: int, hang_s: float,
              raw_share: int) -> Tally:
    """Draw and send ``n_cases`` cases, one seeded Hypothesis run per (RPC, raw?) and round
    (rounds interleave the RPCs); stop once the engine died."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from tqdm import tqdm

    from tests.integration.fuzz_strategies import REQUESTS, raw_bytes

    tally = Tally()
    bar = tqdm(total=n_cases, unit="case", dynamic_ncols=True)

    def chunk(rpc: str, raw: bool, k: int, label: str) -> None:
        @hypothesis_seed(f"{seed}-{label}")
        @settings(max_examples=k, database=None, derandomize=False, deadline=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(raw_bytes(rpc) if raw else REQUESTS[rpc])
        def one(payload: Any) -> None:
            if tally.crash is None:           # the engine is gone: draw on, send nothing
                send_case(server, channel, tally, rpc, payload, hang_s)
                bar.update(1)
                bar.set_postfix(mismatches=tally.n_mismatches, hangs=tally.hangs,
                                known=sum(tally.known_bugs.values()), refresh=False)
        one()

    rounds = max(1, min(10, n_cases // 200))
    try:
        for r in range(rounds):
            for (rpc, raw), quota in quotas(n_cases, raw_share).items():
                k = quota // rounds + (r < quota % rounds)
                if k and tally.crash is None:
                    chunk(rpc, raw, k, f"{rpc}-{raw}-{r}")
        extra = 0                             # tiny spaces (GetDictionary) end early
        while tally.cases < n_cases and tally.crash is None:
            chunk("Generate", False, n_cases - tally.cases, f"extra-{extra}")
            extra += 1
    except Exception as exc:                  # a harness failure: report what was counted
        logger.exception("the fuzz loop stopped after %d cases", tally.cases)
        tally.crash = f"harness error after {tally.cases} cases: {type(exc).__name__}: {exc}"
    finally:
        bar.close()
    return tally


def table(tally: Tally) -> str:
    """A markdown table: cases, status codes, mismatches and latency per RPC."""
    codes = sorted({code for counts in tally.by_rpc.values() for code in counts})
    head = ["RPC", "cases", "raw", *codes, "p50 ms", "p99 ms", "max ms"]
    rows = []
    for rpc in sorted(tally.by_rpc):
        counts, s = tally.by_rpc[rpc], sorted(tally.seconds[rpc])
        p99 = s[min(len(s) - 1, int(0.99 * len(s)))]
        rows.append([rpc, str(sum(counts.values())), str(tally.raw[rpc]),
                     *(str(counts.get(c, 0)) for c in codes),
                     f"{statistics.median(s) * 1e3:.1f}", f"{p99 * 1e3:.1f}",
                     f"{s[-1] * 1e3:.1f}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def summary(tally: Tally, args: argparse.Namespace, seed: int, wall_s: float,
            memory: dict[str, dict[str, float]], health: str, idle: bool) -> dict[str, Any]:
    """The JSON summary of a run."""
    from benchmarks._common import machine_description
    from tests.integration.fuzz_oracle import KNOWN_BUGS

    by_code: Counter[str] = Counter()
    for counts in tally.by_rpc.values():
        by_code.update(counts)
    return {
        "command": " ".join(["python -m benchmarks.fuzz_server", *sys.argv[1:]]),
        "machine": machine_description(), "seed": seed, "cases_requested": args.cases,
        "cases": tally.cases, "wall_s": round(wall_s, 1),
        "cases_per_s": round(tally.cases / wall_s, 2) if wall_s else None,
        "by_rpc": {rpc: dict(sorted(c.items())) for rpc, c in sorted(tally.by_rpc.items())},
        "raw_bytes_by_rpc": dict(sorted(tally.raw.items())),
        "by_code": dict(sorted(by_code.items())), "expected_by_code": dict(tally.expected),
        "mismatches": tally.n_mismatches, "mismatch_examples": tally.mismatches,
        "known_bugs": dict(tally.known_bugs),
        "known_bug_descriptions": {k: KNOWN_BUGS[k] for k in tally.known_bugs},
        "hangs": tally.hangs, "hang_s": args.hang_s, "crash": tally.crash,
        "not_idle_checks": tally.not_idle, "health_end": health, "idle_end": idle,
        "rss_mb": {k: {n: round(v, 1) for n, v in m.items()} for k, m in memory.items()},
        "latency_s": {rpc: {"p50": round(statistics.median(s), 4), "max": round(max(s), 4)}
                      for rpc, s in sorted(tally.seconds.items())},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="requests to send")
    parser.add_argument("--seed", type=int, default=None,
                        help="Hypothesis seed (default: random; written to the summary)")
    parser.add_argument("--out", type=Path, default=None, help="JSON summary file")
    parser.add_argument("--hang-s", type=float, default=60.0,
                        help="a call running longer than this counts as a hang")
    parser.add_argument("--raw-share", type=int, default=1,
                        help="raw byte strings per 4 typed requests (default 1)")
    parser.add_argument("--dictionary", type=Path, default=None,
                        help="reuse this harness dictionary (default: build one, ~30 s)")
    parser.add_argument("--verbose", action="store_true", help="log every refused request")
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error(f"--cases={args.cases}; give at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the fuzz campaign; exit status 1 on any mismatch, hang, crash or unhealthy end."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not args.verbose:                  # the server logs every INVALID_ARGUMENT at INFO
        logging.getLogger("resae_serve").setLevel(logging.WARNING)
    import grpc

    from tests.integration.fuzz_oracle import default_oracle
    from tests.integration.server_harness import ServerLoop, base_config, build_dictionary

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    default_oracle()                      # load the tokenizer before the clock starts
    with tempfile.TemporaryDirectory(prefix="fuzz-server-") as tmp:
        dictionary = args.dictionary or build_dictionary(Path(tmp) / "dict")
        loop = ServerLoop()
        try:
            logger.info("starting the server (engine start takes a minute or two)")
            server = loop.start(base_config(dictionary))
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                memory = {"before": memory_mb()}
                logger.info("fuzzing with %d cases, seed %d", args.cases, seed)
                start = time.perf_counter()
                tally = run_cases(server, channel, args.cases, seed, args.hang_s,
                                  args.raw_share)
                wall_s = time.perf_counter() - start
                held = server.wait_idle(30.0)
                if any(held.values()):
                    logger.warning("server still holds %s after 30 s", held)
                idle, health = not any(held.values()), _health(channel)
                memory["after"] = memory_mb()
        finally:
            loop.close()
            server = None             # the engine's AsyncLLM goes now, not at interpreter exit
            gc.collect()
    result = summary(tally, args, seed, wall_s, memory, health, idle)
    logger.info("fuzz results (seed %d, %d cases, %.0f s):\n%s", seed, tally.cases, wall_s,
                table(tally))
    logger.info("mismatches %d, known bugs %s, hangs %d, crash %s, health %s, idle %s, "
                "RSS MiB %s", tally.n_mismatches, dict(tally.known_bugs), tally.hangs,
                tally.crash, health, idle, result["rss_mb"])
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        logger.info("wrote %s", args.out)
    ok = not (tally.n_mismatches or tally.hangs or tally.crash) and health == "SERVING" and idle
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
