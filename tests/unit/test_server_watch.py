"""The server-wide monitoring hub (:mod:`resae_serve.server.watch`) without a server: a real
tokenizer, real Prometheus registries parsed from their text format, real files for the event
log. The gRPC side (WatchEvents, auth, Generate's guardrail) is in test_service_fake_engine."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import PreTrainedTokenizerFast

from resae_serve.engine.guards import GuardEvent, ServerMonitor
from resae_serve.server.config import WatchSettings
from resae_serve.server.convert import RequestError
from resae_serve.server.errors import ServiceError, status_for
from resae_serve.server.metrics import ServerMetrics
from resae_serve.server.v1 import resae_pb2 as pb
from resae_serve.server.watch import BATCH, EventLog, WatchedRecord, WatchHub

MONITORS = (ServerMonitor("tox", 1, 5, 2.0), ServerMonitor("pii", 3, 6, 1.0, "stop"))
NOW = 1_700_000_000.25


def _hub(tokenizer: Any, **settings: Any) -> WatchHub:
    return WatchHub(WatchSettings(**{"monitors": MONITORS, **settings}), tokenizer,
                    ServerMetrics(), clock=lambda: NOW)


def _event(i: int, monitor: str = "tox", token_id: int = 9) -> GuardEvent:
    return GuardEvent(f"r{i}", monitor, "record", i, token_id, 1, 5, 2.0 + i, 2.0)


def _scrape(metrics: ServerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def _drain(subscription: Any) -> list[pb.WatchEventsResponse]:
    """What the stream would send now (it has ended, so next() does not wait)."""
    subscription.end()
    out = []
    while (message := await subscription.next()) is not None:
        out.append(message)
    return out


def test_events_carry_token_text_and_reach_the_subscribers_that_follow_them(
        tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    hub = _hub(tiny_tokenizer)

    async def scenario() -> tuple[list[Any], list[Any]]:
        every, pii = hub.subscribe([]), hub.subscribe(["pii"])
        assert hub.subscribers == 2
        hub.fired(_event(0, token_id=9), True)                       # "w5"
        hub.fired(_event(1, "pii", token_id=-1), True)               # token not known
        hub.fired(_event(2, token_id=9), False)
        first = await every.next()                # waits for nothing: all three, in order
        rest = await _drain(every), await _drain(pii)
        every.close()
        pii.close()
        return [first, *rest[0]], rest[1]

    every_messages, pii_messages = asyncio.run(scenario())
    assert hub.subscribers == 0
    assert len(every_messages) == 1 and not every_messages[0].HasField("dropped")
    every = list(every_messages[0].events)
    assert [e.request_id for e in every] == ["r0", "r1", "r2"]
    assert [e.request_id for m in pii_messages for e in m.events] == ["r1"]
    assert every[0] == pb.WatchedEvent(
        request_id="r0", monitor="tox", action="record", position=0, token_id=9,
        token_text="w5", layer=1, feature=5, value=2.0, threshold=2.0, time_unix_s=NOW)
    assert every[1].token_text == "" and every[1].token_id == -1


def test_a_full_buffer_drops_the_oldest_and_says_how_many_with_the_next_events(
        tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    hub = _hub(tiny_tokenizer, subscriber_buffer=3)

    async def scenario() -> list[pb.WatchEventsResponse]:
        slow = hub.subscribe(["tox"])
        for i in range(10):
            hub.fired(_event(i), i == 0)
            hub.fired(_event(100 + i, "pii"), False)                 # not followed: no drops
        got = [await slow.next()]
        for i in range(10, 15):
            hub.fired(_event(i), False)
        got += await _drain(slow)
        slow.close()
        return got

    got = asyncio.run(scenario())
    assert len(got) == 2
    assert (got[0].dropped.dropped, got[0].dropped.total) == (7, 7)        # 0..6 dropped
    assert [e.request_id for e in got[0].events] == ["r7", "r8", "r9"]
    # 10..14 arrive into 3 slots: r10, r11 dropped
    assert (got[1].dropped.dropped, got[1].dropped.total) == (2, 9)
    assert [e.request_id for e in got[1].events] == ["r12", "r13", "r14"]
    scraped = _scrape(hub.metrics)
    assert scraped[("resae_watch_dropped_events_total", (("monitor", "tox"),))] == 9
    assert scraped[("resae_watch_dropped_events_total", (("monitor", "pii"),))] == 0
    assert scraped[("resae_watch_subscribers", ())] == 0


def test_a_message_carries_at_most_a_batch_of_events(tiny_tokenizer: PreTrainedTokenizerFast
                                                      ) -> None:
    hub = _hub(tiny_tokenizer, subscriber_buffer=1000)

    async def scenario() -> list[pb.WatchEventsResponse]:
        reader = hub.subscribe([])
        for i in range(BATCH + 44):
            hub.fired(_event(i), i == 0)
        got = [await reader.next()]
        got += await _drain(reader)
        reader.close()
        return got

    got = asyncio.run(scenario())
    assert [len(m.events) for m in got] == [BATCH, 44]
    assert [e.request_id for m in got for e in m.events] == [f"r{i}" for i in range(BATCH + 44)]
    assert not any(m.HasField("dropped") for m in got)


def test_per_monitor_metrics(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    hub = _hub(tiny_tokenizer)
    before = _scrape(hub.metrics)                                  # every series from the start
    for name in ("tox", "pii"):
        assert before[("resae_monitor_fired_tokens_total", (("monitor", name),))] == 0
        assert before[("resae_monitor_value_count", (("monitor", name),))] == 0
    hub.observed("tox", [0.0, 0.3, 1.5, 3.0, 100.0])
    hub.observed("pii", [])
    hub.fired(_event(0), True)
    hub.fired(_event(1), False)
    hub.fired(_event(2, "pii"), True)
    hub.fired(_event(3), True)                                     # a second request
    hub.observed("nobody", [1.0])                                  # not configured: ignored
    hub.fired(_event(4, "nobody"), True)
    scraped = _scrape(hub.metrics)
    tox, pii = (("monitor", "tox"),), (("monitor", "pii"),)
    assert scraped[("resae_monitor_fired_tokens_total", tox)] == 3
    assert scraped[("resae_monitor_fired_requests_total", tox)] == 2
    assert scraped[("resae_monitor_fired_tokens_total", pii)] == 1
    assert scraped[("resae_monitor_fired_requests_total", pii)] == 1
    buckets = {le: scraped[("resae_monitor_value_bucket", (("le", le), ("monitor", "tox")))]
               for le in ("0.0", "0.5", "1.0", "2.0", "4.0", "64.0", "+Inf")}
    assert buckets == {"0.0": 1, "0.5": 2, "1.0": 2, "2.0": 3, "4.0": 4, "64.0": 4, "+Inf": 5}
    assert scraped[("resae_monitor_value_sum", tox)] == pytest.approx(104.8)
    assert not any(dict(labels).get("monitor") == "nobody" for _, labels in scraped)


def test_subscribe_refuses_unknown_names_listing_the_configured_ones(
        tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    hub = _hub(tiny_tokenizer)
    with pytest.raises(RequestError) as info:
        hub.subscribe(["pii", "toxicity"])
    assert str(info.value) == ("monitors[1]='toxicity' is not a monitor of this server; its "
                               "monitors are ['tox', 'pii']")
    assert status_for(info.value)[0].name == "INVALID_ARGUMENT"
    with pytest.raises(ServiceError) as none:
        WatchHub(WatchSettings(), tiny_tokenizer, ServerMetrics()).subscribe([])
    assert none.value.code.name == "FAILED_PRECONDITION"

    async def stopping() -> None:
        open_one = hub.subscribe([])
        hub.end_streams()
        assert await open_one.next() is None                       # ends, waits for nothing
        with pytest.raises(ServiceError) as refused:
            hub.subscribe([])
        assert refused.value.code.name == "UNAVAILABLE"

    asyncio.run(stopping())


def test_events_from_another_thread_reach_subscribers_on_the_loop(
        tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    hub = _hub(tiny_tokenizer)

    async def scenario() -> str:
        subscription = hub.subscribe([])
        thread = threading.Thread(target=hub.fired, args=(_event(0), True))
        thread.start()
        message = await asyncio.wait_for(subscription.next(), 5)
        thread.join()
        subscription.close()
        assert message is not None
        return message.events[0].request_id

    assert asyncio.run(scenario()) == "r0"


# ----------------------------------------------------------------------------- event log

def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_event_log_writes_one_json_object_per_event(
        tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "logs" / "events.jsonl"
    hub = _hub(tiny_tokenizer, event_log=path)
    hub.fired(_event(0, token_id=9), True)
    hub.fired(_event(1, "pii", token_id=10), True)
    hub.close()
    rows = _lines(path)
    assert rows[0] == {"request_id": "r0", "monitor": "tox", "action": "record", "position": 0,
                       "token_id": 9, "token_text": "w5", "layer": 1, "feature": 5,
                       "value": 2.0, "threshold": 2.0, "time_unix_s": NOW}
    assert set(rows[0]) == set(pb.WatchedEvent.DESCRIPTOR.fields_by_name)
    assert rows[1]["monitor"] == "pii" and rows[1]["token_text"] == "w6"
    hub.close()                                                    # twice is fine


def test_event_log_rotates_by_size_keeping_backups(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("")                                            # an existing, empty log
    records = [WatchedRecord(f"r{i:03d}", "tox", "record", 0, 9, "w5", 1, 5, 2.0, 2.0, NOW)
               for i in range(40)]
    size = len(records[0].json_line())
    log = EventLog(path, max_bytes=3 * size, backups=2)            # three lines a file
    for record in records:
        log.write(record)
    log.close()
    files = [path.with_name(f"events.jsonl.{n}") for n in (2, 1)] + [path]
    assert not path.with_name("events.jsonl.3").exists()
    assert all(f.stat().st_size <= 3 * size for f in files)
    kept = [row["request_id"] for f in files for row in _lines(f)]
    # 40 lines = 13 full files + 1 line: the newest file holds r039, the two backups before it
    assert kept == [f"r{i:03d}" for i in range(33, 40)]
    assert log.lost == 0

    again = EventLog(path, max_bytes=3 * size, backups=2)          # appends after a restart
    again.write(records[0])
    again.close()
    assert [row["request_id"] for row in _lines(path)] == ["r039", "r000"]


def test_event_log_never_waits_when_its_writer_falls_behind(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl", max_bytes=1 << 20, backups=1, queue_events=2)
    record = WatchedRecord("r", "tox", "record", 0, 9, "w5", 1, 5, 2.0, 2.0, NOW)
    log._queue.put(record)                                         # fill it faster than it
    log._queue.put(record)                                         # drains (best effort)
    for _ in range(100):
        log.write(record)
    log.close()
    written = len(_lines(tmp_path / "events.jsonl"))
    assert written + log.lost == 102 and written >= 2
