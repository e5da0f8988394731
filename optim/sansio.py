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
    banned: set[str]  # peers caught lying (SPSA's spot checks): nothing of theirs is taken
    numel: int  # length of the flat vectors in the state this algorithm serves

    def can_step(self) -> bool: ...

    def on_local_step(self, now: float) -> dict[str, float]: ...

    def on_message(self, sender: str, msg: Any, now: float) -> None: ...

    def on_peers(self, peers: frozenset[str], now: float) -> None: ...

    def outbox(self) -> list[Send]: ...

    def next_deadline(self) -> float | None: ...

    def on_timer(self, now: float) -> None: ...

    def evaluate(self) -> float: ...

    def stats(self) -> dict[str, Any]: ...

    # -- the state contract: everything a driver or a joiner's catch-up needs, so that no
    # driver ever asks which algorithm it holds.

    # True if honest replicas are bit-identical at every published mark (SPSA): a joiner
    # then takes a state that several peers vouch for by fingerprint. False (NoLoCo,
    # DiLoCo): replicas differ, and a joiner combines several donors' states (``combine``).
    identical_replicas: bool
    # True if a member still downloading the state counts as a peer (SPSA waits for its
    # records, which keep it within finality); False: it hears, but no group waits for it.
    waits_for_syncing: bool

    def position(self) -> int:
        """How far this replica has come, in local steps: the same number on every peer of
        a swarm that is in step, so a joiner can tell it is behind."""
        ...

    def behind(self, other: int) -> bool:
        """Is a peer at position ``other`` too far ahead for us to take part without its
        state?"""
        ...

    def mark(self) -> tuple[int, str] | None:
        """(tag, fingerprint) of a state every honest replica holds alike, when one is new
        enough to publish; None for algorithms whose replicas differ."""
        ...

    def served_tag(self) -> int | None:
        """The tag (final step or round) of the state we offer joiners now; None: none."""
        ...

    def served_state(self) -> Any:
        """A copy of the state at ``served_tag()`` (protocols/state.py has its bytes)."""
        ...

    # True if a served state needs the donors' log on top (SPSA's records since its step).
    has_log: bool

    def served_mark(self, state: Any) -> str | None:
        """The fingerprint a served state has, to compare with the marks its donors
        published (None where replicas differ)."""
        ...

    def log_since(self, tag: int) -> Any:
        """What a joiner replays on top of a served state of ``tag`` (SPSA: the records
        since), or None if the served state is complete by itself."""
        ...

    def check_served(self, state: Any) -> Any:
        """``state`` if it is a served state of ours (type and size), else ``Rejected``."""
        ...

    def join_state(self, served: Any, log: Any) -> Any:
        """The state to ``import_state`` from a served state and the donors' logs
        (``Rejected`` if they do not fit together)."""
        ...

    def combine(self, states: list[Any]) -> Any:
        """One served state from several donors' differing copies of one tag (only called
        when ``identical_replicas`` is false): robust to a minority of liars."""
        ...

    def export_state(self) -> Any:
        """Everything a joiner needs, as one object (a donor's whole state)."""
        ...

    def import_state(self, state: Any) -> None:
        """Adopt a donor's state; ``Rejected`` (and nothing changed) if it does not fit."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """A checkpoint: the exported state plus what no donor hands over (inner optimizer,
        position inside a round), so that a restart resumes exactly."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def to_model(self) -> None:
        """Make the model's weights this replica's current parameters (SPSA's model holds a
        perturbed scratch copy between steps; a deferred inner engine settles): for a
        driver that hands the model to user code between steps (node/api.py)."""
        ...

    def warm_up(self) -> None:
        """Pay one-time costs (kernel compilation) before the swarm waits on us."""
        ...


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
        self.banned: set[str] = set()  # peers caught lying: nothing of theirs is taken

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
