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

Splits (SPSA). A record that reaches some peers but not others before its step is final
splits the replicas for good. Every peer therefore publishes, with its heartbeat, the
fingerprints of θ at its latest final steps that are multiples of ``MARK_EVERY``; a peer
whose fingerprint at a step is outvoted by another one (more peers, see
``algos.outvoted``) downloads the state of a peer in the majority between two steps,
exactly as a joiner does, keeping the records it holds. Two peers alone cannot tell who
split; they only count the disagreement.

Untrusted input. A frame that does not decode, or a message whose ``peer`` field names
someone other than the authenticated sender, is counted under its reason and dropped. With
signing on (public swarms, node/sealing.py) every frame must also be sealed by the
sender's key, and the SPSA record logs served to joiners are lists of sealed records.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from byteswarm.optim.sansio import EVERYONE, Algorithm, Rejected, Send
from byteswarm.optim.spsa import HISTORY_STEPS, SPSA, Record
from byteswarm.protocols import wire

from . import algos as A
from . import outersync, report, statesync
from .sealing import Sealer
from .transport import Member, Transport

MAX_BUFFERED = 10_000  # messages held while we sync, before the algorithm takes them
MAX_MARKS = 32  # our own SPSA marks kept for comparison
SEALED_AHEAD = 64  # steps beyond our position whose sealed records we keep
STATE_REQUEST = b"byteswarm-state?"


@dataclass
class Poll:
    """What the loop needs to know after any call into the algorithm."""

    can_step: bool = True
    deadline: float | None = None
    progress: int = 0
    mark: tuple[int, str] | None = None
    outbox: list[Send] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class Plan:
    swarm: str
    steps: int  # stop when the swarm position reaches this (0: never)
    min_peers: int
    start_timeout: float
    eval_every: int
    checkpoint_every: int
    peer_ttl: float
    sync: bool
    linger: float
    announce_wait: float  # before a state download: let the others see our heartbeat
    withhold_record: int = -1  # testing: our record of this step goes to one peer only
    needs_weights: bool = False  # we lack the swarm's initial weights: only a sync will do
    joining: bool = False  # we were given initial peers: wait to see one of them


class Driver:
    def __init__(self, algo: Algorithm, plan: Plan, *, numel: int,
                 log_row: Callable[[dict[str, Any]], None],
                 checkpoint: Callable[[dict[str, Any]], Awaitable[None]],
                 say: Callable[[str], None], seconds_before: float = 0.0):
        self.algo, self.plan = algo, plan
        self.ctx = wire.Context(numel=numel)
        self.log_row, self.checkpoint, self.say = log_row, checkpoint, say
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="algo")
        self.poll = Poll(progress=A.progress(algo))
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
        self.marks: dict[int, str] = {}  # our SPSA marks: final step -> fingerprint
        self.resync_from: list[str] = []  # a split was found: copy one of these
        self.last_resync = -math.inf
        self.resyncs = 0
        self.store = statesync.SnapshotStore()  # what we serve joiners (SPSA)
        self.blame: Counter[str] = Counter()  # donors that sent junk or failed us
        # A public swarm's admission rule: (peer id, its published token) -> may it take
        # part? None: everyone may. Verdicts are cached per (peer, token).
        self.admit: Callable[[str, bytes | None], bool] | None = None
        self.verdicts: dict[tuple[str, bytes | None], bool] = {}
        self.sealer: Sealer | None = None  # signing on: every frame sealed (sealing.py)
        self.last_wait = 0.0  # seconds the last step waited for its step or round to close
        self.last_said = (self.t0, self.poll.progress)  # (time, step) of the last line

    @staticmethod
    def now() -> float:
        return time.monotonic()

    # -- every call into the algorithm goes through here
    def _call(self, fn: Callable[..., Any] | None, args: tuple) -> tuple[Any, Poll]:
        res = fn(*args) if fn is not None else None
        a = self.algo
        if isinstance(a, SPSA):
            self.store.add(a.snap)
        else:
            self.store.add_outer(a.round, lambda: outersync.outer_blob(a.export_state()))
        return res, Poll(can_step=a.can_step(), deadline=a.next_deadline(),
                         progress=A.progress(a), outbox=a.outbox(), mark=A.mark(a))

    async def act(self, fn: Callable[..., Any] | None, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        res, poll = await loop.run_in_executor(self.pool, self._call, fn, args)
        self.poll = poll
        if poll.mark is not None and poll.mark[0] not in self.marks:
            self.marks[poll.mark[0]] = poll.mark[1]
            for old in sorted(self.marks)[:-MAX_MARKS]:
                del self.marks[old]
        for send in poll.outbox:
            self._carry(send)
        self.kick.set()
        return res

    def _carry(self, send: Send) -> None:
        if self.sealer is not None:
            data = self.sealer.seal(send.msg)
            self._keep_sealed(send.msg, data)
        else:
            data = wire.encode(send.msg, swarm=self.plan.swarm)
        kind = type(send.msg).__name__
        targets = (self.peers | self.listeners) if send.to == EVERYONE else {send.to}
        if isinstance(send.msg, Record) and send.msg.step == self.plan.withhold_record:
            targets = set(sorted(targets - {self.algo.peer_id})[:1])
        for peer in sorted(targets - {self.algo.peer_id}):
            self.transport.send(peer, data, kind)

    # -- transport callbacks
    def admitted(self, peer: str, token: bytes | None) -> bool:
        if self.admit is None or peer == self.algo.peer_id:
            return True
        if (peer, token) not in self.verdicts:
            if len(self.verdicts) > MAX_BUFFERED:
                self.verdicts.clear()
            self.verdicts[peer, token] = self.admit(peer, token)
        return self.verdicts[peer, token]

    async def on_frame(self, sender: str, data: bytes) -> str:
        if not data:
            return "hello"
        m = self.members.get(sender)
        if not self.admitted(sender, None if m is None else m.token):
            self.rejects["not_admitted"] += 1
            return "rejected"
        try:
            if self.sealer is not None:  # its signer must be the sender
                msg = self.sealer.open(data, sender)
                self._keep_sealed(msg, data)
            else:
                msg = wire.decode(data, swarm=self.plan.swarm, ctx=self.ctx)
                if getattr(msg, "peer", sender) != sender:  # e.g. another's SPSA record
                    raise Rejected("spoofed_peer", f"{sender} sent {msg.peer}'s message")
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

    def _keep_sealed(self, msg: Any, data: bytes) -> None:
        """Keep a sealed SPSA record for the logs we serve, if its step is near ours (our
        own position: the others' is only what they claim)."""
        self.sealer.keep(msg, data, self.poll.progress - HISTORY_STEPS,
                         self.poll.progress + SEALED_AHEAD)

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
        members = {p: m for p, m in members.items() if self.admitted(p, m.token)}
        self.members = members
        now = self.now()
        self.heard = {p: t for p, t in self.heard.items() if now - t < self.plan.peer_ttl}
        # NoLoCo/DiLoCo: a member still downloading the state takes no part yet, and
        # waiting for its share would stall a round. (SPSA keeps waiting for a joiner's
        # records: closing steps without it would leave it behind the swarm's finality,
        # and its first records too late for anyone but itself: a split.)
        self.listeners = frozenset(
            p for p, m in members.items()
            if m.syncing and p != self.algo.peer_id and not isinstance(self.algo, SPSA))
        live = ((frozenset(members) - self.listeners) | frozenset(self.heard)
                | {self.algo.peer_id})
        if live != self.peers:
            self.peers = live
            if self.ready:
                await self.act(self.algo.on_peers, live, now)
        if self.ready and not self.resync_from and now - self.last_resync > 2 * self.plan.peer_ttl:
            donors = A.outvoted(self.marks, members, self.algo.peer_id)
            if donors:
                self.resync_from = donors
                self.say(f"our replica split from {len(donors)} peer(s): resyncing")
        self.kick.set()

    def recent_marks(self) -> dict[int, str]:
        """What our heartbeat publishes: the latest few marks (heartbeats of different
        peers come at different steps, so one mark each would rarely meet), and those of
        the snapshots we serve, so that a joiner finds several donors of one snapshot."""
        steps = sorted(self.marks)[-A.MARKS_PUBLISHED:] + sorted(self.store.blobs)
        return {t: self.marks[t] for t in sorted(set(steps)) if t in self.marks}

    async def serve_state(self, request: bytes) -> bytes:
        """A donor's whole state (``sync_from``)."""
        if request != STATE_REQUEST:
            raise Rejected("bad_request", "not a state request")
        state = await self.act(A.sync_state, self.algo)
        return await asyncio.get_running_loop().run_in_executor(None, A.dumps, state)

    async def serve_snap(self, request: bytes) -> bytes:
        """An index, a chunk or the record log of a served SPSA snapshot (statesync.py),
        or of our outer state at a round (outersync.py)."""
        op, step, index = statesync.parse_request(request)
        if op == "log":
            if not isinstance(self.algo, SPSA):
                return b""
            blob = statesync.log_blob if self.sealer is None else self.sealer.log_blob
            return await self.act(lambda: blob(self.algo.closed, self.algo.log_since(step)))
        return await self.act(self.store.answer, op, step, index)

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
        running = lambda: any(A.needs_sync(self.algo, self.poll.progress, m.progress)
                              for m in self.members.values())
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
            donors = sorted((m.progress, peer) for peer, m in self.members.items()
                            if A.needs_sync(self.algo, self.poll.progress, m.progress))
            await self.catch_up([peer for _, peer in reversed(donors)])
        elif need > 1:
            # A new swarm: the others see the quorum a heartbeat or two after us. Starting
            # at once would put us a round ahead of a peer that has not seen it yet.
            await asyncio.sleep(p.announce_wait)
        await self.go_live()
        return None

    async def catch_up(self, donors: list[str]) -> None:
        """SPSA: a marked snapshot from several of ``donors`` in checked chunks, then the
        records since; NoLoCo/DiLoCo: the outer state several donors hold, in checked
        chunks (outersync.py); if that fails, one donor's whole state."""
        for attempt in (0, 1):  # a snapshot gone by the time we ask: read marks again
            try:
                if await self._download(donors):
                    return
                break  # an SPSA swarm younger than its first served snapshot
            except Rejected as e:
                self.rejects[e.reason] += 1
                self.say(f"chunked download failed ({e.reason}: {e})")
                if e.reason != "state_fetch_failed" or attempt:
                    break
                await asyncio.sleep(self.plan.announce_wait)
        self.say("trying whole states")
        await self.sync_from(donors[:3])

    async def _download(self, donors: list[str]) -> bool:
        """The state in checked chunks from several donors; False if there is none to ask
        for yet (no served SPSA snapshot); Rejected if the download failed."""
        if not isinstance(self.algo, SPSA):
            state, served, how = await outersync.download_outer(
                self.transport, donors, self.ctx.numel, self.blame)
            await self.act(A.load_sync_state, self.algo, state)
            self.say(f"synced from {len(served)} peer(s), outer state of round "
                     f"{state['round']} in checked chunks ({how}): now at step "
                     f"{self.poll.progress}")
            return True
        mark = statesync.choose_mark(self.members, self.algo.peer_id, set(donors))
        if mark is None:
            return False
        state, served = await statesync.download(
            self.transport, mark, self.ctx.numel, self.blame,
            statesync.parse_log if self.sealer is None else self.sealer.parse_log)
        await self.act(A.load_sync_state, self.algo, state)
        self.say(f"synced from {len(served)} peer(s), snapshot of step {mark[0]} in "
                 f"checked chunks: now at step {self.poll.progress}")
        return True

    async def go_live(self) -> None:
        if self.transport.beat_extra.pop("syncing", None):
            self.transport.beat_soon()
        await self.act(self.algo.on_peers, self.peers, self.now())
        self.ready = True
        buffered, self.buffer = self.buffer, []
        for sender, msg in buffered:  # what came while we synced, in arrival order
            await self.deliver(sender, msg)

    async def resync(self) -> None:
        """Copy a peer of the majority after a split (see the module docstring)."""
        donors, self.resync_from = self.resync_from, []
        self.ready = False  # what arrives meanwhile waits, as for a joiner
        await self.catch_up(donors)
        self.marks.clear()  # ours were of the split replica
        self.resyncs += 1
        self.last_resync = self.now()
        await self.go_live()

    async def sync_from(self, donors: list[str]) -> None:
        """Download a donor's state, trying each of ``donors`` in turn."""
        for peer in donors:
            try:
                blob = await self.transport.request(peer, "state", STATE_REQUEST,
                                                    A.state_limit(self.ctx.numel), 60.0)
                state = A.loads(blob)
                await self.act(A.load_sync_state, self.algo, state)
            except Rejected as e:
                self.rejects[e.reason] += 1
                continue
            except Exception as e:  # a donor that vanished or timed out: try the next
                self.rejects["state_fetch_failed"] += 1
                self.say(f"state download from {peer[-8:]} failed: {type(e).__name__}")
                continue
            self.say(f"synced from {peer[-8:]}: now at step {self.poll.progress}")
            return
        self.say("could not download state from any peer; keeping our own")

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
            if not await self.wait_until(lambda: self.poll.can_step, abort_on_stop=True):
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
        if evaluate or step % 10 == 0:
            t0, s0 = self.last_said
            self.last_said = (self.now(), step)
            self.say(report.line(row, (step - s0) / max(self.now() - t0, 1e-9)))

    def seconds(self) -> float:
        return self.seconds_before + self.now() - self.t0

    async def save(self) -> None:
        state = await self.act(A.full_state, self.algo)
        await self.checkpoint({"state": state, "seconds": self.seconds(),
                               "sent": dict(self.transport.sent),
                               "received": dict(self.transport.received)})

    def summary(self) -> dict[str, Any]:
        return report.summary(self)
