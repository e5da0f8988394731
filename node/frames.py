"""Messages to frames and back on a node: wire bytes (protocols/wire.py), sealed by their
author where the swarm signs (node/sealing.py), and the sender checked either way.

A frame's sender is the libp2p peer of its stream (authenticated by the transport). A
message that names another peer (an SPSA record carries its author) is refused as
``spoofed_peer``; a sealed one must be signed by the sender. The sealed SPSA records we
send and take are kept for the logs we serve joiners, within a window around our own
position (the others' is only what they claim), so nobody fills our memory with records
of far steps.
"""

from __future__ import annotations

from typing import Any

from byteswarm.optim.sansio import Rejected
from byteswarm.optim.spsa import HISTORY_STEPS
from byteswarm.protocols import wire

from .sealing import Sealer

SEALED_AHEAD = 64  # steps beyond our position whose sealed records we keep


class Frames:
    def __init__(self, swarm: str, ctx: wire.Context):
        self.swarm, self.ctx = swarm, ctx
        self.sealer: Sealer | None = None  # signing on: every frame sealed

    def encode(self, msg: Any, position: int) -> bytes:
        if self.sealer is None:
            return wire.encode(msg, swarm=self.swarm)
        data = self.sealer.seal(msg)
        self._keep(msg, data, position)
        return data

    def decode(self, data: bytes, sender: str, position: int) -> Any:
        """The message ``sender`` sent, or ``Rejected`` with the reason."""
        if self.sealer is not None:  # its signer must be the sender
            msg = self.sealer.open(data, sender)
            self._keep(msg, data, position)
            return msg
        msg = wire.decode(data, swarm=self.swarm, ctx=self.ctx)
        if getattr(msg, "peer", sender) != sender:  # e.g. another's SPSA record
            raise Rejected("spoofed_peer", f"{sender} sent {msg.peer}'s message")
        return msg

    def _keep(self, msg: Any, data: bytes, position: int) -> None:
        self.sealer.keep(msg, data, position - HISTORY_STEPS, position + SEALED_AHEAD)
