"""Signed messages on a node: every frame sealed by its author, SPSA logs as sealed records.

Theory of operation
-------------------
libp2p already proves who is at the other end of a stream, so a direct message needs no
signature to be attributed. A public swarm signs anyway (``Sealer``, on for ``swarm
create`` and ``join``, ``--sign`` for a plain node) for what travels further than one hop:
the record log a donor serves a joiner. Without signatures that log is the donor's word; with
them every record in it carries its author's Ed25519 signature (protocols/signing.py), so
a donor can leave records out but cannot invent or alter one, and a joiner may take the
records from anyone.

Sending: ``seal`` wraps ``wire.encode``'s bytes in an envelope signed by our identity key
(the key behind our libp2p peer id). Receiving: ``open`` checks the envelope, the
signature and that the signer is the stream's peer (and, for an SPSA record, the peer the
record names) before the message is decoded; an unsigned or badly signed frame is refused
with its reason (``bad_signature``, ``wrong_signer``, ``malformed``, …).

The log. Each sealed SPSA record we send or accept is kept, keyed by (step, author), while
its step lies within ``[low, high]`` (the driver passes our position minus the SPSA
history, and plus a margin), so a member cannot fill our memory with records for far
steps; ``log_blob`` serves the kept envelopes of the records the algorithm holds since a
step, and ``parse_log`` opens a donor's, checking each, and leaves out the records of
authors the swarm does not admit or has banned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from byteswarm.optim.sansio import Rejected
from byteswarm.optim.spsa import Record, RecordLog
from byteswarm.protocols import signing, wire
from byteswarm.protocols import state as P
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

MAX_KEPT = 1 << 18  # sealed records kept at most, whatever the window
PRUNE_EVERY = 16  # steps the window's low end moves between prunes


class Sealer:
    def __init__(self, key: Ed25519PrivateKey, swarm: str, ctx: wire.Context, *,
                 may_author: Callable[[str], bool] = lambda peer: True):
        """``may_author(peer)``: may a record of ``peer`` be taken from a donor's log (the
        driver says: admitted, and not banned)."""
        self.key, self.swarm, self.ctx = key, swarm, ctx
        self.kept: dict[tuple[int, str], bytes] = {}
        self.floor = 0  # where the last prune cut
        self.equivocations = 0  # authors caught signing two records for one step
        self.log_records = 0  # records taken from donors' sealed logs, signatures checked
        self.refused_authors = 0  # records of authors not admitted or banned, left out
        self.may_author = may_author

    def seal(self, msg: Any) -> bytes:
        return signing.seal(wire.encode(msg, swarm=self.swarm), swarm=self.swarm, key=self.key)

    def open(self, data: bytes, sender: str) -> Any:
        """The message ``sender`` signed, or Rejected with the reason."""
        return signing.open_signed(data, swarm=self.swarm, ctx=self.ctx, expect=sender)[1]

    def keep(self, msg: Any, data: bytes, low: int, high: int) -> None:
        """Remember a sealed SPSA record whose step is in [low, high]; forget older ones."""
        if not isinstance(msg, Record):
            return
        if len(self.kept) >= MAX_KEPT or low >= self.floor + PRUNE_EVERY:
            self.kept = {k: v for k, v in self.kept.items() if k[0] >= low}
            self.floor = low
        if low <= msg.step <= high and len(self.kept) < MAX_KEPT:
            self.kept.setdefault((msg.step, msg.peer), data)

    def log_blob(self, log: RecordLog) -> bytes:
        """The envelopes of the records in ``log`` (the algorithm's) that we hold as signed."""
        sealed = [self.kept[t, p] for t in sorted(log.records) for p in sorted(log.records[t])
                  if (t, p) in self.kept]
        return P.pack_sealed_log(log.closed, sealed)

    def parse_log(self, data: bytes, step: int) -> RecordLog:
        """A donor's sealed records after ``step``, each signature checked. Records of
        authors ``may_author`` refuses (not admitted, or banned) are left out and counted:
        a donor's log brings back nobody the swarm has shut out."""
        closed, sealed = P.parse_sealed_log(data, step)
        records: dict[int, dict[str, int]] = {}
        for env in sealed:
            signer, rec = signing.open_signed(env, swarm=self.swarm, ctx=self.ctx)
            if not isinstance(rec, Record) or rec.step <= step:
                raise Rejected("bad_state", "sealed log holds something else than records "
                                            "after its snapshot")
            if not self.may_author(signer):
                self.refused_authors += 1
                continue
            self.kept.setdefault((rec.step, signer), env)
            if records.setdefault(rec.step, {}).setdefault(signer, rec.q) != rec.q:
                self.equivocations += 1
        self.log_records += len(sealed)
        return RecordLog(closed, records)

    def stats(self) -> dict[str, int]:
        return {"kept": len(self.kept), "log_records": self.log_records,
                "equivocations": self.equivocations, "refused_authors": self.refused_authors}
