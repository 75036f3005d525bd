"""The worker's monitor fed by the real op (``SteeringTables.apply``) against
``ReSAE.encode_dense``: top-k, watch, thresholds, edited activations, recompute."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resae_serve.context import OutOfDistribution, TrainingContext
from resae_serve.engine.monitor import Monitor, StepCapture
from resae_serve.engine.rpc import MonitorEvent
from resae_serve.engine.spec import (
    Guard,
    MonitorSpec,
    SteerEdit,
    SteeringSpec,
    SteerVector,
    Threshold,
)
from resae_serve.engine.tables import SteeringTables
from resae_serve.resae import ReSAE
from tests.unit.resae_fixtures import D_MODEL, LAYERS, tiny_acts, tiny_resae


def _op_step(resae: ReSAE, specs: dict[str, SteeringSpec | None], counts: list[int],
             acts: dict[int, torch.Tensor]) -> tuple[StepCapture, dict[int, torch.Tensor]]:
    """One forward pass through the op: the monitor's input and the edited block outputs."""
    n = sum(counts)
    tables = SteeringTables(resae, max_tokens=n, max_rows=9)
    rows = [tables.claim(key, spec) for key, spec in specs.items()]
    starts = np.zeros(len(counts), dtype=np.int64)
    tables.prepare_step(n, rows, np.array(counts), starts, np.array(counts))
    edited = {}
    for i, layer in enumerate(LAYERS):
        residual = torch.zeros(n, D_MODEL)    # the block output exactly (tables tests split it)
        hidden = acts[layer].clone()
        tables.apply(i, hidden, residual)
        edited[layer] = hidden + residual
    step = StepCapture(keys=list(specs), counts=np.array(counts), starts=starts,
                       layers=tables.take_captures())
    return step, edited


def _step(resae: ReSAE, acts: dict[int, torch.Tensor], spec: MonitorSpec) -> StepCapture:
    return _op_step(resae, {"a": SteeringSpec(monitor=spec, key="a")},
                    [len(acts[LAYERS[0]])], acts)[0]


@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])   # sparse and dense paths
def test_records_match_resae_encode_and_raise_threshold_events(architecture: str) -> None:
    resae, acts = tiny_resae("resae", architecture), tiny_acts(5)
    with torch.no_grad():
        z = resae.encode_dense(acts)[LAYERS[1]]                               # (5, d_sae)
    feature = int(z[2].argmax())
    threshold = float(z[2, feature]) - 1e-3     # fires on token 2 despite rounding
    monitor = Monitor(resae)
    spec = MonitorSpec((LAYERS[1],), top_k=3, watch=(feature,),
                       thresholds=(Threshold(LAYERS[1], feature, threshold),))
    monitor.register("a", spec)
    monitor.submit(_step(resae, acts, spec))
    records = monitor.take("a")
    assert [(r.key, r.position, r.layer) for r in records] == [
        ("a", p, LAYERS[1]) for p in range(5)]
    for p, r in enumerate(records):
        values, ids = z[p].topk(3)
        assert r.top_ids == tuple(ids.tolist())
        torch.testing.assert_close(torch.tensor(r.top_values), values, atol=1e-5, rtol=0)
        assert r.watch == (pytest.approx(z[p, feature].item(), abs=1e-5),)
        assert r.raw == ()
        fired = r.watch[0] >= threshold                  # events read the reported values
        assert r.events == ((MonitorEvent(p, LAYERS[1], feature, r.watch[0], threshold),)
                            if fired else ())
    assert records[2].events


def test_recomputed_positions_are_counted_and_kept_once() -> None:
    resae, acts = tiny_resae(), tiny_acts(4)
    monitor, spec = Monitor(resae), MonitorSpec((LAYERS[0],), top_k=1)
    monitor.register("a", spec)
    monitor.submit(_step(resae, acts, spec))
    monitor.submit(_step(resae, acts, spec))  # the same positions again, as after a preemption
    records = monitor.take("a")
    assert monitor.recomputed == 4 and [r.position for r in records] == [0, 1, 2, 3]
    monitor.finish("a")
    monitor.flush()
    assert "a" not in monitor.specs


def test_a_reused_key_is_monitored_again_after_finish() -> None:
    resae, acts = tiny_resae(), tiny_acts(3)
    monitor, spec = Monitor(resae), MonitorSpec((LAYERS[0],), top_k=1)
    monitor.register("a", spec)
    monitor.submit(_step(resae, acts, spec))
    monitor.finish("a")                   # the request left; the next one has the same key
    monitor.register("a", spec)
    monitor.submit(_step(resae, acts, spec))
    assert len(monitor.take("a")) == 3 and monitor.recomputed == 0


@pytest.mark.parametrize("finished_first", [False, True])
def test_a_discarded_request_leaves_nothing_in_the_store(finished_first: bool) -> None:
    """An aborted request's results are dropped, also those of steps encoded after the
    discard and before the engine let the request go (or after, if it already had)."""
    resae, acts = tiny_resae(), tiny_acts(3)
    monitor, spec = Monitor(resae), MonitorSpec((LAYERS[0],), top_k=1)
    monitor.register("a", spec)
    monitor.submit(_step(resae, acts, spec))
    if finished_first:
        monitor.finish("a")
        monitor.discard("a")
    else:
        monitor.discard("a")
        monitor.submit(_step(resae, acts, spec))  # still in the engine: one more step arrives
        monitor.flush()
        monitor.finish("a")
    monitor.flush()
    assert monitor.stored_keys == 0 and monitor.take("a") == []


@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
def test_steered_tokens_report_the_codes_of_their_edited_activations(architecture: str) -> None:
    """Monitored codes are those of the edited block output (with the edited previous layer);
    unsteered tokens of the same pass report their clean codes."""
    resae, acts = tiny_resae("resae", architecture), tiny_acts(6)
    clean_z = resae.encode_dense(acts)[LAYERS[1]]
    feature = int(clean_z[4].argmax())
    vector = tuple(float(x) for x in torch.linspace(-1, 1, D_MODEL))
    monitor = MonitorSpec(LAYERS, top_k=4, watch=(feature, 3))
    steered = SteeringSpec(edits=(SteerEdit(LAYERS[0], 1, "add", 2.0),
                                  SteerEdit(LAYERS[1], feature, "clamp", 3.0),
                                  SteerEdit(LAYERS[1], 3, "scale", 2.0),
                                  SteerEdit(LAYERS[1], 5, "ablate"),
                                  SteerEdit(LAYERS[1], 7, "add", 1.5)),
                           vectors=(SteerVector(LAYERS[1], vector),), monitor=monitor, key="s")
    specs = {"c": SteeringSpec(monitor=monitor, key="c"), "s": steered,
             "u": None}                                         # 2 + 3 + 1 tokens
    step, edited = _op_step(resae, specs, [2, 3, 1], acts)
    mon = Monitor(resae)
    mon.register("c", monitor)
    mon.register("s", monitor)
    mon.submit(step)
    want = resae.encode_dense(edited)
    for key, rows in (("c", range(0, 2)), ("s", range(2, 5))):
        records = mon.take(key)
        assert [(r.position, r.layer) for r in records] == [
            (p, layer) for p in range(len(rows)) for layer in LAYERS]
        for r in records:
            z = want[r.layer][rows[r.position]]
            values, ids = z.topk(4)
            assert r.top_ids == tuple(ids.tolist())
            torch.testing.assert_close(torch.tensor(r.top_values), values, atol=1e-5, rtol=0)
            torch.testing.assert_close(torch.tensor(r.watch), z[[feature, 3]],
                                       atol=1e-5, rtol=0)
    assert not torch.equal(want[LAYERS[1]][2:5], clean_z[2:5])   # the edits changed the codes
    torch.testing.assert_close(want[LAYERS[1]][:2], clean_z[:2], atol=1e-6, rtol=0)


TRAINED = TrainingContext(prepend_bos=True, skip_bos=True, outlier_norm_ratio=10.0,
                          reference_norms=(5.0, 5.0))


def _outlier_acts() -> dict[int, torch.Tensor]:
    """Five tokens; token 3 has a massive norm at the second layer only (> 10 × 5.0)."""
    acts = tiny_acts(5)
    acts[LAYERS[1]][3] *= 60.0 / float(acts[LAYERS[1]][3].norm())
    return acts


@pytest.mark.parametrize("context, want", [
    (TRAINED, {LAYERS[0]: [1, 0, 0, 0, 0], LAYERS[1]: [1, 0, 0, 2, 0]}),
    (TrainingContext.unknown(), {LAYERS[0]: [1, 0, 0, 0, 0], LAYERS[1]: [1, 0, 0, 0, 0]}),
    (TrainingContext(False, False, 10.0, (5.0, 5.0)),      # trained on first positions
     {LAYERS[0]: [0, 0, 0, 0, 0], LAYERS[1]: [0, 0, 0, 2, 0]}),
])
def test_records_flag_positions_outside_the_training_distribution(
        context: TrainingContext, want: dict[int, list[int]]) -> None:
    resae, acts = tiny_resae(), _outlier_acts()
    monitor = Monitor(resae)
    monitor.context = context
    spec = MonitorSpec(LAYERS, top_k=2)
    monitor.register("a", spec)
    monitor.submit(_step(resae, acts, spec))
    got: dict[int, list[int]] = {layer: [] for layer in LAYERS}
    for r in monitor.take("a"):
        got[r.layer].append(r.out_of_distribution)
    assert got == want
    assert OutOfDistribution(want[LAYERS[1]][3]).name in ("NONE", "NORM_OUTLIER")


@pytest.mark.parametrize("include", [False, True])
def test_threshold_events_skip_out_of_distribution_positions_unless_asked(
        include: bool) -> None:
    resae, acts = tiny_resae(), _outlier_acts()
    monitor = Monitor(resae)
    monitor.context = TRAINED
    layer = LAYERS[1]
    spec = MonitorSpec((layer,), watch=(0,), thresholds=(Threshold(layer, 0, 0.0),),
                       include_out_of_distribution=include)   # 0.0: fires on every token
    monitor.register("a", spec)
    monitor.submit(_step(resae, acts, spec))
    records = monitor.take("a")
    fired = [r.position for r in records if r.events]
    assert fired == ([0, 1, 2, 3, 4] if include else [1, 2, 4])
    assert [r.out_of_distribution for r in records] == [1, 0, 0, 2, 0]   # reported either way
    assert all(len(r.watch) == 1 for r in records)
    back = SteeringSpec.from_extra_args(SteeringSpec(monitor=spec).to_extra_args())
    assert back is not None and back.monitor.include_out_of_distribution == include


@pytest.mark.parametrize("include", [False, True])
def test_guards_read_their_layer_beside_the_requests_own_monitor(include: bool) -> None:
    """A server-wide monitor (guard) at a layer the request does not monitor: its records
    carry the guard's values and events only (not reported to the caller), events skip
    out-of-distribution positions unless the guard includes them, and the request's own
    layer is reported as before."""
    resae, acts = tiny_resae(), _outlier_acts()
    with torch.no_grad():
        z = resae.encode_dense(acts)
    monitor = Monitor(resae)
    monitor.context = TRAINED
    guard = Guard("g", LAYERS[1], 3, 0.0, "record", include)       # 0.0: fires everywhere
    own = MonitorSpec((LAYERS[0],), top_k=2)
    spec = SteeringSpec(monitor=own, key="a", guards=(guard,))
    monitor.register("a", own, spec.guards)
    step, _ = _op_step(resae, {"a": spec}, [5], acts)
    monitor.submit(step)
    records = monitor.take("a")
    mine = [r for r in records if r.layer == LAYERS[0]]
    guarded = [r for r in records if r.layer == LAYERS[1]]
    assert [r.position for r in mine] == [0, 1, 2, 3, 4] and all(r.client for r in mine)
    assert all(len(r.top_ids) == 2 and r.guard_values == () and not r.events for r in mine)
    assert [r.position for r in guarded] == [0, 1, 2, 3, 4]
    for p, r in enumerate(guarded):
        assert not r.client and r.top_ids == () and r.watch == ()
        assert r.guard_values == (pytest.approx(z[LAYERS[1]][p, 3].item(), abs=1e-5),)
    fired = [r.position for r in guarded if r.events]
    assert fired == ([0, 1, 2, 3, 4] if include else [1, 2, 4])
    assert all(e.monitor == "g" and e.threshold == 0.0 for r in guarded for e in r.events)
