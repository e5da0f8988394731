"""The discrete-event core: a virtual clock that drives sans-IO algorithm objects.

One heap of events, one network model. Each simulated peer owns a real algorithm object
(the same class the node runs) and a compute model. The loop pops the earliest event —
a local step finishing, a message arriving, a deadline firing, a peer joining or
leaving — feeds it to the peer's object, carries the object's outbox into the network,
re-arms its timer, and starts its next local step if it may. Training is real; only time
is virtual. Ties are broken by insertion order, so a run is a function of its seed.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from byteswarm.optim.sansio import EVERYONE, Algorithm
from byteswarm.protocols import catchup as C
from byteswarm.protocols.serving import ServedStore

from .joining import Joins
from .network import INF, Link, Network


@dataclass
class PeerSpec:
    """One simulated peer: its link, its compute speed and when it is present."""

    id: str
    link: Link
    region: str = ""
    step_seconds: float = 0.1  # virtual seconds per local step
    jitter: float = 0.0  # each step takes step_seconds · (1 ± jitter), uniform
    straggler_prob: float = 0.0  # chance per step to start a slow episode
    straggler_factor: float = 1.0  # how much slower an episode is
    straggler_steps: int = 0  # how long an episode lasts
    join_at: float = 0.0
    leave_at: float = INF
    leave_after_steps: int | None = None  # leave on reaching this many local steps
    # Hang on reaching this many steps: stop computing and sending, yet stay listed as a
    # member for ``hang_listed`` seconds (a process that froze; its DHT entry outlives it).
    hang_after_steps: int | None = None
    hang_listed: float = 30.0
    rejoin_after: float = 0.0  # seconds after leaving to come back (0: never)


@dataclass
class PeerState:
    spec: PeerSpec
    algo: Algorithm | None = None
    alive: bool = False
    hung: bool = False  # listed as a member, but does nothing (PeerSpec.hang_after_steps)
    busy: bool = False
    step_due: float = 0.0  # when the step in flight (if busy) lands
    steps: int = 0
    busy_seconds: float = 0.0
    present_since: float = 0.0
    present_seconds: float = 0.0
    slow_left: int = 0
    timer_version: int = 0
    step_losses: list[float] = field(default_factory=list)
    store: ServedStore = field(default_factory=ServedStore)  # what it serves joiners
    marks: dict[int, str] = field(default_factory=dict)  # its latest published marks
    catchup: C.CatchUp | None = None  # while it catches up with the swarm
    catchup_started: float = 0.0
    idle_since: float | None = None  # present, not computing, since then
    lost: dict[str, float] = field(default_factory=dict)  # idle seconds by LOST_REASONS


# Why a present peer was not computing: blocked until a message came ("waiting": for a
# partner, a straggler or bytes on a link), blocked until a deadline gave up on someone
# ("timeout"), or done with its steps while others still ran ("done").
LOST_REASONS = ("waiting", "timeout", "done")


@dataclass(frozen=True)
class Event:
    kind: str  # "step", "deliver", "timer", "join", "leave", "catchup_timer"
    peer: str
    data: Any = None


class Simulation:
    """Run peers to ``steps`` local steps each (or until ``max_seconds`` virtual time)."""

    def __init__(self, specs: list[PeerSpec], make_algo: Callable[[PeerSpec], Algorithm],
                 network: Network, *, size_of: Callable[[Any], int], steps: int,
                 seed: int = 0, max_seconds: float = INF,
                 joins: Joins | None = None,
                 on_step: Callable[[Simulation, str, dict], None] | None = None):
        self.net = network
        self.size_of = size_of
        self.make_algo = make_algo
        self.target = steps
        self.max_seconds = max_seconds
        self.joins = joins  # None: a returning peer starts from its own new object
        self.on_step = on_step
        self.rng = random.Random(seed)
        self.now = 0.0
        self.peers = {s.id: PeerState(s) for s in specs}
        self._heap: list[tuple[float, int, Event]] = []
        self._seq = 0
        self._joins_pending = 0
        self._deliveries = 0  # "deliver" events in the heap
        self._syncing: set[str] = set()  # joiners whose state download is in flight
        self.counts = {"messages": 0, "joins": 0, "leaves": 0}
        for s in specs:
            self._push(s.join_at, Event("join", s.id))
            if s.leave_at < INF:
                self._push(s.leave_at, Event("leave", s.id))

    # -- public
    def alive(self) -> list[str]:
        return sorted(p for p, st in self.peers.items() if st.alive)

    def step_committed(self, peer: str) -> bool:
        """Whether ``peer`` has a local step in flight that lands before the run stops
        (unless the peer leaves first): sim/batched.py may compute it early."""
        st = self.peers[peer]
        return st.alive and st.busy and st.step_due <= self.max_seconds

    def run(self) -> None:
        while True:
            t_heap = self._heap[0][0] if self._heap else INF
            t_net = self.net.next_event_time()
            t = min(t_heap, t_net)
            if t == INF or t > self.max_seconds or self._finished():
                break
            self.now = max(self.now, t)
            if t_net <= t_heap:
                for d in self.net.advance(t_net):
                    self._push(d.at, Event("deliver", d.dst, d))
                continue
            _, _, ev = heapq.heappop(self._heap)
            self._deliveries -= ev.kind == "deliver"
            getattr(self, f"_on_{ev.kind}")(ev)
        for st in self.peers.values():
            if st.alive and not st.hung:
                st.present_seconds += self.now - st.present_since
                st.present_since = self.now
                self._end_idle(st, "done" if st.steps >= self.target else "waiting")

    def working(self) -> list[PeerState]:
        """Peers present and not hung: those whose replicas mean something."""
        return [st for st in self.peers.values() if st.alive and not st.hung]

    def utilisation(self) -> dict[str, Any]:
        """Mean over present peers of the fraction of their present time spent computing,
        and of the time lost, by reason (``LOST_REASONS``)."""
        present = [st for st in self.peers.values() if st.present_seconds > 0]
        if not present:
            return {"utilisation": 0.0, "lost": dict.fromkeys(LOST_REASONS, 0.0)}
        def mean(f: Callable[[PeerState], float]) -> float:
            return round(sum(f(st) / st.present_seconds for st in present) / len(present), 4)
        return {"utilisation": mean(lambda st: min(st.busy_seconds, st.present_seconds)),
                "lost": {r: mean(lambda st, r=r: st.lost.get(r, 0.0)) for r in LOST_REASONS}}

    # -- events
    def _on_join(self, ev: Event) -> None:
        self._joins_pending -= 1
        st = self.peers[ev.peer]
        self.net.add_peer(ev.peer, st.spec.link, st.spec.region)
        st.algo = self.make_algo(st.spec)
        if self.joins is not None and self.joins.start(self, ev.peer):
            self.counts["joins"] += 1  # it catches up before it contributes
            self._syncing.add(ev.peer)
            return
        self._activate(ev.peer)

    def _activate(self, peer: str) -> None:
        st = self.peers[peer]
        st.alive = True
        st.present_since = self.now
        self._membership_changed()

    def _on_leave(self, ev: Event) -> None:
        st = self.peers[ev.peer]
        if st.catchup is not None:  # it leaves while still catching up
            st.catchup = None
            self._syncing.discard(ev.peer)
            self.net.remove_peer(ev.peer, self.now)
            return
        if not st.alive:
            return
        st.alive = False
        st.busy = False
        if not st.hung:
            self._end_idle(st, "waiting")
            st.present_seconds += self.now - st.present_since
        st.hung = False
        self.counts["leaves"] += 1
        self.net.remove_peer(ev.peer, self.now)
        self._syncing.discard(ev.peer)
        self._membership_changed()
        if st.spec.rejoin_after > 0:
            st.algo = None  # it comes back as a new process that must sync
            st.spec.leave_after_steps = None
            self._push(self.now + st.spec.rejoin_after, Event("join", ev.peer))

    def _on_step(self, ev: Event) -> None:
        st = self.peers[ev.peer]
        if not st.alive or st.hung:
            return
        st.busy = False
        st.busy_seconds += ev.data
        st.steps += 1
        info = st.algo.on_local_step(self.now)
        if "loss" in info:
            st.step_losses.append(info["loss"])
        if self.on_step is not None:
            self.on_step(self, ev.peer, info)
        self._after_feed(ev.peer)
        if st.steps == st.spec.leave_after_steps:
            self._on_leave(Event("leave", ev.peer))
        elif st.steps == st.spec.hang_after_steps:
            self._hang(st)

    def _hang(self, st: PeerState) -> None:
        st.hung, st.busy = True, False
        st.present_seconds += self.now - st.present_since
        self._push(self.now + st.spec.hang_listed, Event("leave", st.spec.id))

    def _on_deliver(self, ev: Event) -> None:
        d = ev.data
        if self.joins is not None and self.joins.handles(d.payload):
            self.joins.deliver(self, d)  # a catch-up's request or reply (a Sybil's too)
            return
        st = self.peers[ev.peer]
        if not st.alive or st.hung:
            return
        self.counts["messages"] += 1
        st.algo.on_message(d.src, d.payload, self.now)
        self._after_feed(ev.peer)

    def _on_catchup_timer(self, ev: Event) -> None:
        st = self.peers[ev.peer]
        if st.catchup is not None and ev.data == st.timer_version:
            st.catchup.on_timer(self.now)
            self.joins.pump(self, ev.peer)

    def finish_join(self, peer: str, steps: int) -> None:
        """A joiner's catch-up ended (sim/joining.py): it starts contributing."""
        self._syncing.discard(peer)
        self.peers[peer].steps = steps
        self._activate(peer)

    def _on_timer(self, ev: Event) -> None:
        st = self.peers[ev.peer]
        if not st.alive or st.hung or ev.data != st.timer_version:
            return
        st.algo.on_timer(self.now)
        self._after_feed(ev.peer, cause="timeout")

    # -- helpers
    def _after_feed(self, peer: str, cause: str = "waiting") -> None:
        """Flush the outbox, re-arm the timer, start the next step if allowed (``cause``:
        what to blame the idle time before it on)."""
        st = self.peers[peer]
        if self.joins is not None:
            self.joins.publish(st)  # what it serves joiners, and its marks
        for send in st.algo.outbox():
            size = self.size_of(send.msg)
            dests = [p for p in self.alive() if p != peer] if send.to == EVERYONE else [send.to]
            for dst in dests:
                self.net.send(peer, dst, size, send.msg, self.now)
        st.timer_version += 1
        deadline = st.algo.next_deadline()
        if deadline is not None:
            self._push(max(deadline, self.now), Event("timer", peer, st.timer_version))
        self._maybe_start(peer, cause)

    def _end_idle(self, st: PeerState, cause: str) -> None:
        if st.idle_since is not None:
            st.lost[cause] = st.lost.get(cause, 0.0) + self.now - st.idle_since
            st.idle_since = None

    def _maybe_start(self, peer: str, cause: str = "waiting") -> None:
        st = self.peers[peer]
        if not st.alive or st.busy or st.hung:
            return
        if st.steps >= self.target or not st.algo.can_step():
            if st.idle_since is None:
                st.idle_since = self.now
            return
        self._end_idle(st, cause)
        spec = st.spec
        dt = spec.step_seconds * (1 + spec.jitter * (2 * self.rng.random() - 1))
        if st.slow_left == 0 and spec.straggler_prob > 0 and \
                self.rng.random() < spec.straggler_prob:
            st.slow_left = spec.straggler_steps
        if st.slow_left > 0:
            st.slow_left -= 1
            dt *= spec.straggler_factor
        st.busy, st.step_due = True, self.now + dt
        self._push(st.step_due, Event("step", peer, dt))

    def _membership_changed(self) -> None:
        members = frozenset(self.alive())
        for p in members:
            if not self.peers[p].hung:
                self.peers[p].algo.on_peers(members, self.now)
        for p in sorted(members):
            if not self.peers[p].hung:
                self._after_feed(p)

    def _finished(self) -> bool:
        alive = self.working()
        if self._joins_pending or self._syncing or self.in_flight():
            return False
        return all(st.steps >= self.target for st in alive) and \
            all(st.algo.next_deadline() is None for st in alive)

    def push_event(self, at: float, kind: str, peer: str, data: Any = None) -> None:
        self._push(at, Event(kind, peer, data))

    def in_flight(self) -> bool:
        """Messages sent and not yet delivered: a run does not end on them (the last
        records of a step would otherwise split replicas that are merely not done)."""
        return self._deliveries > 0 or self.net.next_event_time() < INF

    def _push(self, at: float, ev: Event) -> None:
        self._joins_pending += ev.kind == "join"
        self._deliveries += ev.kind == "deliver"
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, ev))
