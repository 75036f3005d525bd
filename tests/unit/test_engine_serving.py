"""The async ``generate`` wrapper over a fake driver: admission, features, events, abort,
liveness, and the typed worker RPCs (records in wire form, as vLLM's transport delivers them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from resae_serve.engine.guards import GuardEvent, GuardPolicy, ServerMonitor
from resae_serve.engine.rpc import EngineInfo, FeatureRuntimeInfo, MonitorEvent, MonitorRecord, Rpc
from resae_serve.engine.serving import ResaeEngine, collect
from resae_serve.engine.spec import (
    Condition,
    MonitorSpec,
    SamplingSpec,
    SteerEdit,
    SteeringSpec,
    Threshold,
)
from resae_serve.interventions import InterventionError

INFO = EngineInfo(layers=(1, 3), d_sae=(32, 32), d_model=8, max_configs=1)
PROMPT = [5, 6, 7]


class FakeEngine:
    """A :class:`~resae_serve.engine.driver.Driver` that emits one token per step; the
    'worker' records each step's input position."""

    def __init__(self, n_tokens: int = 3) -> None:
        self.n_tokens = n_tokens
        self.records: dict[str, list[MonitorRecord]] = {}
        self.live: list[str] = []
        self.aborted: list[str] = []
        self.discarded: list[str] = []
        self.salts: dict[str, str | None] = {}
        self.samplings: dict[str, SamplingSpec] = {}
        self.errored = False
        self.gate = asyncio.Event()
        self.gate.set()

    async def generate(self, prompt: Any, sampling: SamplingSpec, steering: SteeringSpec,
                       request_id: str) -> AsyncIterator[Any]:
        self.live.append(request_id)
        self.salts[request_id] = prompt.get("cache_salt")
        self.samplings[request_id] = sampling
        monitor = steering.monitor.layers
        tokens: list[int] = []
        n_prompt = len(prompt["prompt_token_ids"])
        for step in range(self.n_tokens):
            await self.gate.wait()
            positions = range(n_prompt) if step == 0 else [n_prompt + step - 1]
            for p in positions:
                for layer in steering.monitor_layers:
                    client = layer in monitor
                    events = (MonitorEvent(p, layer, 4, 2.5, 2.0),) if p == 1 and client else ()
                    guards = [g for g in steering.guards if g.layer == layer]
                    events += tuple(MonitorEvent(p, layer, g.feature, float(p), g.threshold,
                                                 g.name) for g in guards if p >= g.threshold)
                    self.records.setdefault(request_id, []).append(MonitorRecord(
                        request_id, p, layer, *(((p, 0), (float(p), 0.0), (float(p),))
                                                if client else ((), (), ())),
                        events=events, out_of_distribution=int(p == 0),
                        guard_values=tuple(float(p) for _ in guards), client=client))
            if step == 1:   # a recompute after preemption repeats position 0
                self.records.setdefault(request_id, []).extend(
                    MonitorRecord(request_id, 0, layer) for layer in monitor)
            tokens.append(100 + step)
            done = step == self.n_tokens - 1
            yield SimpleNamespace(request_id=request_id, finished=done,
                                  prompt_token_ids=prompt["prompt_token_ids"],
                                  outputs=[SimpleNamespace(
                token_ids=list(tokens), text="x" * len(tokens),
                finish_reason="length" if done else None)])
        self.live.remove(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def collective_rpc(self, method: str, timeout: float | None = None,
                             args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
                             ) -> list[Any]:
        assert type(method) is str           # vLLM's transport gets the plain name
        if method == Rpc.DISCARD:
            self.records.pop(args[0], None)
            self.discarded.append(args[0])
            return [None]
        if method == Rpc.INFO:
            return [INFO.to_wire()]
        if method == Rpc.RUNTIME:
            return [FeatureRuntimeInfo("onnxruntime", "cpu", "float32", 1, "/x").to_wire()]
        assert method == Rpc.TAKE_MANY
        # as msgpack delivers them: tuples become lists
        return [{key: [_listed(r.to_wire()) for r in self.records.pop(key, [])]
                 for key in args[0]}]

    def num_unfinished(self) -> int:
        return len(self.live)

    def shutdown(self) -> None:
        self.errored = True


def _listed(value: Any) -> Any:
    return [_listed(v) for v in value] if isinstance(value, tuple | list) else value


def _sampling() -> SamplingSpec:
    return SamplingSpec(max_tokens=3, temperature=0.0)


def test_stream_delivers_tokens_features_and_events_in_order() -> None:
    async def scenario() -> None:
        engine = ResaeEngine(FakeEngine(), INFO)
        monitor = MonitorSpec((1, 3), top_k=2, watch=(4,), thresholds=(Threshold(3, 4, 2.0),))
        chunks = [c async for c in engine.generate(PROMPT, _sampling(), monitor=monitor,
                                                   request_id="a")]
        assert [c.token_ids for c in chunks] == [(100,), (101,), (102,)]
        assert chunks[-1].finished and chunks[-1].finish_reason == "length"
        seen = [(f.position, f.layer) for c in chunks for f in c.features]
        # prompt 0..2, generated 3..4 (the last token, 5, is never fed back); position 0 is
        # recomputed in step 1 but delivered once
        assert seen == [(p, layer) for p in range(5) for layer in (1, 3)]
        events = [e for c in chunks for e in c.events]
        assert {(e.position, e.feature, e.value) for e in events} == {(1, 4, 2.5)}
        # monitored: a salt of its own, so no prompt position is skipped by the prefix cache
        again = [c async for c in engine.generate(PROMPT, _sampling(), monitor=monitor,
                                                  request_id="b")]
        assert again[-1].finished
        salts = engine.driver.salts                               # type: ignore[attr-defined]
        assert salts["a"].startswith("resae-monitor-") and salts["a"] != salts["b"]

    asyncio.run(scenario())


def test_distinct_configs_wait_for_rows_and_unsteered_do_not() -> None:
    async def scenario() -> None:
        fake = FakeEngine()
        engine = ResaeEngine(fake, INFO)                 # one config resident at a time
        fake.gate.clear()
        first = asyncio.ensure_future(collect(engine.generate(
            PROMPT, _sampling(), interventions=[SteerEdit(1, 2, "add", 1.0)], request_id="a")))
        second = asyncio.ensure_future(collect(engine.generate(
            PROMPT, _sampling(), interventions=[SteerEdit(1, 3, "add", 1.0)], request_id="b")))
        plain = asyncio.ensure_future(collect(engine.generate(PROMPT, _sampling(),
                                                              request_id="c")))
        await asyncio.sleep(0.01)
        assert sorted(fake.live) == ["a", "c"] and engine.admission.waited == 1
        fake.gate.set()
        outs = await asyncio.gather(first, second, plain)
        assert [len(o.token_ids) for o in outs] == [3, 3, 3]
        assert fake.salts["a"] and fake.salts["b"] and fake.salts["a"] != fake.salts["b"]
        assert fake.salts["c"] is None and engine.admission.resident == 0

    asyncio.run(scenario())


def test_stopping_early_aborts_and_releases() -> None:
    async def scenario() -> None:
        fake = FakeEngine(n_tokens=10)
        engine = ResaeEngine(fake, INFO)
        stream = engine.generate(PROMPT, _sampling(), request_id="a",
                                 interventions=[SteerEdit(3, 1, "ablate")],
                                 monitor=MonitorSpec((3,), top_k=1))
        async for _ in stream:
            break
        await stream.aclose()
        assert fake.aborted == ["a"] and engine.admission.resident == 0
        assert fake.discarded == ["a"] and "a" not in fake.records

    asyncio.run(scenario())


@pytest.mark.parametrize("kwargs, field", [
    ({"interventions": [SteerEdit(2, 1, "add", 1.0)]}, "layer=2"),
    ({"interventions": [SteerEdit(1, 32, "add", 1.0)]}, "feature=32"),
    ({"monitor": MonitorSpec((1,), thresholds=(Threshold(3, 1, 1.0),))}, "layer=3"),
    ({"monitor": MonitorSpec((1,), top_k=33)}, "top_k=33"),
])
def test_invalid_specs_fail_before_admission(kwargs: dict[str, Any], field: str) -> None:
    async def scenario() -> None:
        engine = ResaeEngine(FakeEngine(), INFO)
        with pytest.raises(InterventionError, match=field):
            await collect(engine.generate(PROMPT, _sampling(), **kwargs))
        assert engine.admission.resident == 0

    asyncio.run(scenario())


def test_threshold_value_must_be_finite() -> None:
    with pytest.raises(InterventionError, match="threshold value"):
        Threshold(1, 1, float("nan"))


def test_connect_reads_info_and_liveness_comes_from_the_driver() -> None:
    async def scenario() -> None:
        fake = FakeEngine()
        engine = await ResaeEngine.connect(fake, max_configs=4)
        assert engine.info == INFO and engine.admission.max_configs == 1   # capped by the tables
        assert engine.feature_runtime.backend == "onnxruntime"   # as the worker reports it
        sampling = SamplingSpec(max_tokens=3, temperature=0.5, seed=3, stop=("x",))
        stream = engine.generate(PROMPT, sampling, request_id="a",
                                 interventions=[SteerEdit(1, 2, "add", 1.0)])
        await anext(stream)
        assert fake.samplings["a"] == sampling                  # the spec reaches the driver
        assert engine.num_unfinished() == 1 and engine.resident_configs == 1
        await stream.aclose()
        assert engine.resident_configs == 0 and not engine.errored
        await engine.shutdown()
        assert engine.errored

    asyncio.run(scenario())


def test_an_engine_error_mid_stream_releases_the_config() -> None:
    from resae_serve.errors import EngineDeadError

    class Dying(FakeEngine):
        async def generate(self, prompt: Any, sampling: SamplingSpec, steering: SteeringSpec,
                           request_id: str) -> AsyncIterator[Any]:
            async for out in super().generate(prompt, sampling, steering, request_id):
                yield out
                raise EngineDeadError("the engine stopped")

    async def scenario() -> None:
        engine = ResaeEngine(Dying(), INFO)
        with pytest.raises(EngineDeadError):
            await collect(engine.generate(PROMPT, _sampling(), request_id="a",
                                          interventions=[SteerEdit(1, 2, "add", 1.0)]))
        assert engine.admission.resident == 0

    asyncio.run(scenario())


class _Listener:
    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}
        self.fired: list[tuple[GuardEvent, bool]] = []

    def observed(self, monitor: str, values: Sequence[float]) -> None:
        self.values.setdefault(monitor, []).extend(values)

    def fired_(self, event: GuardEvent, first: bool) -> None:
        self.fired.append((event, first))



def test_a_stop_monitor_ends_the_request_at_the_firing_token() -> None:
    """Generated tokens are held back until the monitor read them; the request ends at the
    stop monitor's first event (finish reason ``guardrail``, aborted in the engine); the
    listener hears every guard value and event up to that position, none after it."""
    async def scenario() -> None:
        driver = FakeEngine(n_tokens=6)
        engine = ResaeEngine(driver, INFO)
        listener = _Listener()
        policy = GuardPolicy((ServerMonitor("rec", 1, 7, 2.0), ServerMonitor("halt", 3, 9, 4.0,
                                                                               "stop")))
        engine.set_guards(policy, SimpleNamespace(observed=listener.observed,
                                                  fired=listener.fired_))
        chunks = [c async for c in engine.generate(PROMPT, _sampling(), request_id="a")]
        # P = 3: token 100 at position 3, 101 at 4 (the first position >= 4.0)
        assert [c.token_ids for c in chunks] == [(), (100,), (101,)]
        assert "".join(c.text for c in chunks) == "xx"
        last = chunks[-1]
        assert last.finished and last.finish_reason == "guardrail"
        assert last.guardrail == MonitorEvent(4, 3, 9, 4.0, 4.0, "halt")
        assert driver.aborted == ["a"] and driver.discarded == ["a"]
        assert not any(c.features or c.events for c in chunks)     # nothing asked by the caller
        fired = [(e.monitor, e.position, e.token_id, first) for e, first in listener.fired]
        assert fired == [("rec", 2, 7, True), ("rec", 3, 100, False), ("rec", 4, 101, False),
                         ("halt", 4, 101, True)]
        # position 0 is out of distribution: not observed
        assert listener.values == {"rec": [1.0, 2.0, 3.0, 4.0], "halt": [1.0, 2.0, 3.0, 4.0]}
        assert engine.resident_configs == 0

    asyncio.run(scenario())


def test_a_policy_applies_to_sampled_requests_and_refuses_what_does_not_fit() -> None:
    engine = ResaeEngine(FakeEngine(), INFO)
    nudge = ServerMonitor("nudge", 1, 7, 2.0, "steer", SteerEdit(3, 5, "add", 1.0))
    engine.set_guards(GuardPolicy((nudge,)))
    spec = engine.spec(key="r")
    assert spec.guards == (nudge.guard(),)
    assert spec.edits == (SteerEdit(3, 5, "add", 1.0, when=Condition(1, 7, 2.0, sticky=True)),)
    assert spec.cache_salt() is not None                 # steered: its own prefix cache
    engine.set_guards(GuardPolicy((nudge,), sample=0.0))
    assert engine.spec(key="r").guards == () and engine.spec(key="r").edits == ()
    half = GuardPolicy((nudge,), sample=0.5)
    picked = sum(half.sampled(f"req-{n}") for n in range(400))
    assert 150 < picked < 250 and half.sampled("req-1") == half.sampled("req-1")
    with pytest.raises(InterventionError, match="monitor 'far': feature=99 at layer 1"):
        engine.set_guards(GuardPolicy((ServerMonitor("far", 1, 99, 1.0),)))
    with pytest.raises(InterventionError, match=r"edit\.layer=1 is before the monitor's layer 3"):
        engine.set_guards(GuardPolicy((ServerMonitor("back", 3, 1, 1.0, "steer",
                                                     SteerEdit(1, 5, "add", 1.0)),)))
    edits = [SteerEdit(3, f, "clamp", 0.0) for f in range(8)]     # 8 per layer: the cap
    engine.set_guards(GuardPolicy((nudge,)))
    with pytest.raises(InterventionError, match="server's policy adds 1 intervention"):
        engine.spec(edits, key="r")
