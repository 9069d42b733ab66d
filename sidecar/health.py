"""Honest health: SERVING only while the backend AND the session store can be used.

``HealthWatch`` follows the backend channel's connectivity (woken by its state
changes) and polls the session store's ``ping()`` every ``period_s``. It calls
``publish(up, backend_up, store_up)`` once at start and then on every change,
so the server can set gRPC health and the ``hashguard_backend_up`` /
``hashguard_store_up`` gauges.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import grpc

from .backend.base import Connectivity
from .state.sessions import SessionStore

log = logging.getLogger("hashguard.health")

Publish = Callable[[bool, bool, bool], Awaitable[None]]


class HealthWatch:
    def __init__(self, channel: Connectivity, store: SessionStore, publish: Publish, period_s: float = 0.5,
                 ping_timeout_s: float = 1.0) -> None:
        self.channel = channel
        self.store = store
        self.publish = publish
        self.period_s = period_s
        self.ping_timeout_s = ping_timeout_s
        self.backend_up: bool | None = None
        self.store_up: bool | None = None

    @property
    def up(self) -> bool:
        return bool(self.backend_up and self.store_up)

    async def store_reachable(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.store.ping(), self.ping_timeout_s))
        except Exception as exc:  # noqa: BLE001 - any failure to answer is "down"
            log.debug("store ping failed", extra={"error": f"{type(exc).__name__}: {exc}"})
            return False

    async def check(self) -> grpc.ChannelConnectivity:
        """One look at both; publishes on a change. Returns the channel state seen."""
        state = self.channel.get_state(try_to_connect=True)
        backend_up = state == grpc.ChannelConnectivity.READY
        store_up = await self.store_reachable()
        if (backend_up, store_up) != (self.backend_up, self.store_up):
            for name, old, new in (("backend", self.backend_up, backend_up), ("session store", self.store_up, store_up)):
                if old != new:
                    (log.info if new else log.warning)(f"{name} {'up' if new else 'down'}")
            self.backend_up, self.store_up = backend_up, store_up
            await self.publish(self.up, backend_up, store_up)
        return state

    async def run(self) -> None:
        while True:
            state = await self.check()
            try:
                await asyncio.wait_for(self.channel.wait_for_state_change(state), self.period_s)
            except asyncio.TimeoutError:
                pass
