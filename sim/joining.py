"""Joiners in the simulator: every catch-up is protocols/catchup.py over the virtual network.

Theory of operation
-------------------
A peer that joins a swarm that is already ahead of it runs the machine the node runs:
its view is every live peer ahead of it (with the marks each published), its requests
travel as messages through the network model to the donors, whose answers come from
their own stores through protocols/serving.py (each peer keeps its served states and
marks as a node does: ``publish`` after every call into its algorithm), and the answers
travel back at the donors' uplinks. Catch-up time and bytes are therefore the protocol's,
with the network's contention, latency and loss, not a formula.

Hostile donors (a scenario's ``[hostile]`` table): ``sybils`` extra identities that never
train but stand in every joiner's view claiming far more progress than anyone, vouch
for one poisoned state (an honest donor's latest, every weight shifted by ``offset``, at
a later tag, with its own correct fingerprint) and serve it. A joiner that takes it is
counted as ``poisoned`` in the summary; what the machine refused is counted as blame.

Sizes. ``scale`` multiplies the bytes of state replies (chunks, whole states): the
analytic mode trains stand-in models and charges the configured model's size.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from byteswarm.optim.config import opt
from byteswarm.optim.sansio import Rejected
from byteswarm.optim.spsa import RecordLog
from byteswarm.protocols import catchup as C
from byteswarm.protocols import serving
from byteswarm.protocols import state as P

from .network import Link

if TYPE_CHECKING:  # the engine calls us; we read and feed its peers
    from .engine import PeerState, Simulation

HEADER = 8  # a frame's length prefix, as the node's streams carry it
MARKS_KEPT = 16  # marks a peer publishes (its latest)
CLAIM = 10**9  # how far ahead of everyone a Sybil claims to be


@dataclass(frozen=True, kw_only=True)
class Hostile:
    sybils: int = opt(0, "identities that vouch for one poisoned state and serve it to "
                      "joiners (they never train)", lo=0, hi=1024)
    offset: float = opt(1.0, "how far every weight of the poisoned state is moved", lo=0.0,
                        lo_open=True)
    up_mbps: float = opt(100.0, "each Sybil's uplink, megabits per second", lo=0.0,
                         lo_open=True)
    down_mbps: float = opt(100.0, "each Sybil's downlink, megabits per second", lo=0.0,
                           lo_open=True)


@dataclass(frozen=True)
class Ask:
    """A joiner's request, in flight to a donor."""

    joiner: str
    request: C.Request


@dataclass(frozen=True)
class Answer:
    """A donor's reply, in flight back to the joiner."""

    rid: int
    data: bytes


class Joins:
    """Catch-ups of one simulated run (the engine's ``joins``)."""

    def __init__(self, cfg: C.CatchUpConfig | None = None, *, hostile: Hostile | None = None,
                 scale: float = 1.0):
        self.cfg = cfg or C.CatchUpConfig()
        self.hostile = hostile if hostile is not None and hostile.sybils else None
        self.scale = scale
        self.sybils: list[str] = []
        self.poison: serving.ServedStore | None = None
        self.poison_marks: dict[int, str] = {}
        self.poison_tag = -1
        self.done: list[dict[str, Any]] = []
        self.bytes: dict[str, int] = {}  # joiner -> state bytes received

    # -- what every peer publishes
    def publish(self, st: PeerState) -> None:
        st.store.take(st.algo)
        mark = st.algo.mark()
        if mark is not None and mark[0] not in st.marks:
            st.marks[mark[0]] = mark[1]
            for old in sorted(st.marks)[:-MARKS_KEPT]:
                del st.marks[old]

    def _published(self, st: PeerState) -> dict[int, str]:
        """Its heartbeat's marks (the node's publish its latest and those of the states
        it serves; the simulator keeps the latest ``MARKS_KEPT``, which covers both)."""
        return dict(st.marks)

    # -- a joiner's catch-up
    def start(self, sim: Simulation, peer: str) -> bool:
        """Start ``peer``'s catch-up if anyone is ahead of it; False: it starts as it is."""
        st = sim.peers[peer]
        view = {p: C.Candidate(sim.peers[p].algo.position(), self._published(sim.peers[p]))
                for p in sim.alive() if st.algo.behind(sim.peers[p].algo.position())}
        if not view:
            return False
        if self.hostile is not None:
            view.update(self._sybils(sim, view))
        st.catchup = C.CatchUp(self.cfg, algo=st.algo, numel=st.algo.numel,
                               seed=sim.rng.randrange(1 << 32))
        st.catchup_started = sim.now
        self.bytes[peer] = 0
        st.catchup.on_view(view, sim.now)
        self.pump(sim, peer)
        return True

    def handles(self, payload: Any) -> bool:
        return isinstance(payload, (Ask, Answer))

    def pump(self, sim: Simulation, peer: str) -> None:
        """Carry the machine's requests, re-arm its timer, or finish."""
        st = sim.peers[peer]
        m = st.catchup
        for r in m.requests():
            sim.net.send(peer, r.peer, HEADER + len(r.data), Ask(peer, r), sim.now)
        if m.done:
            self._finish(sim, peer)
            return
        st.timer_version += 1
        due = m.next_deadline()
        if due is not None:
            sim.push_event(max(due, sim.now), "catchup_timer", peer, st.timer_version)

    def deliver(self, sim: Simulation, d: Any) -> None:
        if isinstance(d.payload, Ask):
            reply = self._answer(sim, d.dst, d.payload.request)
            if reply is not None:
                size = len(reply)
                if P.parse_request(d.payload.request.data)[0] in ("chunk", "state"):
                    size = int(size * self.scale)
                sim.net.send(d.dst, d.payload.joiner, HEADER + size,
                             Answer(d.payload.request.id, reply), sim.now)
            return
        st = sim.peers[d.dst]
        if st.catchup is None:
            return  # it left, or gave up on this request
        self.bytes[d.dst] = self.bytes.get(d.dst, 0) + d.size
        st.catchup.on_reply(d.payload.rid, d.payload.data, sim.now)
        self.pump(sim, d.dst)

    def _answer(self, sim: Simulation, donor: str, r: C.Request) -> bytes | None:
        """A donor's reply, or None if it is gone or refuses (the joiner times out)."""
        if donor in self.sybils:
            op, tag, index = P.parse_request(r.data)
            if op == "log":
                return P.pack_log(RecordLog(tag, {}))
            if self.poison is None or op == "state":
                return P.pack_indexes([]) if op == "indexes" else None
            return self.poison.answer(op, tag, index)
        st = sim.peers.get(donor)
        if st is None or not st.alive:
            return None
        try:
            return serving.serve(st.store, st.algo, r.data)
        except Rejected:
            return None

    def _finish(self, sim: Simulation, peer: str) -> None:
        st = sim.peers[peer]
        m, st.catchup = st.catchup, None
        outcome = m.reason if m.phase == C.FAILED else "done"
        if m.phase == C.DONE:
            try:
                st.algo.import_state(m.result)
            except Rejected as e:
                outcome = e.reason
        poisoned = outcome == "done" and bool(m.served_by & set(self.sybils))
        self.done.append({"peer": peer, "outcome": outcome, "poisoned": poisoned,
                          "seconds": sim.now - st.catchup_started,
                          "bytes": self.bytes.pop(peer, 0), "how": m.how,
                          "refused": sum(m.blame.values()),
                          "refused_sybils": sum(m.blame[s] for s in self.sybils)})
        sim.finish_join(peer, st.algo.position() if outcome == "done" else 0)

    # -- hostile donors
    def _sybils(self, sim: Simulation, view: dict[str, C.Candidate]) -> dict[str, C.Candidate]:
        """The Sybils' claims: far ahead, vouching for the poisoned state (made once, from
        the latest state an honest donor serves)."""
        h = self.hostile
        if not self.sybils:
            self.sybils = [f"sybil{i:03d}" for i in range(h.sybils)]
            for s in self.sybils:
                sim.net.add_peer(s, Link(up=h.up_mbps * 1e6 / 8, down=h.down_mbps * 1e6 / 8))
        honest = [sim.peers[p] for p in sorted(view)]
        tag = max((t for st in honest for t in st.store.blobs), default=None)
        if tag is not None and tag + 1 > self.poison_tag:
            donor = next(st for st in honest if tag in st.store.blobs)
            state = P.parse_served(donor.store.blobs[tag], donor.algo.numel)
            for name in ("theta", "phi"):  # the weights, whichever the state holds
                if hasattr(state, name):
                    getattr(state, name).add_(h.offset)
            if hasattr(state, "step"):
                state.step = tag + 1
            else:
                state.round = tag + 1
            self.poison_tag = tag + 1
            self.poison = serving.ServedStore()
            self.poison.put(tag + 1, *serving.encode(tag + 1, state))
            fp = donor.algo.served_mark(state)
            self.poison_marks = {} if fp is None else {tag + 1: fp}
        claim = max(c.progress for c in view.values()) + CLAIM
        return {s: C.Candidate(claim, dict(self.poison_marks)) for s in self.sybils}

    # -- the run's numbers
    def summary(self) -> dict[str, Any]:
        ok = [d for d in self.done if d["outcome"] == "done"]
        mean = lambda key, rows: round(statistics.fmean(d[key] for d in rows), 3) \
            if rows else None
        return {"joins": len(self.done), "caught_up": len(ok),
                "failed": len(self.done) - len(ok),
                "poisoned": sum(d["poisoned"] for d in self.done),
                "seconds_mean": mean("seconds", ok), "bytes_mean": mean("bytes", ok),
                "refused": sum(d["refused"] for d in self.done),
                "refused_from_sybils": sum(d["refused_sybils"] for d in self.done),
                "sybils": len(self.sybils) if self.hostile else 0,
                "each": self.done}
