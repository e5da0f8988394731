"""The node's asyncio driver: feed the sans-IO algorithm, carry its outbox, keep its time.

Theory of operation
-------------------
The algorithm object is not thread-safe, and a local step is seconds of torch work that
must not stall the event loop. So every call into the object — ``on_local_step``,
``on_message``, ``on_peers``, ``on_timer``, ``evaluate``, state export — runs on one
dedicated worker thread (``act``), one at a time, in the order the loop asked. The loop
itself only reads frames, decodes them (protocols/wire.py), carries outboxes and arms the
timer, so messages keep flowing while a step computes; a message that arrives mid-step
waits in the worker's queue and is applied right after.

The main loop reads straight down: wait until the algorithm may step, step, wait until
the step (or round) has closed — firing ``on_timer`` when ``next_deadline()`` passes —
log the row, checkpoint every N steps, repeat until the swarm position reaches the target.

Time. The algorithm's clock is ``time.monotonic()`` everywhere (deadlines are durations
from ``now``; a wall-clock jump must not fire or starve them). Only DHT expirations use
hivemind's ``get_dht_time()``, in transport.py.

Catching up. A joiner, and a replica found split from the others (protocols/splits.py),
feed the catch-up machine (protocols/catchup.py) with the verified members and carry its
requests; what we serve others is node/donor.py's. Messages that arrive meanwhile wait
in a buffer and are delivered, in order, once the state is in.

Untrusted input. A frame that does not decode, or a message whose ``peer`` field names
someone other than the authenticated sender, is counted under its reason and dropped. With
signing on (public swarms, node/sealing.py) every frame must also be sealed by the
sender's key. Who may take part or ask for our state is node/gate.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from byteswarm.optim.sansio import EVERYONE, Algorithm, Rejected, Send
from byteswarm.optim.seeds import derive_seed
from byteswarm.optim.spsa import Record
from byteswarm.protocols import catchup, splits, wire
from byteswarm.protocols import state as P
from byteswarm.protocols.splits import Marks

from . import report
from .donor import Donor
from .frames import Frames
from .gate import Gate
from .plan import Plan, Poll
from .transport import Member, Transport

MAX_BUFFERED = 10_000  # messages held while we sync, before the algorithm takes them


class Driver:
    def __init__(self, algo: Algorithm, plan: Plan, *, numel: int,
                 log_row: Callable[[dict[str, Any]], None],
                 checkpoint: Callable[[dict[str, Any]], Awaitable[None]],
                 say: Callable[[str], None], seconds_before: float = 0.0,
                 admit: Callable[[str, bytes | None], bool] | None = None,
                 pace: Callable[[], bool] | None = None):
        """``admit(peer, token)``: a public swarm's admission rule (None: open).
        ``pace()``: whether the next local step may be taken now, asked once the algorithm
        can step (node/api.py: the user's training loop hands it over; call ``kick.set``
        from the loop when that changes). None: step as soon as the algorithm can."""
        self.algo, self.plan = algo, plan
        self.pace = pace or (lambda: True)
        self.ctx = wire.Context(numel=numel)
        self.log_row, self.checkpoint, self.say = log_row, checkpoint, say
        self.told_banned = False
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="algo")
        self.poll = Poll(progress=algo.position())
        self.kick = asyncio.Event()
        self.transport: Transport | None = None
        self.peers: frozenset[str] = frozenset({algo.peer_id})
        self.heard: dict[str, float] = {}  # sender -> when we last got a message from it
        self.members: dict[str, Member] = {}
        self.listeners: frozenset[str] = frozenset()  # syncing members: they hear, not count
        self.ready = False
        self.buffer: list[tuple[str, Any]] = []
        self.rejects: Counter[str] = Counter()
        self.signals = 0
        self.t0 = time.monotonic()
        self.seconds_before = seconds_before
        self.compute_seconds = 0.0
        self.val_loss: float | None = None
        self.last_loss: float | None = None
        self.splits = Marks()  # our SPSA marks, to find a split
        self.resync_from: list[str] = []  # a split was found: copy one of these
        self.last_resync = -math.inf
        self.resyncs = 0
        self.donor = Donor(algo, self.act, lambda: self.frames.sealer)  # what we serve joiners
        self._copied: int | None = None  # the last served tag copied (worker thread only)
        self.blame: Counter[str] = Counter()  # donors that sent junk or failed us
        self.catchups: list[dict[str, Any]] = []  # each catch-up's stats()
        self.gate = Gate(algo.peer_id, admit)
        self.frames = Frames(plan.swarm, self.ctx)  # set .sealer to sign (sealing.py)
        self.last_wait = 0.0  # seconds the last step waited for its step or round to close
        self.last_said = (self.t0, self.poll.progress)  # (time, step) of the last line

    @staticmethod
    def now() -> float:
        return time.monotonic()

    # -- every call into the algorithm goes through here
    def _call(self, fn: Callable[..., Any] | None, args: tuple) -> tuple[Any, Poll]:
        res = fn(*args) if fn is not None else None
        a = self.algo
        tag = a.served_tag()
        served = None
        if tag is not None and tag != self._copied:  # a copy now; bytes and hashes later
            self._copied = tag
            served = (tag, a.served_state())
        return res, Poll(can_step=a.can_step(), deadline=a.next_deadline(),
                         progress=a.position(), outbox=a.outbox(), mark=a.mark(),
                         served=served)

    async def act(self, fn: Callable[..., Any] | None, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        res, poll = await loop.run_in_executor(self.pool, self._call, fn, args)
        self.poll = poll
        self.splits.add(poll.mark)
        for send in poll.outbox:
            self._carry(send)
        if poll.served is not None:
            self.donor.offer(*poll.served)
        self.kick.set()
        return res

    def _carry(self, send: Send) -> None:
        data = self.frames.encode(send.msg, self.poll.progress)
        kind = type(send.msg).__name__
        targets = (self.peers | self.listeners) if send.to == EVERYONE else {send.to}
        if isinstance(send.msg, Record) and send.msg.step == self.plan.withhold_record:
            targets = set(sorted(targets - {self.algo.peer_id})[:1])
        for peer in sorted(targets - {self.algo.peer_id}):
            self.transport.send(peer, data, kind)

    # -- transport callbacks
    def may_ask(self, peer: str) -> bool:
        """Only members of our view (or peers streaming to us) are served state."""
        return peer in self.members or peer in self.peers or peer in self.listeners

    def may_author(self, peer: str) -> bool:
        m = self.members.get(peer)
        return self.gate.may_author(peer, None if m is None else m.token, self.algo.banned)

    async def on_frame(self, sender: str, data: bytes) -> str:
        if not data:
            return "hello"
        m = self.members.get(sender)
        if not self.gate.admitted(sender, None if m is None else m.token):
            self.rejects["not_admitted"] += 1
            return "rejected"
        try:
            msg = self.frames.decode(data, sender, self.poll.progress)
        except Rejected as e:
            self.rejects[e.reason] += 1
            return "rejected"
        self.heard[sender] = self.now()
        if not self.ready:
            if len(self.buffer) < MAX_BUFFERED:
                self.buffer.append((sender, msg))
            else:
                self.rejects["buffer_full"] += 1
        else:
            await self.deliver(sender, msg)
        return type(msg).__name__

    async def deliver(self, sender: str, msg: Any) -> None:
        """A peer that talks to us is live, even before its heartbeat reaches our view of
        the DHT: add it to the peer set the algorithm knows, then hand over the message."""
        grown = None
        if sender not in self.peers:
            self.peers = grown = self.peers | {sender}
        await self.act(self._deliver, sender, msg, self.now(), grown)

    def _deliver(self, sender: str, msg: Any, now: float, peers: frozenset[str] | None) -> None:
        if peers is not None:
            self.algo.on_peers(peers, now)
        self.algo.on_message(sender, msg, now)

    async def on_members(self, members: dict[str, Member]) -> None:
        members = {p: m for p, m in members.items() if self.gate.admitted(p, m.token)}
        self.members = members
        now = self.now()
        self.heard = {p: t for p, t in self.heard.items() if now - t < self.plan.peer_ttl}
        # NoLoCo/DiLoCo: a member still downloading the state takes no part yet, and
        # waiting for its share would stall a round. (SPSA keeps waiting for a joiner's
        # records: closing steps without it would leave it behind the swarm's finality,
        # and its first records too late for anyone but itself: a split.)
        self.listeners = frozenset(
            p for p, m in members.items()
            if m.syncing and p != self.algo.peer_id and not self.algo.waits_for_syncing)
        live = ((frozenset(members) - self.listeners) | frozenset(self.heard)
                | {self.algo.peer_id})
        if live != self.peers:
            self.peers = live
            if self.ready:
                await self.act(self.algo.on_peers, live, now)
        if self.ready and not self.resync_from and now - self.last_resync > 2 * self.plan.peer_ttl:
            donors = self.splits.outvoted({p: m.marks for p, m in members.items()},
                                          self.algo.peer_id)
            if donors:
                self.resync_from = donors
                self.say(f"our replica split from {len(donors)} peer(s): resyncing")
            elif ahead := self.left_behind(members):
                self.resync_from = ahead
                self.say(f"{len(ahead)} peer(s) are past what we can still take: catching up")
        self.kick.set()

    def left_behind(self, members: dict[str, Member]) -> list[str]:
        """Members to catch up from if we fell too far behind (protocols/splits.py)."""
        return splits.left_behind({p: m.progress for p, m in members.items()},
                                  self.algo.peer_id, self.algo.banned, self.algo.behind)

    def recent_marks(self) -> dict[int, str]:
        """What our heartbeat publishes (protocols/splits.py)."""
        return self.splits.published(self.donor.store.blobs)

    # -- waiting
    async def wait_until(self, cond: Callable[[], bool], *, abort_on_stop: bool,
                         timeout: float | None = None) -> bool:
        """Wait for ``cond``, firing the algorithm's timer when it is due. False if we
        gave up (a stop signal, when allowed, or ``timeout``)."""
        give_up = None if timeout is None else self.now() + timeout
        while not cond():
            if self.signals > 1 or (self.signals and abort_on_stop):
                return False
            if give_up is not None and self.now() >= give_up:
                return False
            due = [t for t in (self.poll.deadline, give_up) if t is not None]
            wait = max(0.0, min(due) - self.now()) if due else None
            self.kick.clear()
            try:
                await asyncio.wait_for(self.kick.wait(), wait)
            except asyncio.TimeoutError:
                d = self.poll.deadline
                if d is not None and self.now() >= d:
                    await self.act(self.algo.on_timer, self.now())
        return True

    def stop(self) -> None:
        """Signal handler: the first stops after the current step (checkpointed); the
        second stops at once."""
        self.signals += 1
        self.kick.set()

    # -- start: meet the swarm, catch up with it
    async def join(self) -> str | None:
        """Meet the swarm and catch up; None, or why we cannot start."""
        p = self.plan
        # A node given peers to join waits to see one of them (its first DHT reads may
        # not reach the swarm yet); one that starts a swarm waits for min_peers.
        need = max(p.min_peers, 2 if p.joining else 1)
        self.say(f"waiting for {need} peer(s) in swarm {p.swarm!r}")
        running = lambda: any(self.algo.behind(m.progress) for m in self.members.values())
        ok = await self.wait_until(lambda: len(self.members) >= need or running(),
                                   abort_on_stop=True, timeout=p.start_timeout)
        if not ok:
            return "signal" if self.signals else "no_peers"
        if p.needs_weights and not running():
            return "no_weights"  # nobody is ahead to copy, and we cannot start alone
        if p.sync and running():
            # Peers send to whom their DHT view lists; once they list us, nothing they
            # send after the donor's snapshot can miss us (it waits in self.buffer). Our
            # heartbeat says we are syncing: NoLoCo/DiLoCo groups leave us out meanwhile.
            self.transport.beat_extra["syncing"] = True
            self.transport.beat_soon()
            await asyncio.sleep(p.announce_wait)
            await self.catch_up([peer for peer, m in self.members.items()
                                 if self.algo.behind(m.progress)])
        elif need > 1:
            # A new swarm: the others see the quorum a heartbeat or two after us. Starting
            # at once would put us a round ahead of a peer that has not seen it yet.
            await asyncio.sleep(p.announce_wait)
        await self.go_live()
        return None

    async def catch_up(self, donors: list[str]) -> bool:
        """Take the state of the swarm from ``donors`` (members ahead of us, or the majority
        of a split) through the catch-up machine (protocols/catchup.py): we carry its
        requests over our streams and keep its time."""
        chosen = set(donors)
        m = catchup.CatchUp(catchup.CatchUpConfig(), algo=self.algo, numel=self.algo.numel,
                            seed=derive_seed("catchup", self.algo.peer_id, self.resyncs),
                            read_log=P.parse_log if self.frames.sealer is None
                            else self.frames.sealer.parse_log)
        give_up, got = self.now() + 4 * m.cfg.timeout, 0
        asking: set[asyncio.Task] = set()
        while not m.done and self.signals < 2 and self.now() < give_up:
            m.on_view({p: catchup.Candidate(mb.progress, mb.marks)
                       for p, mb in self.members.items() if p in chosen}, self.now())
            for r in m.requests():
                task = asyncio.ensure_future(self._ask(m, r))
                asking.add(task)
                task.add_done_callback(asking.discard)
            due = m.next_deadline()
            self.kick.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.kick.wait(), max(0.0, min(
                    give_up, due if due is not None else give_up) - self.now()))
            if due is not None and self.now() >= due:
                m.on_timer(self.now())
            if m.bytes_in > got:  # bytes keep coming: a big state takes its time
                give_up, got = self.now() + 4 * m.cfg.timeout, m.bytes_in
        for task in asking:
            task.cancel()
        self.blame.update(m.blame)
        self.catchups.append(m.stats())
        if m.phase != catchup.DONE:
            self.rejects[m.reason or "catch_up_timeout"] += 1
            self.say(f"could not catch up ({m.reason or 'timed out'}); keeping our own state")
            return False
        try:
            await self.act(self.algo.import_state, m.result)
        except Rejected as e:
            self.rejects[e.reason] += 1
            self.say(f"the state we downloaded does not fit ({e}); keeping our own")
            return False
        self.say(f"synced from {len(m.served_by)} peer(s) ({m.how}, "
                 f"{m.bytes_in / 1e6:.1f} MB): now at step {self.poll.progress}")
        return True

    async def _ask(self, m: catchup.CatchUp, r: catchup.Request) -> None:
        try:
            reply = await self.transport.request(r.peer, r.service, r.data, r.limit,
                                                 m.cfg.timeout)
        except Exception:  # gone, slow, refused or oversized: the machine tries another
            reply = None
        m.on_reply(r.id, reply, self.now())
        self.kick.set()

    async def go_live(self) -> None:
        if self.transport.beat_extra.pop("syncing", None):
            self.transport.beat_soon()
        await self.act(self.algo.on_peers, self.peers, self.now())
        self.ready = True
        buffered, self.buffer = self.buffer, []
        for sender, msg in buffered:  # what came while we synced, in arrival order
            await self.deliver(sender, msg)

    async def resync(self) -> None:
        """Catch up with the peers of the majority after a split (protocols/splits.py)."""
        donors, self.resync_from = self.resync_from, []
        self.ready = False  # what arrives meanwhile waits, as for a joiner
        if await self.catch_up(donors):
            self.splits.clear()  # ours were of the split replica
            self.resyncs += 1
        self.last_resync = self.now()
        await self.go_live()

    # -- the loop
    async def run(self) -> str:
        """Train to the target; returns why it stopped ("done", "signal", "no_peers",
        "no_weights")."""
        p = self.plan
        why = await self.join()
        if why is not None:
            return why
        target = p.steps or math.inf
        while self.poll.progress < target:
            if self.resync_from:
                await self.resync()
            if not await self.wait_until(lambda: self.poll.can_step and self.pace(),
                                         abort_on_stop=True):
                break
            t = self.now()
            info = await self.act(self.algo.on_local_step, self.now())
            self.compute_seconds += self.now() - t
            self.last_loss = float(info["loss"])
            t = self.now()
            if not await self.wait_until(lambda: self.poll.can_step, abort_on_stop=False):
                break
            self.last_wait = self.now() - t
            step = self.poll.progress
            evaluate = step % p.eval_every == 0 or step >= target
            await self.write_row(step, evaluate)
            if step % p.checkpoint_every == 0 or step >= target:
                await self.save()
            if self.signals:
                break
        if self.signals:
            if self.poll.can_step:
                await self.save()
            return "signal"
        await asyncio.sleep(p.linger)  # keep serving: peers may still need our messages
        return "done"

    async def write_row(self, step: int, evaluate: bool) -> None:
        extra = await self.act(report.measure, self.algo, evaluate)
        if "val_loss" in extra:
            self.val_loss = extra["val_loss"]
        row = report.row(self, step, extra)
        self.log_row(row)
        if self.algo.peer_id in self.algo.banned and not self.told_banned:
            self.told_banned = True  # every peer's spot checks refused a byte of ours
            self.say("a record of ours failed the swarm's spot checks (measured on a θ "
                     "without a record that came late, or on another shard): every peer "
                     "now refuses our records; we follow without sending (a new --identity "
                     "contributes again)")
        if evaluate or step % 10 == 0:
            t0, s0 = self.last_said
            self.last_said = (self.now(), step)
            self.say(report.line(row, (step - s0) / max(self.now() - t0, 1e-9)))

    def seconds(self) -> float:
        return self.seconds_before + self.now() - self.t0

    async def save(self) -> None:
        state = await self.act(self.algo.state_dict)
        await self.checkpoint({"state": state, "seconds": self.seconds(),
                               "sent": dict(self.transport.sent),
                               "received": dict(self.transport.received)})

    def summary(self) -> dict[str, Any]:
        return report.summary(self)
