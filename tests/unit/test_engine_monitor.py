"""The worker's monitor against ``ReSAE.encode_dense``: top-k, watch, thresholds, recompute."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resae_serve.engine.monitor import Monitor, StepCapture
from resae_serve.engine.spec import MonitorSpec, Threshold
from tests.unit.resae_fixtures import LAYERS, tiny_acts, tiny_resae


def _step(acts: dict[int, torch.Tensor]) -> StepCapture:
    n = len(acts[LAYERS[0]])
    idx = np.arange(n)
    return StepCapture(keys=["a"], counts=np.array([n]), starts=np.array([0]),
                       layers={i: (idx, acts[layer].clone()) for i, layer in enumerate(LAYERS)})


@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])   # sparse and dense paths
def test_records_match_resae_encode_and_raise_threshold_events(architecture: str) -> None:
    resae, acts = tiny_resae("resae", architecture), tiny_acts(5)
    z = resae.encode_dense(acts)[LAYERS[1]]                                   # (5, d_sae)
    feature = int(z[2].argmax())
    threshold = float(z[2, feature])
    monitor = Monitor(resae)
    monitor.register("a", MonitorSpec((LAYERS[1],), top_k=3, watch=(feature,),
                                      thresholds=(Threshold(LAYERS[1], feature, threshold),)))
    monitor.submit(_step(acts))
    records = monitor.take("a")
    assert [(r["position"], r["layer"]) for r in records] == [(p, LAYERS[1]) for p in range(5)]
    for p, r in enumerate(records):
        values, ids = z[p].topk(3)
        assert r["top_k"][0] == ids.tolist()
        torch.testing.assert_close(torch.tensor(r["top_k"][1]), values, atol=1e-6, rtol=0)
        assert r["watch"] == [z[p, feature].item()]
        fired = z[p, feature].item() >= threshold
        assert ("events" in r) == fired
        if fired:
            assert r["events"] == [[feature, z[p, feature].item(), threshold]]


def test_recomputed_positions_are_counted_and_kept_once() -> None:
    resae, acts = tiny_resae(), tiny_acts(4)
    monitor = Monitor(resae)
    monitor.register("a", MonitorSpec((LAYERS[0],), top_k=1))
    monitor.submit(_step(acts))
    monitor.submit(_step(acts))           # the same positions again, as after a preemption
    records = monitor.take("a")
    assert monitor.recomputed == 4 and [r["position"] for r in records] == [0, 1, 2, 3]
    monitor.finish("a")
    monitor.flush()
    assert "a" not in monitor.specs


def test_a_reused_key_is_monitored_again_after_finish() -> None:
    resae, acts = tiny_resae(), tiny_acts(3)
    monitor = Monitor(resae)
    monitor.register("a", MonitorSpec((LAYERS[0],), top_k=1))
    monitor.submit(_step(acts))
    monitor.finish("a")                   # the request left; the next one has the same key
    monitor.register("a", MonitorSpec((LAYERS[0],), top_k=1))
    monitor.submit(_step(acts))
    assert len(monitor.take("a")) == 3 and monitor.recomputed == 0


@pytest.mark.parametrize("finished_first", [False, True])
def test_a_discarded_request_leaves_nothing_in_the_store(finished_first: bool) -> None:
    """An aborted request's results are dropped, also those of steps encoded after the
    discard and before the engine let the request go (or after, if it already had)."""
    resae, acts = tiny_resae(), tiny_acts(3)
    monitor = Monitor(resae)
    monitor.register("a", MonitorSpec((LAYERS[0],), top_k=1))
    monitor.submit(_step(acts))
    if finished_first:
        monitor.finish("a")
        monitor.discard("a")
    else:
        monitor.discard("a")
        monitor.submit(_step(acts))       # still in the engine: one more step arrives
        monitor.flush()
        monitor.finish("a")
    monitor.flush()
    assert monitor.stored_keys == 0 and monitor.take("a") == []
