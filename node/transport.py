"""Carrying bytes between peers: libp2p streams through hivemind's p2pd, membership in its DHT.

Theory of operation
-------------------
Messages. Each peer pair talks over long-lived libp2p streams opened with
``call_binary_stream_handler`` on the protocol ``/byteswarm/<swarm>/msg/1``. A stream
carries frames: an 8-byte big-endian length, then that many bytes (one wire message).
Streams have no size cap (protobuf unary calls stop at 4 MiB), so a NoLoCo share travels
as one frame, and libp2p chunks it. Either side may write on a stream whichever side
opened it, so a peer in client mode (not dialable, behind NAT) dials the others and
receives over the streams it opened. Every outgoing peer has a bounded queue and a sender
task; a full queue or a failed write drops the frame and counts it — the algorithms are
built to tolerate a lost message (a timeout, never a hang).

Incoming frames are read one at a time per stream and handed to ``on_frame``, which
returns the kind to count the bytes under; awaiting it before the next read is the flow
control. A frame header that claims more than ``frame_limit`` closes the stream before
anything is allocated. The sender of a frame is the stream's libp2p peer id, which the
transport's handshake has authenticated.

Membership. Every ``heartbeat_period`` seconds a peer stores a small record under the DHT
key ``<swarm>.peers`` with its peer id as the subkey and an expiration ``peer_ttl``
seconds ahead, then reads the key back: the unexpired subkeys are the live swarm. The
record holds the peer's progress, whether it is in client mode, whether it is still
downloading the swarm's state (``syncing``) and, for SPSA, its latest
marks (final steps and the fingerprint of θ at each), which the driver compares to find a
replica that split from the others.

Anyone can write to that key, so the record is signed with the node's identity key
(protocols/records.py: a few hundred bytes per heartbeat, the signature covering the key,
our peer id, the body and the expiration), and ``parse_members`` opens every entry it
reads again, whatever the DHT's validators did: a DHT peer that is not one of ours can
answer with anything. Refused entries are counted in ``events`` as
``heartbeat_<reason>``. A ``peer_ttl`` above ``records.MAX_TTL`` (300 s) is clipped to it
for the DHT entry, since other nodes refuse entries that live longer.
DHT expirations use ``get_dht_time()`` (wall clock, as hivemind requires); nothing else
here does.

Services. Request/response exchanges (a joiner's state download, protocols/catchup.py)
each have a protocol ``/byteswarm/<swarm>/<name>/1``: one request frame (bounded by the
service's own limit), one response frame (bounded by the caller's), then the stream closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from byteswarm.optim.sansio import Rejected
from byteswarm.protocols import records
from byteswarm.protocols.signing import peer_id_of_key, public_key_bytes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind import DHT
from hivemind.p2p import PeerID
from hivemind.utils.timed_storage import get_dht_time

HEADER = 8
QUEUE_FRAMES = 256  # per peer; beyond this the newest frame is dropped
DIAL_TIMEOUT = 5.0
SERVE_PER_PEER = 4  # requests one peer may have in service at once (a joiner's chunks)
SERVE_TOTAL = 16  # requests in service at once, from everyone
WRITE_TIMEOUT = 60.0  # seconds a reply may take to be read
MAX_MEMBERS = 4096  # entries read from the peers key; a flood of fake ones is cut here
MAX_MARKS = 16  # SPSA marks read from one heartbeat
MAX_TOKEN = 512  # bytes of an admission token in a heartbeat
PUBLISH_EVERY = 10  # heartbeats between re-stores of published values


@dataclass(frozen=True)
class Member:
    progress: int  # the peer's own count of steps (see driver.progress)
    client: bool  # in client mode: cannot be dialed
    marks: dict[int, str] = field(default_factory=dict)  # SPSA: final step -> fingerprint
    token: bytes | None = None  # a public swarm's admission token, as published
    syncing: bool = False  # downloading the swarm's state: not yet taking part


def parse_members(found: Any, now: float, *, key: str, limit: int = MAX_MEMBERS,
                  rejects: Counter[str] | None = None,
                  cache: dict[tuple, records.Entry] | None = None) -> dict[str, Member]:
    """The live entries of the peers key ``key``, each signed by the peer its subkey names
    (records.open_entry), read defensively: anyone can write to it. Refused entries are
    counted by reason in ``rejects``. ``cache`` (kept by the caller between reads, and
    pruned here to what this read found) spares a second signature check of an entry seen
    unchanged: its checks do not get weaker with time, except expiry, which is rechecked."""
    out: dict[str, Member] = {}
    entries = getattr(found, "value", None)
    if not isinstance(entries, dict):
        return out
    seen: dict[tuple, records.Entry] = {}
    for subkey, item in list(entries.items())[:limit]:
        data, expires = getattr(item, "value", None), getattr(item, "expiration_time", 0)
        if not (isinstance(expires, (int, float)) and expires > now):
            continue  # expired (or junk that says nothing): not a member, not an attack
        memo = ((subkey, data, expires) if isinstance(subkey, str) and isinstance(data, bytes)
                else None)
        try:
            entry = cache.get(memo) if cache is not None and memo is not None else None
            if entry is None:
                entry = records.open_entry(data, dht_key=key, subkey=subkey,
                                           expiration=expires, now=now)
        except Rejected as e:
            if rejects is not None:
                rejects[e.reason] += 1
            continue
        if memo is not None:
            seen[memo] = entry
        member = heartbeat_member(entry.body)
        if member is None:
            if rejects is not None:
                rejects["bad_body"] += 1
            continue
        out[subkey] = member
    if cache is not None:
        cache.clear()
        cache.update(seen)
    return out


def heartbeat_member(value: dict[str, Any]) -> Member | None:
    """A Member from a verified heartbeat body, or None if its fields are not ours."""
    progress, client = value.get("progress"), value.get("client")
    if not (type(progress) is int and progress >= 0 and isinstance(client, bool)):
        return None
    token = value.get("token")
    token = token if isinstance(token, bytes) and len(token) <= MAX_TOKEN else None
    return Member(progress, client, parse_marks(value.get("marks")), token,
                  value.get("syncing") is True)


def parse_marks(value: Any) -> dict[int, str]:
    """SPSA marks from a heartbeat, [[step, 16 hex digits], …]; junk entries are skipped."""
    out: dict[int, str] = {}
    if not isinstance(value, (list, tuple)):
        return out
    for item in value[:MAX_MARKS]:
        if (isinstance(item, (list, tuple)) and len(item) == 2 and type(item[0]) is int
                and 0 <= item[0] < 1 << 62 and isinstance(item[1], str)
                and re.fullmatch(r"[0-9a-f]{16}", item[1])):
            out[item[0]] = item[1]
    return out


async def read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    """One frame, or ValueError if its header claims more than ``limit`` bytes."""
    n = int.from_bytes(await reader.readexactly(HEADER), "big")
    if n > limit:
        raise ValueError(f"frame of {n} bytes > {limit}")
    return await reader.readexactly(n)


async def write_frame(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(len(data).to_bytes(HEADER, "big") + data)
    await writer.drain()


class Transport:
    """Frames to and from peers, and the live member set, for one node."""

    def __init__(self, dht: DHT, swarm: str, peer_id: str, *, client_mode: bool,
                 frame_limit: int, heartbeat_period: float, peer_ttl: float,
                 on_frame: Callable[[str, bytes], Awaitable[str]],
                 on_members: Callable[[dict[str, Member]], Awaitable[None]],
                 progress: Callable[[], int],
                 marks: Callable[[], dict[int, str]] = dict,
                 identity: Ed25519PrivateKey,
                 may_ask: Callable[[str], bool] = lambda peer: True):
        """``may_ask(peer)``: may ``peer`` use our services (the driver: is it a member
        of our view)? Anyone else is refused before its request is read."""
        self.dht, self.swarm, self.peer_id = dht, swarm, peer_id
        self.identity = identity  # signs our heartbeats
        if peer_id_of_key(public_key_bytes(identity)) != peer_id:
            raise ValueError("the identity key is not the key of our peer id")
        self.client_mode = client_mode
        self.frame_limit = frame_limit
        self.heartbeat_period, self.peer_ttl = heartbeat_period, peer_ttl
        self.on_frame, self.on_members = on_frame, on_members
        self.progress, self.marks = progress, marks
        self.msg_proto = f"/byteswarm/{swarm}/msg/1"
        self._services: dict[str, tuple[Callable[[bytes], Awaitable[bytes]], int]] = {}
        self.publish: dict[str, bytes] = {}  # DHT key -> value we keep stored
        self.beat_extra: dict[str, Any] = {}  # more fields of our heartbeat record
        self.members: dict[str, Member] = {}
        self.p2p: Any = None
        self._writers: dict[str, asyncio.StreamWriter] = {}
        self._queues: dict[str, asyncio.Queue[tuple[bytes, str]]] = {}
        self._arrived: dict[str, asyncio.Event] = {}  # a client-mode peer's stream came
        self._tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()  # beat now rather than at the next period
        self.sent: Counter[str] = Counter()  # bytes written, by message kind
        self.received: Counter[str] = Counter()  # bytes read, by message kind
        self._serving: Counter[str] = Counter()  # requests in service, by peer
        self.may_ask = may_ask
        self.events: Counter[str] = Counter()  # drops, failures, oversized frames, ...
        self._opened: dict[tuple, records.Entry] = {}  # heartbeats verified last read

    # -- lifecycle
    async def start(self) -> None:
        self.p2p = await self.dht.replicate_p2p()
        await self.p2p.add_binary_stream_handler(self.msg_proto, self._on_msg_stream)
        for name in self._services:
            await self.p2p.add_binary_stream_handler(self._proto(name),
                                                     functools.partial(self._serve, name))
        self._spawn(self._heartbeats())

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for w in self._writers.values():
            with contextlib.suppress(Exception):
                w.close()
        self._writers.clear()

    async def flush(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) until every queued frame has been written."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(q.join() for q in self._queues.values())),
                                   timeout)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- sending
    def send(self, peer: str, data: bytes, kind: str) -> None:
        """Queue one frame for ``peer``; never blocks (a full queue drops and counts)."""
        if peer == self.peer_id:
            return
        q = self._queues.get(peer)
        if q is None:
            q = self._queues[peer] = asyncio.Queue(QUEUE_FRAMES)
            self._spawn(self._sender(peer, q))
        try:
            q.put_nowait((data, kind))
        except asyncio.QueueFull:
            self.events["send_queue_full"] += 1

    async def _sender(self, peer: str, q: asyncio.Queue[tuple[bytes, str]]) -> None:
        while True:
            data, kind = await q.get()
            try:
                for attempt in (0, 1):  # a stale stream gets one redial
                    try:
                        writer = await self._writer_for(peer)
                        if writer is None:
                            self.events["unreachable"] += 1
                            break
                        await write_frame(writer, data)
                        self.sent[kind] += HEADER + len(data)
                        break
                    except Exception:  # OSError, timeouts, and p2pd's own error types
                        self._drop_writer(peer)
                        if attempt:
                            self.events["send_failed"] += 1
            finally:
                q.task_done()

    async def _writer_for(self, peer: str) -> asyncio.StreamWriter | None:
        w = self._writers.get(peer)
        if w is not None and not w.is_closing():
            return w
        if self.members.get(peer, Member(0, False)).client:
            # It cannot be dialed: it dials us (its first heartbeat does). Give that
            # stream a moment to arrive rather than drop what we have for it.
            arrived = self._arrived.setdefault(peer, asyncio.Event())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(arrived.wait(), DIAL_TIMEOUT)
            w = self._writers.get(peer)
            return w if w is not None and not w.is_closing() else None
        _, reader, writer = await asyncio.wait_for(
            self.p2p.call_binary_stream_handler(PeerID.from_base58(peer), self.msg_proto),
            DIAL_TIMEOUT)
        self._writers[peer] = writer
        self._spawn(self._read_frames(peer, reader, writer))
        return writer

    def _drop_writer(self, peer: str) -> None:
        w = self._writers.pop(peer, None)
        if w is not None:
            with contextlib.suppress(Exception):
                w.close()

    # -- receiving
    async def _on_msg_stream(self, info: Any, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        peer = info.peer_id.to_base58()
        if peer not in self._writers or self._writers[peer].is_closing():
            self._writers[peer] = writer  # so a peer that cannot be dialed hears back
            self._arrived.setdefault(peer, asyncio.Event()).set()
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await self._read_frames(peer, reader, writer)
        except asyncio.CancelledError:
            # We are closing. End the task normally: asyncio's stream callback (3.11)
            # calls task.exception() on it, which raises for a cancelled task.
            pass
        finally:
            self._tasks.discard(task)

    async def _read_frames(self, peer: str, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await read_frame(reader, self.frame_limit)
                kind = await self.on_frame(peer, data)
                self.received[kind] += HEADER + len(data)
        except ValueError:
            self.events["oversized_frame"] += 1
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass  # the peer closed the stream or went away
        finally:
            if self._writers.get(peer) is writer:
                self._drop_writer(peer)
            else:
                with contextlib.suppress(Exception):
                    writer.close()

    # -- services
    def add_service(self, name: str, handler: Callable[[bytes], Awaitable[bytes]],
                    request_limit: int) -> None:
        """Answer requests on ``/byteswarm/<swarm>/<name>/1`` (register before start)."""
        self._services[name] = (handler, request_limit)

    def _proto(self, name: str) -> str:
        return f"/byteswarm/{self.swarm}/{name}/1"

    async def _serve(self, name: str, info: Any, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        """One request, bounded: only members get an answer (``may_ask``), each peer has
        at most ``SERVE_PER_PEER`` requests in service and everyone together
        ``SERVE_TOTAL`` (a reply can pin a copy of the state until it is written), and a
        reply that is not read within ``WRITE_TIMEOUT`` is given up."""
        handler, limit = self._services[name]
        peer = info.peer_id.to_base58()
        counted = False
        try:
            if not self.may_ask(peer):
                self.events[f"{name}_not_member"] += 1
                return
            if self._serving[peer] >= SERVE_PER_PEER or \
                    sum(self._serving.values()) >= SERVE_TOTAL:
                self.events[f"{name}_busy"] += 1
                return
            self._serving[peer] += 1
            counted = True
            request = await asyncio.wait_for(read_frame(reader, limit), DIAL_TIMEOUT)
            reply = await handler(request)
            await asyncio.wait_for(write_frame(writer, reply), WRITE_TIMEOUT)
            self.sent[name] += HEADER + len(reply)
        except asyncio.CancelledError:
            pass  # we are closing
        except Exception:  # junk, oversized, slow or unread; a handler's Rejected
            self.events[f"bad_{name}_request"] += 1
        finally:
            if counted:
                self._serving[peer] -= 1
            if self._serving[peer] <= 0:
                del self._serving[peer]
            writer.close()

    async def request(self, peer: str, name: str, data: bytes, limit: int,
                      timeout: float) -> bytes:
        """One request to ``peer``'s service ``name``; raises on any failure (the caller
        tries another peer)."""
        async def go() -> bytes:
            _, reader, writer = await self.p2p.call_binary_stream_handler(
                PeerID.from_base58(peer), self._proto(name))
            try:
                await write_frame(writer, data)
                reply = await read_frame(reader, limit)
            finally:
                writer.close()
            self.received[name] += HEADER + len(reply)
            return reply
        return await asyncio.wait_for(go(), timeout)

    # -- membership
    @property
    def key(self) -> str:
        return records.peers_key(self.swarm)

    async def beat(self) -> None:
        """Store our signed heartbeat, read everyone's, report the live set."""
        value: dict[str, Any] = {"progress": int(self.progress()), "client": self.client_mode}
        marks = self.marks()
        if marks:
            value["marks"] = [[t, fp] for t, fp in marks.items()]
        value.update(self.beat_extra)
        expires = get_dht_time() + min(self.peer_ttl, records.MAX_TTL)
        entry = records.seal_entry(self.identity, dht_key=self.key, body=value,
                                   expiration=expires)
        await self.dht.store(self.key, entry, expires, subkey=self.peer_id,
                             return_future=True)
        found = await self.dht.get(self.key, latest=True, return_future=True)
        rejects: Counter[str] = Counter()
        members = parse_members(found, get_dht_time(), key=self.key, rejects=rejects,
                                cache=self._opened)
        self.events.update({f"heartbeat_{r}": n for r, n in rejects.items()})
        members[self.peer_id] = Member(int(self.progress()), self.client_mode, marks)
        self.members = members
        if self.client_mode:  # open our side now, so the others can write back
            for peer, m in members.items():
                if peer != self.peer_id and not m.client and peer not in self._queues:
                    self.send(peer, b"", "hello")
        await self.on_members(members)

    async def _heartbeats(self) -> None:
        beats = 0
        while True:
            try:
                if beats % PUBLISH_EVERY == 0:
                    ttl = min(3 * PUBLISH_EVERY * self.heartbeat_period + self.peer_ttl,
                              records.MANIFEST_MAX_TTL)  # validators refuse longer
                    for key, value in self.publish.items():
                        await self.dht.store(key, value, get_dht_time() + ttl,
                                             return_future=True)
                beats += 1
                await self.beat()
            except asyncio.CancelledError:
                raise
            except Exception:  # the DHT is best effort: a failed beat is retried next time
                self.events["heartbeat_failed"] += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.heartbeat_period)
            self._wake.clear()

    def beat_soon(self) -> None:
        """Publish our heartbeat now (``beat_extra`` changed), not a period from now."""
        self._wake.set()
