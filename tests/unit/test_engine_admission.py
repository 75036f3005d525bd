"""Admission control: distinct configs wait instead of failing; identical ones share."""

from __future__ import annotations

import asyncio

from resae_serve.engine.admission import ConfigAdmission
from resae_serve.engine.spec import SteerEdit, SteeringSpec


def _spec(feature: int) -> SteeringSpec:
    return SteeringSpec(edits=(SteerEdit(1, feature, "add", 1.0),))


def test_distinct_configs_wait_and_identical_share() -> None:
    async def scenario() -> None:
        gate = ConfigAdmission(max_configs=2)
        a = await gate.acquire(_spec(1))
        b = await gate.acquire(_spec(2))
        a2 = await asyncio.wait_for(gate.acquire(_spec(1)), 1)   # same config: no wait
        assert await gate.acquire(None) is None                  # unsteered: never waits
        waiting = asyncio.create_task(gate.acquire(_spec(3)))
        await asyncio.sleep(0.01)
        assert not waiting.done() and gate.waited == 1
        await gate.release(a)
        await asyncio.sleep(0.01)
        assert not waiting.done()                                # config 1 still held by a2
        await gate.release(a2)
        c = await asyncio.wait_for(waiting, 1)
        assert gate.resident == 2
        await gate.release(b), await gate.release(c)
        assert gate.resident == 0

    asyncio.run(scenario())
