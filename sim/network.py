"""The network model: links with latency, shared uplinks and downlinks, loss.

A message from A to B is a *flow* of ``size`` bytes. While it is active its rate is

    rate = min(up[A] / flows_out[A], down[B] / flows_in[B])

that is, each peer's uplink and downlink are split evenly among its concurrent transfers
(processor sharing at both ends, the usual fluid approximation of TCP fairness). A rate
changes only when a flow starts or ends at one of its two endpoints, so an event touches
just the flows of those two peers. The last byte arrives one one-way latency after it is
sent, plus jitter. With probability ``loss`` an attempt fails and the whole message is sent
again after a retransmission timeout (a real transport would resend less; this errs on the
side of cost).

Time is virtual and passed in; the model never sleeps. Every random draw comes from a
seeded ``random.Random``, so a run is a function of its seed.

Fast path. Messages of at most ``fast_bytes`` (0, the default: none) skip flow sharing,
which costs O(flows at both endpoints) per event and so O(N³) for an N-peer all-to-all.
Each peer's uplink and downlink are instead FIFO queues that a message passes through
back to back (cut-through): it leaves the uplink after the messages queued before it,
reaches the receiver's downlink one latency later and cannot be delivered faster than
either link allows. One message on idle links arrives after latency + size / min(up,
down), exactly as a lone flow does; k messages through one link take k·size/rate, as k
shared flows do (same finish for the last, staggered rather than simultaneous for the
others). Fast messages and flows do not slow each other down. A lost attempt costs one
``rto`` (its bytes are not queued again). O(1) per message: what SPSA's per-step
broadcast of one-byte records needs at a thousand peers.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field
from typing import Any

INF = math.inf


@dataclass
class Link:
    """One peer's access link. Rates in bytes per second (INF: unlimited)."""

    up: float
    down: float
    latency: float = 0.0  # one-way seconds from this peer to the core
    jitter: float = 0.0  # extra uniform [0, jitter) seconds per message
    loss: float = 0.0  # probability that one attempt of a message is lost


@dataclass
class Flow:
    src: str
    dst: str
    size: int
    payload: Any
    sent_at: float
    remaining: float = 0.0
    rate: float = 0.0
    updated: float = 0.0
    version: int = 0
    attempts: int = 1
    done: bool = False


@dataclass
class Delivery:
    """A message that has fully arrived: hand ``payload`` to ``dst`` at ``at``."""

    at: float
    src: str
    dst: str
    payload: Any
    size: int
    attempts: int


@dataclass
class Network:
    links: dict[str, Link] = field(default_factory=dict)
    region_latency: dict[tuple[str, str], float] = field(default_factory=dict)
    region_of: dict[str, str] = field(default_factory=dict)
    rto: float = 1.0  # seconds before a lost attempt is retried
    seed: int = 0
    fast_bytes: float = 0  # messages up to this size take the FIFO fast path (0: none)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._out: dict[str, set[int]] = {}
        self._in: dict[str, set[int]] = {}
        self._flows: dict[int, Flow] = {}
        self._heap: list[tuple[float, int, int, int]] = []  # (finish, seq, flow id, version)
        self._pending_start: list[tuple[float, int, int]] = []  # retries: (at, seq, flow id)
        self._seq = 0
        self._next_id = 0
        self.bytes_sent: dict[str, int] = {}
        self.bytes_received: dict[str, int] = {}
        self._up_free: dict[str, float] = {}  # fast path: when each FIFO queue drains
        self._down_free: dict[str, float] = {}
        self._ready: list[Delivery] = []  # fast-path messages not yet handed out
        self._ready_since = INF  # the earliest send time among them

    # -- topology
    def add_peer(self, peer: str, link: Link, region: str = "") -> None:
        self.links[peer] = link
        self.region_of[peer] = region
        self._out.setdefault(peer, set())
        self._in.setdefault(peer, set())

    def remove_peer(self, peer: str, now: float) -> None:
        """A peer leaves: its transfers in both directions are dropped."""
        for fid in list(self._out.get(peer, ())) + list(self._in.get(peer, ())):
            self._finish(fid, now, deliver=False)
        for fid in [i for i, f in self._flows.items() if peer in (f.src, f.dst)]:
            del self._flows[fid]  # waiting to be retried
        self._ready = [d for d in self._ready if peer not in (d.src, d.dst)]
        self.links.pop(peer, None)

    def one_way_latency(self, a: str, b: str) -> float:
        ra, rb = self.region_of.get(a, ""), self.region_of.get(b, "")
        core = self.region_latency.get((ra, rb), self.region_latency.get((rb, ra), 0.0))
        return self.links[a].latency + core + self.links[b].latency

    # -- transfers
    def send(self, src: str, dst: str, size: int, payload: Any, now: float) -> None:
        if src not in self.links or dst not in self.links:
            return  # a peer that left neither sends nor receives
        if self.fast_bytes > 0 and size <= self.fast_bytes:
            self._send_fast(src, dst, size, payload, now)
            return
        fid = self._next_id
        self._next_id += 1
        self._flows[fid] = Flow(src, dst, size, payload, now, remaining=float(size), updated=now)
        self.bytes_sent[src] = self.bytes_sent.get(src, 0) + size
        self._start(fid, now)

    def next_event_time(self) -> float:
        self._drop_stale()
        t = self._heap[0][0] if self._heap else INF
        if self._ready:
            t = min(t, self._ready_since)
        if self._pending_start:
            t = min(t, self._pending_start[0][0])
        return t

    def advance(self, now: float) -> list[Delivery]:
        """Process every flow event up to ``now``; return messages fully sent by then
        (their ``at`` adds propagation latency, so it may lie after ``now``)."""
        out: list[Delivery] = []
        if self._ready and self._ready_since <= now:
            out, self._ready, self._ready_since = self._ready, [], INF
        while True:
            self._drop_stale()
            t_retry = self._pending_start[0][0] if self._pending_start else INF
            t_done = self._heap[0][0] if self._heap else INF
            if min(t_retry, t_done) > now:
                return out
            if t_retry <= t_done:
                at, _, fid = heapq.heappop(self._pending_start)
                if fid in self._flows:
                    self._start(fid, at)
                continue
            at, _, fid, _ = heapq.heappop(self._heap)
            flow = self._flows[fid]
            if flow.attempts <= 50 and self.rng.random() < self._loss(flow):
                self._finish(fid, at, deliver=False, keep=True)
                flow.attempts += 1
                flow.remaining = float(flow.size)
                self._seq += 1
                heapq.heappush(self._pending_start, (at + self.rto, self._seq, fid))
                continue
            arrive = at + self.one_way_latency(flow.src, flow.dst) + self._jitter(flow)
            self._finish(fid, at, deliver=True)
            self.bytes_received[flow.dst] = self.bytes_received.get(flow.dst, 0) + flow.size
            out.append(Delivery(arrive, flow.src, flow.dst, flow.payload, flow.size,
                                flow.attempts))

    # -- fast path (see the module docstring)
    def _send_fast(self, src: str, dst: str, size: int, payload: Any, now: float) -> None:
        up, down = self.links[src].up, self.links[dst].down
        latency = self.one_way_latency(src, dst)
        u0 = max(now, self._up_free.get(src, 0.0))  # leaves the uplink queue
        u1 = u0 + (size / up if up < INF else 0.0)
        self._up_free[src] = u1
        d0 = max(u0 + latency, self._down_free.get(dst, 0.0))  # reaches the downlink
        d1 = max(d0 + (size / down if down < INF else 0.0), u1 + latency)
        self._down_free[dst] = d1
        attempts, p = 1, 1 - (1 - self.links[src].loss) * (1 - self.links[dst].loss)
        while attempts <= 50 and p > 0 and self.rng.random() < p:
            attempts += 1
        j = self.links[src].jitter + self.links[dst].jitter
        at = d1 + (self.rng.random() * j if j > 0 else 0.0) + self.rto * (attempts - 1)
        self.bytes_sent[src] = self.bytes_sent.get(src, 0) + size
        self.bytes_received[dst] = self.bytes_received.get(dst, 0) + size
        self._ready.append(Delivery(at, src, dst, payload, size, attempts))
        self._ready_since = min(self._ready_since, now)

    # -- internals
    def _loss(self, flow: Flow) -> float:
        a, b = self.links[flow.src].loss, self.links[flow.dst].loss
        return 1 - (1 - a) * (1 - b)

    def _jitter(self, flow: Flow) -> float:
        j = self.links[flow.src].jitter + self.links[flow.dst].jitter
        return self.rng.random() * j if j > 0 else 0.0

    def _start(self, fid: int, now: float) -> None:
        f = self._flows[fid]
        f.updated = now
        self._out[f.src].add(fid)
        self._in[f.dst].add(fid)
        self._rerate(f.src, f.dst, now)

    def _finish(self, fid: int, now: float, *, deliver: bool, keep: bool = False) -> None:
        f = self._flows[fid]
        self._out.get(f.src, set()).discard(fid)
        self._in.get(f.dst, set()).discard(fid)
        f.version += 1  # invalidates its heap entry
        if not keep:
            del self._flows[fid]
        if f.src in self.links and f.dst in self.links:
            self._rerate(f.src, f.dst, now)

    def _rerate(self, src: str, dst: str, now: float) -> None:
        """Recompute the rate of every flow that shares an endpoint link with (src, dst)."""
        touched = self._out[src] | self._in[dst]
        for fid in touched:
            f = self._flows[fid]
            f.remaining = max(0.0, f.remaining - f.rate * (now - f.updated))
            f.updated = now
            up = self.links[f.src].up / len(self._out[f.src])
            down = self.links[f.dst].down / len(self._in[f.dst])
            f.rate = rate = min(up, down)
            f.version += 1
            finish = now + (f.remaining / rate if rate < INF else 0.0)
            self._seq += 1
            heapq.heappush(self._heap, (finish, self._seq, fid, f.version))

    def _drop_stale(self) -> None:
        while self._heap:
            _, _, fid, version = self._heap[0]
            f = self._flows.get(fid)
            if f is not None and f.version == version and fid in self._out.get(f.src, ()):
                return
            heapq.heappop(self._heap)
