"""The shape every byteswarm algorithm has: an object you feed and drain, with no IO.

Theory of operation. A driver (the real node in ``node/``, or the simulator in ``sim/``)
owns the clock and the transport. It repeatedly:

1. asks ``can_step()`` and, if true, calls ``on_local_step(now)`` (real compute: the driver
   charges it wall or virtual time);
2. hands every arriving message to ``on_message(sender, msg, now)``;
3. drains ``outbox()`` and carries each ``Send`` (encoding to bytes is protocols/' job);
4. arms a timer for ``next_deadline()`` and calls ``on_timer(now)`` when it fires;
5. tells the object who is in the swarm with ``on_peers(peers, now)``.

Messages are plain frozen dataclasses defined beside each algorithm. Peer ids are strings
(a libp2p peer id in the node, ``"p007"`` in the simulator); ordering by id is canonical.

Two kinds of error, as in h11: a bug of ours raises; junk from a peer is counted in
``stats()`` under a reason and dropped, and the object goes on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

# A Send with ``to=EVERYONE`` goes to every other current peer.
EVERYONE = "*"


@dataclass(frozen=True)
class Send:
    to: str  # peer id, or EVERYONE
    msg: Any  # a message dataclass of the sending algorithm


class Rejected(Exception):
    """A peer's message is unusable; ``reason`` is a short stable key for counters."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Algorithm(Protocol):
    peer_id: str

    def can_step(self) -> bool: ...

    def on_local_step(self, now: float) -> dict[str, float]: ...

    def on_message(self, sender: str, msg: Any, now: float) -> None: ...

    def on_peers(self, peers: frozenset[str], now: float) -> None: ...

    def outbox(self) -> list[Send]: ...

    def next_deadline(self) -> float | None: ...

    def on_timer(self, now: float) -> None: ...

    def evaluate(self) -> float: ...

    def stats(self) -> dict[str, Any]: ...


class RejectCounter:
    """Counts dropped messages by reason; ``snapshot()`` is what stats() reports."""

    def __init__(self) -> None:
        self._by_reason: Counter[str] = Counter()

    def add(self, reason: str) -> None:
        self._by_reason[reason] += 1

    def snapshot(self) -> dict[str, int]:
        return dict(sorted(self._by_reason.items()))

    @property
    def total(self) -> int:
        return sum(self._by_reason.values())


class Mailbox:
    """The bookkeeping every algorithm object shares: who is in the swarm, what waits to be
    sent, the one pending deadline, and junk counted by reason.

    Subclasses implement ``_accept(sender, msg)`` (raise ``Rejected`` on junk) and
    ``_after_message(now)`` (what an accepted message may unblock)."""

    def _init_mailbox(self, peer_id: str, peers: frozenset[str]) -> None:
        self.peer_id = peer_id
        self.peers = frozenset(peers) | {peer_id}
        self.deadline: float | None = None
        self._out: list[Send] = []
        self.rejects = RejectCounter()

    def on_peers(self, peers: frozenset[str], now: float) -> None:
        self.peers = frozenset(peers) | {self.peer_id}

    def on_message(self, sender: str, msg: Any, now: float) -> None:
        try:
            self._accept(sender, msg)
        except Rejected as e:
            self.rejects.add(e.reason)
            return
        self._after_message(now)

    def outbox(self) -> list[Send]:
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float | None:
        return self.deadline

    def _accept(self, sender: str, msg: Any) -> None:
        raise NotImplementedError

    def _after_message(self, now: float) -> None:
        raise NotImplementedError


class PhaseTable:
    """Legal phase transitions, h11-style: ``move(a, b)`` raises on an illegal one."""

    def __init__(self, start: str, moves: dict[str, set[str]]):
        self.phase = start
        self._moves = moves

    def move(self, to: str) -> None:
        if to not in self._moves.get(self.phase, set()):
            raise RuntimeError(f"illegal phase change {self.phase} -> {to}")
        self.phase = to
