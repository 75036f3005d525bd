"""Admission control for distinct steering configs (front end side).

The worker has ``2 · max_configs + 1`` table rows (a prompt row and a generation row per
config; row 0 = none). :class:`ConfigAdmission` lets at most ``max_configs`` distinct steering
contents be in flight: requests with a config already resident join it at once, a request with
a new config waits (FIFO) until one is released instead of failing. Unsteered requests never
wait. Release when the request finishes or is aborted.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from resae_serve.engine.spec import SteeringSpec


class ConfigAdmission:
    """Counts requests per steering content hash; caps the number of distinct hashes."""

    def __init__(self, max_configs: int) -> None:
        if max_configs < 1:
            raise ValueError(f"max_configs={max_configs}; must be at least 1")
        self.max_configs = max_configs
        self._refs: OrderedDict[str, int] = OrderedDict()
        self._changed = asyncio.Condition()
        self.waited = 0

    @property
    def resident(self) -> int:
        return len(self._refs)

    async def acquire(self, spec: SteeringSpec | None) -> str | None:
        """Wait until ``spec``'s config can be resident; returns the handle for :meth:`release`."""
        if spec is None or not spec.steers:
            return None
        key = spec.content_hash()
        async with self._changed:
            if key not in self._refs and len(self._refs) >= self.max_configs:
                self.waited += 1
                await self._changed.wait_for(
                    lambda: key in self._refs or len(self._refs) < self.max_configs)
            self._refs[key] = self._refs.get(key, 0) + 1
        return key

    async def release(self, handle: str | None) -> None:
        if handle is None:
            return
        async with self._changed:
            self._refs[handle] -= 1
            if self._refs[handle] == 0:
                del self._refs[handle]
                self._changed.notify_all()
