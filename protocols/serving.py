"""A donor's side of catch-up: the states it keeps for joiners, and its answers.

Every peer keeps its latest ``KEEP`` served states (SPSA: snapshots at every
``SERVE_EVERY``-th final step; NoLoCo/DiLoCo: the outer state of each round) as bytes with
their index (protocols/state.py), made once per state: serializing and hashing are a
memory pass each, so a request never causes either, and the node makes them on a thread
that is not the training thread. ``answer`` turns a joiner's request into the reply bytes;
the node and the simulator both call it, so they serve alike.
"""

from __future__ import annotations

from typing import Any

from byteswarm.optim.sansio import Algorithm, Rejected
from byteswarm.optim.spsa import SERVED_KEPT

from . import state as P

KEEP = SERVED_KEPT  # served states kept (heartbeats are seconds old when a joiner asks)


def encode(tag: int, state: Any) -> tuple[bytes, bytes]:
    """A served state's bytes and their index: the memory passes made once per state."""
    blob = P.pack_served(state)
    return blob, P.make_index(tag, blob)


class ServedStore:
    """Served states at the latest ``KEEP`` tags, as bytes with their index."""

    def __init__(self) -> None:
        self.blobs: dict[int, bytes] = {}
        self.indexes: dict[int, bytes] = {}
        self.pending: set[int] = set()  # tags being serialized

    def wants(self, tag: int | None) -> bool:
        """Is ``tag`` a state we do not hold yet (nor are making)?"""
        return (tag is not None and tag not in self.blobs and tag not in self.pending
                and (not self.blobs or tag > min(self.blobs)))

    def put(self, tag: int, blob: bytes, index: bytes) -> None:
        """Keep a state's bytes and index (``encode``'s)."""
        self.blobs[tag] = blob
        self.indexes[tag] = index
        self.pending.discard(tag)
        for old in sorted(self.blobs)[:-KEEP]:
            del self.blobs[old], self.indexes[old]

    def take(self, algo: Algorithm) -> None:
        """Keep the algorithm's served state now, if it is new (the simulator's way: the
        node does the same, with the bytes made on another thread)."""
        tag = algo.served_tag()
        if self.wants(tag):
            self.put(tag, *encode(tag, algo.served_state()))

    def answer(self, op: str, tag: int, index: int) -> bytes:
        """The reply to a request about served states; b"" if we do not hold it."""
        if op == "indexes":
            return P.pack_indexes([self.indexes[t] for t in sorted(self.indexes)])
        if op == "latest":
            tag = max(self.blobs, default=-1)
        blob = self.blobs.get(tag)
        if blob is None:
            return b""
        if op in ("index", "latest"):
            return self.indexes[tag]
        if op == "chunk":
            return blob[index * P.CHUNK:(index + 1) * P.CHUNK]
        raise RuntimeError(f"answer() does not serve {op!r}")  # our bug: see serve()


def serve(store: ServedStore, algo: Algorithm, request: bytes,
          pack_log: Any = P.pack_log) -> bytes:
    """The whole answer to a joiner's request (``Rejected`` for junk). ``pack_log`` turns
    a record log into bytes (a signing node serves sealed records instead)."""
    op, tag, index = P.parse_request(request)
    if op == "state":
        return P.pack_state(algo.export_state())
    if op == "log":
        log = algo.log_since(tag)
        return b"" if log is None else pack_log(log)
    if op not in ("index", "chunk", "latest", "indexes"):
        raise Rejected("bad_request", op)
    return store.answer(op, tag, index)
