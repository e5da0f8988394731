"""What a node serves joiners: its served states and its answers to their requests.

The states are copied on the algorithm's thread when a new one is due (the driver's
``act``), then serialized and indexed once on another thread (protocols/serving.py holds
them); a request never makes either. Logs and whole states come from the algorithm, on
its thread; with signing on, logs are the sealed records we hold (node/sealing.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from byteswarm.optim.sansio import Algorithm, Rejected
from byteswarm.protocols import state as P
from byteswarm.protocols.serving import ServedStore, encode

from .sealing import Sealer


class Donor:
    def __init__(self, algo: Algorithm, act: Callable[..., Awaitable[Any]],
                 sealer: Callable[[], Sealer | None]):
        self.algo, self.act, self.sealer = algo, act, sealer
        self.store = ServedStore()
        self.tasks: set[asyncio.Task] = set()

    def offer(self, tag: int, state: Any) -> None:
        """A copy of a new served state: keep its bytes and index, made off this loop."""
        if not self.store.wants(tag):
            return
        self.store.pending.add(tag)

        async def go() -> None:
            made = await asyncio.get_running_loop().run_in_executor(None, encode, tag, state)
            self.store.put(tag, *made)
        task = asyncio.ensure_future(go())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def serve_state(self, request: bytes) -> bytes:
        """Our whole state (a young swarm's fallback)."""
        if P.parse_request(request)[0] != "state":
            raise Rejected("bad_request", "not a state request")
        state = await self.act(self.algo.export_state)
        return await asyncio.get_running_loop().run_in_executor(None, P.pack_state, state)

    async def serve_snap(self, request: bytes) -> bytes:
        """An index or a chunk of a state we serve, or the record log since one (b""
        where the algorithm has none)."""
        op, tag, index = P.parse_request(request)
        if op == "state":
            raise Rejected("bad_request", "whole states come from the state service")
        if op != "log":
            return self.store.answer(op, tag, index)
        log = await self.act(self.algo.log_since, tag)
        if log is None:
            return b""
        sealer = self.sealer()
        if sealer is not None:
            return sealer.log_blob(log)
        return await asyncio.get_running_loop().run_in_executor(None, P.pack_log, log)
