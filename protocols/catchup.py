"""Catching up with a swarm, as a sans-IO state machine: choose donors, download the state
in checked chunks, blame liars, take the records since.

Theory of operation
-------------------
A joiner, or a replica that split from the others, needs the swarm's state from peers it
cannot trust. The machine is fed and drained like the algorithms (optim/sansio.py): the
driver hands it the verified membership view (``on_view``), the replies to its requests
(``on_reply``, None for a failure) and the time (``on_timer`` at ``next_deadline()``), and
carries the requests it drains (``requests()``) to the donors' ``snap`` and ``state``
services (protocols/serving.py answers them). The node drives it over libp2p streams; the
simulator over its virtual network, so churn and hostile-donor scenarios run this code.

1. Ask. Up to ``donors`` candidates, drawn uniformly (a seeded draw) among the members of
   the view that are ahead of us, are asked for the indexes of every state they serve.
   A candidate is a peer whose signed heartbeat the driver verified (and, in a public
   swarm, who is admitted); what it claims about its progress does not rank it, so an
   outsider cannot buy a place among the donors by claiming more.
2. Vote. Donors that serve byte-identical state at a tag send byte-identical indexes
   (encoders are deterministic). Where replicas are identical (SPSA), each (tag, index)
   gets the votes of the distinct donors that *answered* with it and whose heartbeat
   vouches for that tag with the fingerprint the others give; the most votes win, the
   latest tag among equals. Where replicas differ (NoLoCo; DiLoCo after a split round),
   agreement proves nothing but collusion, so the tag that most donors hold wins, and a
   copy is taken as it is only if more than half of that tag's holders serve it alike.
3. Fetch. The chunks come from every donor of the winning group, several at once, each
   checked against its sha256; a chunk that fails is asked of the next donor, and the
   first is blamed. SPSA's assembled snapshot must have the vouched fingerprint. Where
   replicas differ and no majority serves one copy, ``combine_of`` holders are drawn,
   each copy is checked against its own index, and the algorithm ``combine``s three or
   more (a coordinate-wise median); of two the machine takes one at random, never their
   mean, which one liar could move anywhere.
4. Log. SPSA's snapshot is some steps old: each donor of the group sends its records since
   (sealed records in a public swarm); their union goes on top (``join_state``).

A swarm too young to serve any state falls back to whole states from three drawn donors,
taking the one most of them sent, or the first in the draw where all differ (never the
fastest). One retry, after ``retry_wait``, follows a failure where
nobody held anything (donors keep only their latest states, and heartbeats are seconds
old).

The bound. Votes count identities that answer, not records, so a joiner that asks every
candidate is fooled only if the Sybils among them are at least as many as the honest
members that serve one state (with allowlist admission, only admitted members can be
candidates at all). docs/security.md states it with the rest of the trust boundary.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from byteswarm.optim.config import opt
from byteswarm.optim.sansio import Rejected
from byteswarm.optim.spsa import RecordLog

from . import state as P

ASK, FETCH, LOG, WHOLE, WAIT, DONE, FAILED = \
    "ask", "fetch", "log", "whole", "wait", "done", "failed"
LOG_LIMIT = 1 << 24  # bytes of a record log
RETRY = ("nothing_served", "no_answer")  # failures worth one more try
OPEN_AHEAD = 64  # steps past the merged log's closed step whose records are kept


@dataclass(frozen=True)
class Candidate:
    """What the joiner knows of a member from its verified heartbeat."""

    progress: int
    marks: dict[int, str] = field(default_factory=dict)  # tag -> fingerprint vouched for


@dataclass(frozen=True)
class Request:
    id: int
    peer: str
    service: str  # "snap" or "state"
    data: bytes
    limit: int  # the largest reply worth reading


@dataclass(frozen=True, kw_only=True)
class CatchUpConfig:
    donors: int = opt(8, "candidates asked for the states they serve", lo=1, hi=64)
    combine_of: int = opt(5, "distinct copies fetched where replicas differ", lo=1, hi=16)
    parallel: int = opt(4, "chunk requests in flight", lo=1, hi=64)
    timeout: float = opt(30.0, "seconds a donor has to answer one request", lo=0.0,
                         lo_open=True)
    retry_wait: float = opt(2.0, "seconds before the one retry", lo=0.0)


@dataclass
class _Blob:
    """One served state being fetched: from ``peers``, which all sent ``index``."""

    index: P.Index
    peers: list[str]
    chunks: list[bytes | None]
    tries: list[int]
    todo: list[int]
    failed: bool = False
    gone: bool = False  # a donor no longer holds it (not a lie: it moved on)

    @property
    def complete(self) -> bool:
        return all(c is not None for c in self.chunks)


class CatchUp:
    """One catch-up (see the module docstring). ``result`` holds the state to import when
    ``phase`` is DONE; ``reason`` says why when it is FAILED."""

    def __init__(self, cfg: CatchUpConfig, *, algo: Any, numel: int, seed: int,
                 read_log: Callable[[bytes, int], RecordLog] = P.parse_log):
        """``read_log`` parses a donor's record log (a signing node's checks sealed
        records, node/sealing.py)."""
        self.cfg, self.algo, self.numel, self.read_log = cfg, algo, numel, read_log
        self.rng = random.Random(seed)
        self.phase = WAIT
        self.view: dict[str, Candidate] = {}
        self.result: Any = None
        self.reason = ""
        self.blame: Counter[str] = Counter()
        self.bytes_in = 0
        self.retries_left = 1
        self.wait_until: float | None = None
        self._out: list[Request] = []
        self._inflight: dict[int, tuple[float, Callable[[bytes | None], None]]] = {}
        self._ids = 0
        self._answers: dict[str, list[tuple[bytes, P.Index]] | None] = {}
        self._blobs: list[_Blob] = []
        self._group: list[str] = []
        self._tag = -1
        self._fingerprint: str | None = None
        self._logs: dict[str, RecordLog | None] = {}
        self._now = 0.0
        self.donors_asked: list[str] = []
        self.served_by: set[str] = set()
        self.how = ""

    # -- driver interface
    def on_view(self, view: dict[str, Candidate], now: float) -> None:
        """The verified members ahead of us (the driver filters and verifies)."""
        self.view = dict(view)
        if self.phase == WAIT and self.wait_until is None:
            self._ask(now)

    def requests(self) -> list[Request]:
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float | None:
        times = [d for d, _ in self._inflight.values()]
        if self.phase == WAIT and self.wait_until is not None:
            times.append(self.wait_until)
        return min(times, default=None)

    def on_timer(self, now: float) -> None:
        self._now = now
        for rid, (deadline, _) in sorted(self._inflight.items()):
            if now >= deadline and rid in self._inflight:
                self.on_reply(rid, None, now)
        if self.phase == WAIT and self.wait_until is not None and now >= self.wait_until:
            self.wait_until = None
            self._ask(now)

    def on_reply(self, rid: int, data: bytes | None, now: float) -> None:
        """A donor's reply to request ``rid`` (None: it failed or timed out)."""
        self._now = now
        entry = self._inflight.pop(rid, None)
        if entry is None:
            return  # answered after we gave up on it
        if data is not None:
            self.bytes_in += len(data)
        entry[1](data)

    @property
    def done(self) -> bool:
        return self.phase in (DONE, FAILED)

    def stats(self) -> dict[str, Any]:
        return {"phase": self.phase, "reason": self.reason, "bytes_in": self.bytes_in,
                "donors_asked": len(self.donors_asked), "served_by": len(self.served_by),
                "blamed": dict(sorted(self.blame.items())), "how": self.how}

    # -- internals: requests
    def _send(self, peer: str, service: str, data: bytes, limit: int,
              then: Callable[[bytes | None], None]) -> None:
        self._ids += 1
        self._inflight[self._ids] = (self._now + self.cfg.timeout, then)
        self._out.append(Request(self._ids, peer, service, data, limit))

    def _fail(self, reason: str) -> None:
        if reason in RETRY and self.retries_left > 0:
            self.retries_left -= 1
            self.phase, self.wait_until = WAIT, self._now + self.cfg.retry_wait
            return
        self.phase, self.reason = FAILED, reason

    # -- 1. ask
    def _ask(self, now: float) -> None:
        self._now = now
        peers = sorted(self.view)
        if not peers:
            return  # wait for a view with someone in it
        self.rng.shuffle(peers)
        self._order = peers[:self.cfg.donors]  # the draw's order (whole states take its head)
        self.donors_asked = sorted(self._order)
        self._asked = {p: self.view[p] for p in self.donors_asked}  # what they vouched for
        self.phase, self._answers = ASK, {}
        limit = 2 * 4 * self.numel + (1 << 20)
        most = P.MAX_INDEXES * (256 + 32 * (limit // 1024 + 1)) + 64
        for peer in self.donors_asked:
            self._send(peer, "snap", P.pack_request("indexes"), most,
                       lambda data, peer=peer: self._got_indexes(peer, data, limit))

    def _got_indexes(self, peer: str, data: bytes | None, limit: int) -> None:
        held = None
        if data:
            try:
                held = P.parse_indexes(data, limit)
            except Rejected:
                self.blame[peer] += 1
        elif data is None:
            self.blame[peer] += 1
        self._answers[peer] = held
        if len(self._answers) == len(self.donors_asked):
            self._vote()

    # -- 2. vote
    def _vote(self) -> None:
        if all(held is None for held in self._answers.values()):
            self._fail("no_answer")
            return
        groups: dict[tuple[int, bytes], list[str]] = {}
        for peer, held in sorted(self._answers.items()):
            for raw, idx in held or []:
                groups.setdefault((idx.tag, raw), []).append(peer)
        if not groups:
            self._whole()
            return
        if not self.algo.identical_replicas:
            self._vote_differing()
            return
        # Identical replicas: a vote needs the donor's heartbeat to vouch for the state.
        votes: dict[tuple[int, bytes], tuple[list[str], str]] = {}
        for (tag, raw), peers in groups.items():
            fps = Counter(self._asked[p].marks[tag] for p in peers
                          if tag in self._asked[p].marks)
            if fps:
                fp, _ = max(fps.items(), key=lambda kv: (kv[1], kv[0]))
                votes[tag, raw] = ([p for p in peers if self._asked[p].marks.get(tag) == fp],
                                   fp)
        if not votes:
            self._fail("nothing_vouched")
            return
        (tag, raw), (peers, fp) = max(votes.items(), key=lambda kv: (len(kv[1][0]), kv[0][0]))
        self.how = f"{len(peers)} identical"
        self._fetch(tag, [(P.parse_index(raw, tag, 1 << 62), peers)], fp)

    def _vote_differing(self) -> None:
        """Replicas that differ by design: the tag most donors hold (the latest among
        equals); a copy that more than half of its holders serve alike, or else a few
        holders' copies, combined."""
        holders: dict[int, dict[str, tuple[bytes, P.Index]]] = {}
        for peer, held in sorted(self._answers.items()):
            for raw, idx in held or []:
                holders.setdefault(idx.tag, {})[peer] = (raw, idx)
        tag = max(holders, key=lambda t: (len(holders[t]), t))
        at = holders[tag]
        same = Counter(raw for raw, _ in at.values())
        # Ties and order go by who holds a copy, never by its bytes: the same choice
        # whatever the float rounding of the weights (the simulator's modes must agree).
        first = {raw: min(p for p, (r, _) in at.items() if r == raw) for raw in same}
        raw, n = max(same.items(), key=lambda kv: (kv[1], [-ord(c) for c in first[kv[0]]]))
        if n >= 2 and 2 * n > len(at):
            peers = sorted(p for p, (r, _) in at.items() if r == raw)
            self.how = f"{n} identical"
            self._fetch(tag, [(at[peers[0]][1], peers)], None)
            return
        # Distinct copies, each once however many serve it: Sybils that serve one poison
        # alike count as one copy. Each copy comes from all of its holders.
        copies = sorted(same, key=first.get)
        chosen = self.rng.sample(copies, min(self.cfg.combine_of, len(copies)))
        self.how = f"{len(chosen)} copies"
        self._fetch(tag, [(at[min(p for p, (r, _) in at.items() if r == raw)][1],
                           sorted(p for p, (r, _) in at.items() if r == raw))
                          for raw in chosen], None)

    # -- 3. fetch
    def _fetch(self, tag: int, sources: list[tuple[P.Index, list[str]]],
               fp: str | None) -> None:
        self.phase, self._tag, self._fingerprint = FETCH, tag, fp
        self._group = sorted({p for _, peers in sources for p in peers})
        self._blobs = [_Blob(idx, peers, [None] * len(idx.hashes), [0] * len(idx.hashes),
                             list(range(len(idx.hashes)))) for idx, peers in sources]
        self._pump()

    def _pump(self) -> None:
        busy = len(self._inflight)
        for blob in self._blobs:
            while blob.todo and not blob.failed and busy < self.cfg.parallel:
                i = blob.todo.pop(0)
                peer = blob.peers[(i + blob.tries[i]) % len(blob.peers)]
                self._send(peer, "snap", P.pack_request("chunk", self._tag, i),
                           blob.index.chunk_size(i),
                           lambda data, b=blob, i=i, p=peer: self._got_chunk(b, i, p, data))
                busy += 1
        if not self._inflight and all(b.failed or b.complete for b in self._blobs):
            self._assemble()

    def _got_chunk(self, blob: _Blob, i: int, peer: str, data: bytes | None) -> None:
        if (data is not None and len(data) == blob.index.chunk_size(i)
                and hashlib.sha256(data).digest() == blob.index.hashes[i]):
            blob.chunks[i] = data
            self.served_by.add(peer)
        else:
            if data == b"":  # it no longer holds the state: it moved on, no lie
                blob.gone = True
            else:
                self.blame[peer] += 1
            blob.tries[i] += 1
            if len(blob.peers) > 1 and peer in blob.peers:  # ask it nothing more
                blob.peers.remove(peer)
            if blob.tries[i] > len(blob.peers) + 1 or not blob.peers:
                blob.failed = True
            else:
                blob.todo.insert(0, i)
        self._pump()

    def _assemble(self) -> None:
        states = []
        for blob in self._blobs:
            if blob.failed:
                continue
            try:
                states.append(self.algo.check_served(
                    P.parse_served(b"".join(blob.chunks), self.numel)))
            except Rejected:  # the chunks matched the index: its donors sent junk
                for p in blob.peers:
                    self.blame[p] += 1
        if not states:
            gone = any(b.gone for b in self._blobs)
            self._fail("nothing_served" if gone else "no_donor_served")
            return
        if self._fingerprint is not None:
            if self.algo.served_mark(states[0]) != self._fingerprint:
                for p in self._group:
                    self.blame[p] += 1
                self._fail("wrong_fingerprint")
                return
        if len(states) == 1:
            served = states[0]
        elif len(states) == 2:  # never the mean of two: one liar could move it anywhere
            served = states[self.rng.randrange(2)]
        else:
            served = self.algo.combine(states)
        if not self.algo.has_log:
            self._finish(served)
            return
        self._served, self.phase, self._logs = served, LOG, {}
        for peer in self._group:
            self._send(peer, "snap", P.pack_request("log", self._tag), LOG_LIMIT,
                       lambda data, p=peer: self._got_log(p, data))

    # -- 4. log
    def _got_log(self, peer: str, data: bytes | None) -> None:
        log = None
        if data:
            try:
                log = self.read_log(data, self._tag)
            except Rejected:
                self.blame[peer] += 1
        else:
            self.blame[peer] += 1
        self._logs[peer] = log
        if len(self._logs) < len(self._group):
            return
        logs = [lg for _, lg in sorted(self._logs.items()) if lg is not None]
        if not logs:
            self._fail("no_log")
            return
        try:
            self._finish(self.algo.join_state(self._served, self._merge(logs)))
        except Rejected as e:
            self._fail(e.reason)

    def _merge(self, logs: list[RecordLog]) -> RecordLog:
        """One log from the group's: closed at their median closed step (the upper one of
        two; a liar among more donors cannot drag us ahead), and every record that any log
        carries up to ``OPEN_AHEAD`` steps past it (honest logs differ in the steps still
        open: a record late at one donor is on time at another, and a donor holds records
        of its next steps, sent before it knew us, that no one will send us again), the
        value most logs give where they differ.
        Signed records are their authors' word; unsigned ones the donors' (a donor that
        invents one splits us, and the split is found and repaired like any other)."""
        closed = sorted(lg.closed for lg in logs)[len(logs) // 2]
        count: Counter[tuple[int, str, int]] = Counter()
        for lg in logs:
            for t, recs in lg.records.items():
                if t <= closed + OPEN_AHEAD:
                    count.update((t, p, q) for p, q in recs.items())
        records: dict[int, dict[str, int]] = {}
        for (t, p, q), _ in sorted(count.items(), key=lambda kv: (-kv[1], kv[0])):
            records.setdefault(t, {}).setdefault(p, q)  # the most carried value
        return RecordLog(closed, records)

    # -- a young swarm: whole states
    def _whole(self) -> None:
        donors = self._order[:3]
        self.phase, self._wholes = WHOLE, {}
        limit = (1 << 24) + 3 * 4 * self.numel
        self._whole_from = len(donors)
        for peer in donors:
            self._send(peer, "state", P.pack_request("state"), limit,
                       lambda data, p=peer: self._got_whole(p, data))

    def _got_whole(self, peer: str, data: bytes | None) -> None:
        if data is None:
            self.blame[peer] += 1
        self._wholes[peer] = data
        if len(self._wholes) < self._whole_from:
            return
        blobs = Counter(d for d in self._wholes.values() if d)
        # The most alike, then the earliest in the draw's order (never the fastest: a
        # liar cannot win by answering first). A live swarm's donors rarely send equal
        # whole states (they are at different steps), so this is a draw among them.
        rank = {p: i for i, p in enumerate(self._order)}
        first = {raw: min(rank[p] for p, d in self._wholes.items() if d == raw)
                 for raw in blobs}
        for raw, votes in sorted(blobs.items(), key=lambda kv: (-kv[1], first[kv[0]])):
            try:
                state = P.parse_state(raw, self.numel)
                self.algo.check_served(state.snap if hasattr(state, "snap") else state)
            except Rejected:
                for p, d in self._wholes.items():
                    if d == raw:
                        self.blame[p] += 1
                continue
            self.served_by |= {p for p, d in self._wholes.items() if d == raw}
            self.how = f"whole state, {votes} alike"
            self._finish(state)
            return
        self._fail("nothing_served")

    def _finish(self, state: Any) -> None:
        self.result, self.phase = state, DONE
