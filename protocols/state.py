"""State on the wire: what a donor serves a joiner, as versioned, bounded msgpack.

Theory of operation
-------------------
A joiner downloads state from peers it does not trust. Every piece has one format here,
an array that opens with ``[VERSION, kind, ...]``:

- ``snap``: an SPSA snapshot (step, ĝ² average, pending scales, spot-check bans and
  strikes, θ as little-endian fp32);
- ``outer``: a NoLoCo/DiLoCo outer state (round, φ, outer momentum);
- ``index``: the size, chunk size and sha256 of every chunk of a served blob;
- ``log``: SPSA records since a step (the peer ids once, then fixed-size entries);
- ``sealed``: the same records as signed envelopes (node/sealing.py opens them);
- ``request``: what a joiner asks a donor for;
- ``spsa`` and ``outer``: a donor's whole state, the fallback of a young swarm.

Encoders are deterministic (equal states give equal bytes), so donors of one state serve
one index, and a joiner can fetch its chunks from several of them.

Decoding allocates nothing the format does not allow. msgpack's own ``unpackb`` builds
every container an input declares before it looks inside (10 KB of nested array headers
that each claim 4,096 items cost ~30 MB), so decoders here walk the input with a
``Reader``: arrays are read as headers whose lengths are checked first, scalars one at a
time under tight limits (no maps, no extension types, arrays of at most 4 items inside a
scalar read), bins bounded by what the field may hold. Every failure is
``Rejected(reason)``, ``bad_state`` for state and ``bad_request`` for requests.

Values the decoders return are in range but not yet trusted: whether a snapshot has the
fingerprint its donors vouched for is the catch-up's question, and the algorithm's
``import_state`` checks shapes once more.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import torch
from byteswarm.optim.inner import OuterState
from byteswarm.optim.sansio import Rejected
from byteswarm.optim.spsa import (
    MAX_OPEN_STEPS,
    MAX_PEERS_PER_STEP,
    Q_MAX,
    RecordLog,
    Snapshot,
    SPSAState,
)

VERSION = 2  # 2: snapshots carry the spot-check verdicts
CHUNK = 1 << 18  # bytes per hashed chunk of a served blob
MAX_STEP = 1 << 62
MAX_PEER_ID = 128  # characters
MAX_LOG_PEERS = 1 << 16  # distinct authors in one log (indexed by a u16)
MAX_LOG_RECORDS = 1 << 20  # records in one log (11 bytes each)
MAX_SEALED = 1 << 16  # envelopes in one sealed log
MAX_ENVELOPE = 1024  # bytes of one sealed record
MAX_VERDICTS = 1 << 16  # bans, and strikes, in one snapshot
REQUEST_LIMIT = 64  # bytes of a request
OPS = ("index", "chunk", "log", "latest", "state", "indexes")
MAX_INDEXES = 16  # indexes in one "indexes" reply (a donor keeps a few served states)
ENTRY = struct.Struct("<qHb")  # a log entry: step, author index, q
SMALL = 64  # characters of a kind or op string


def _show(v: Any) -> str:
    """A rejected value, for a message: scalars shortened, containers by type only (the
    repr of 1,000 nested arrays would recurse past Python's limit)."""
    if v is None or type(v) in (bool, int, float, str, bytes):
        return repr(v)[:40]
    return type(v).__name__


class Reader:
    """A strict, allocation-bounded walk over one msgpack value (see the module docstring)."""

    def __init__(self, data: Any, *, max_bin: int, what: str, reason: str = "bad_state"):
        self.what, self.reason = what, reason
        if not isinstance(data, (bytes, bytearray)):
            self.fail("not bytes")
        self.u = msgpack.Unpacker(max_buffer_size=max(1, len(data)), raw=False,
                                  max_str_len=max(SMALL, MAX_PEER_ID), max_bin_len=max_bin,
                                  max_array_len=4, max_map_len=0, max_ext_len=0)
        self.u.feed(data)

    def fail(self, detail: str) -> None:
        raise Rejected(self.reason, f"{self.what}: {detail}"[:200])

    def _do(self, fn: Any) -> Any:
        try:
            return fn()
        except (msgpack.OutOfData, ValueError, TypeError, msgpack.FormatError,
                msgpack.StackError, UnicodeDecodeError) as e:
            self.fail(f"unreadable ({type(e).__name__})")

    def array(self, lo: int, hi: int) -> int:
        n = self._do(self.u.read_array_header)
        if not lo <= n <= hi:
            self.fail(f"an array of {n} items, not {lo}..{hi}")
        return n

    def value(self) -> Any:
        return self._do(self.u.unpack)

    def int(self, lo: int, hi: int, name: str) -> int:
        v = self.value()
        if type(v) is not int or not lo <= v <= hi:
            self.fail(f"{name}={_show(v)}")
        return v

    def float(self, name: str, *, none: bool = False) -> float | None:
        """A finite, non-negative float (or None, if allowed)."""
        v = self.value()
        if none and v is None:
            return None
        if type(v) is not float or not math.isfinite(v) or v < 0:
            self.fail(f"{name}={_show(v)}")
        return v

    def str(self, name: str, choices: tuple[str, ...] | None = None) -> str:
        v = self.value()
        if not isinstance(v, str) or not v or (choices is not None and v not in choices):
            self.fail(f"{name}={_show(v)}")
        return v

    def bin(self, name: str, *, size: int | None = None, most: int | None = None) -> bytes:
        v = self.value()
        if not isinstance(v, bytes) or (size is not None and len(v) != size) \
                or (most is not None and len(v) > most):
            self.fail(f"{name} is not the bytes it should be")
        return v

    def version(self) -> None:
        v = self.value()
        if type(v) is not int or v != VERSION:
            self.fail(f"unknown version {_show(v)}")

    def head(self, kind: str, items: int) -> None:
        """``[VERSION, kind, ...]`` with ``items`` items in all."""
        self.array(items, items)
        self.version()
        if self.value() != kind:
            self.fail(f"not a {kind}")

    def end(self) -> None:
        try:
            self.u.unpack()
        except msgpack.OutOfData:
            return
        except Exception:  # trailing junk that does not even parse
            pass
        self.fail("trailing bytes")


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _vector_bytes(v: torch.Tensor) -> bytes:
    return v.detach().cpu().contiguous().numpy().astype("<f4").tobytes()


def _vector(raw: bytes, r: Reader, name: str) -> torch.Tensor:
    vec = torch.frombuffer(bytearray(raw), dtype=torch.float32)
    if not bool(torch.isfinite(vec).all()):
        r.fail(f"{name} is not finite")
    return vec


# --- SPSA snapshot -------------------------------------------------------------------------

def pack_snapshot(snap: Snapshot) -> bytes:
    """[2, "snap", step, ĝ² average | nil, [t, S_t, …] sorted, [peer, first refused step,
    …] sorted, [peer, failed step, …] sorted, θ]."""
    scales = [x for t in sorted(snap.scales) for x in (t, float(snap.scales[t]))]
    bans = [x for p in sorted(snap.bans) for x in (p, snap.bans[p])]
    strikes = [x for p in sorted(snap.strikes) for t in sorted(snap.strikes[p]) for x in (p, t)]
    return _pack([VERSION, "snap", snap.step, snap.g2, scales, bans, strikes,
                  _vector_bytes(snap.theta)])


def _read_snapshot(r: Reader, numel: int) -> Snapshot:
    r.head("snap", 8)
    step = r.int(-1, MAX_STEP, "step")
    g2 = r.float("g2", none=True)
    scales = {}
    for _ in range(_pairs(r, MAX_OPEN_STEPS, "scales")):
        t = r.int(0, MAX_STEP, "scale step")
        scales[t] = r.float("scale")
    bans: dict[str, int] = {}
    for _ in range(_pairs(r, MAX_VERDICTS, "bans")):
        peer = r.str("peer id")  # at most MAX_PEER_ID: the unpacker bounds strings
        if peer in bans:
            r.fail("a peer banned twice")
        bans[peer] = r.int(0, MAX_STEP, "ban step")
    strikes: dict[str, tuple[int, ...]] = {}
    for _ in range(_pairs(r, MAX_VERDICTS, "strikes")):
        peer = r.str("peer id")  # at most MAX_PEER_ID: the unpacker bounds strings
        strikes[peer] = (*strikes.get(peer, ()), r.int(0, max(step, 0), "strike step"))
    theta = _vector(r.bin("θ", size=4 * numel), r, "θ")
    return Snapshot(step, theta, g2, scales, bans, strikes)


def _pairs(r: Reader, most: int, name: str) -> int:
    n = r.array(0, 2 * most)
    if n % 2:
        r.fail(f"{name} are not pairs")
    return n // 2


def parse_snapshot(blob: bytes, numel: int) -> Snapshot:
    r = Reader(blob, max_bin=4 * numel, what="snapshot")
    snap = _read_snapshot(r, numel)
    r.end()
    return snap


# --- NoLoCo/DiLoCo outer state ------------------------------------------------------------

def pack_outer(state: OuterState) -> bytes:
    """[2, "outer", round, φ, outer momentum], vectors as little-endian fp32."""
    return _pack([VERSION, "outer", state.round, _vector_bytes(state.phi),
                  _vector_bytes(state.momentum)])


def parse_outer(blob: bytes, numel: int) -> OuterState:
    r = Reader(blob, max_bin=4 * numel, what="outer state")
    r.head("outer", 5)
    round_ = r.int(0, MAX_STEP, "round")
    phi = _vector(r.bin("φ", size=4 * numel), r, "φ")
    momentum = _vector(r.bin("momentum", size=4 * numel), r, "momentum")
    r.end()
    return OuterState(round_, phi, momentum)


# --- index of a served blob ------------------------------------------------------------

@dataclass(frozen=True)
class Index:
    """A served blob's description: fetch chunk i, check it against ``hashes[i]``."""

    tag: int  # the step or round of the state
    size: int  # bytes
    chunk: int  # bytes per chunk (the last may be shorter)
    hashes: tuple[bytes, ...]  # sha256 of each chunk

    def chunk_size(self, i: int) -> int:
        return min(self.chunk, self.size - i * self.chunk)


def make_index(tag: int, blob: bytes, chunk: int = CHUNK) -> bytes:
    """[2, "index", tag, size, chunk, sha256 of each chunk, concatenated]."""
    hashes = b"".join(hashlib.sha256(blob[i:i + chunk]).digest()
                      for i in range(0, len(blob), chunk))
    return _pack([VERSION, "index", tag, len(blob), chunk, hashes])


def parse_index(data: bytes, tag: int | None, limit: int) -> Index:
    """A donor's index of a blob of at most ``limit`` bytes at ``tag`` (None: any tag)."""
    r = Reader(data, max_bin=32 * (limit // 1024 + 1), what="index")
    r.head("index", 6)
    got = r.int(0, MAX_STEP, "tag")
    if tag is not None and got != tag:
        r.fail(f"tag {got}, asked for {tag}")
    size = r.int(1, limit, "size")
    chunk = r.int(1024, 1 << 24, "chunk")
    n = -(-size // chunk)
    hashes = r.bin("hashes", size=32 * n)
    r.end()
    return Index(got, size, chunk, tuple(hashes[32 * i:32 * (i + 1)] for i in range(n)))


def pack_indexes(indexes: list[bytes]) -> bytes:
    """[2, "indexes", [index bytes, …]]: every state a donor serves, oldest first."""
    return _pack([VERSION, "indexes", indexes[-MAX_INDEXES:]])


def parse_indexes(data: bytes, limit: int) -> list[tuple[bytes, Index]]:
    """A donor's indexes, each as (its bytes, parsed), of blobs of at most ``limit`` bytes;
    at most one per tag."""
    most = 256 + 32 * (limit // 1024 + 1)
    r = Reader(data, max_bin=most, what="indexes")
    r.head("indexes", 3)
    raw = [r.bin("index", most=most) for _ in range(r.array(0, MAX_INDEXES))]
    r.end()
    out = [(b, parse_index(b, None, limit)) for b in raw]
    if len({idx.tag for _, idx in out}) != len(out):
        r.fail("two indexes of one tag")
    return out


# --- SPSA record logs ----------------------------------------------------------------------

def pack_log(log: RecordLog) -> bytes:
    """[2, "log", closed, [peer ids sorted], entries]: each entry 11 bytes (<qHb: step,
    index into the peer ids, q), sorted by (step, peer)."""
    peers = sorted({p for recs in log.records.values() for p in recs})
    at = {p: i for i, p in enumerate(peers)}
    entries = b"".join(ENTRY.pack(t, at[p], q) for t in sorted(log.records)
                       for p, q in sorted(log.records[t].items()))
    return _pack([VERSION, "log", log.closed, peers, entries])


def parse_log(data: bytes, after: int) -> RecordLog:
    """A donor's records of the steps after ``after`` (a snapshot's step)."""
    r = Reader(data, max_bin=ENTRY.size * MAX_LOG_RECORDS, what="record log")
    r.head("log", 5)
    closed = r.int(after, after + MAX_OPEN_STEPS, "closed")
    peers = [r.str("peer id") for _ in range(r.array(0, MAX_LOG_PEERS))]
    if len(set(peers)) != len(peers):
        r.fail("a peer id twice")
    raw = r.bin("entries")
    r.end()
    if len(raw) % ENTRY.size:
        r.fail("entries are not whole")
    records: dict[int, dict[str, int]] = {}
    for t, i, q in ENTRY.iter_unpack(raw):
        if not (after < t <= closed + MAX_OPEN_STEPS and i < len(peers) and abs(q) <= Q_MAX):
            r.fail(f"entry ({t}, {i}, {q}) out of range")
        step = records.setdefault(t, {})
        if peers[i] in step or len(step) >= MAX_PEERS_PER_STEP:
            r.fail(f"step {t}: a duplicate or too many records")
        step[peers[i]] = q
    if len(records) > MAX_OPEN_STEPS + (closed - after):
        r.fail("too many steps")
    return RecordLog(closed, records)


def pack_sealed_log(closed: int, envelopes: list[bytes]) -> bytes:
    """[2, "sealed", closed, [envelope, …]]: records signed by their authors."""
    return _pack([VERSION, "sealed", closed, envelopes[:MAX_SEALED]])


def parse_sealed_log(data: bytes, after: int) -> tuple[int, list[bytes]]:
    """(closed, envelopes) of a donor's sealed log; each envelope is opened by the caller."""
    r = Reader(data, max_bin=MAX_ENVELOPE, what="sealed record log")
    r.head("sealed", 4)
    closed = r.int(after, after + MAX_OPEN_STEPS, "closed")
    envelopes = [r.bin("envelope", most=MAX_ENVELOPE) for _ in range(r.array(0, MAX_SEALED))]
    r.end()
    return closed, envelopes


# --- what a donor serves ------------------------------------------------------------------

def pack_served(state: Snapshot | OuterState) -> bytes:
    """A served state's bytes: an SPSA snapshot, or an outer state."""
    return pack_snapshot(state) if isinstance(state, Snapshot) else pack_outer(state)


def parse_served(blob: bytes, numel: int) -> Snapshot | OuterState:
    """The inverse of ``pack_served``; the algorithm's ``import_state`` checks the type."""
    r = Reader(blob, max_bin=0, what="served state")
    r.array(5, 8)  # an outer state, or a snapshot
    r.version()
    kind = r.str("kind", ("snap", "outer"))
    return parse_snapshot(blob, numel) if kind == "snap" else parse_outer(blob, numel)


# --- a donor's whole state (a young swarm's fallback) ------------------------------------

def pack_state(state: SPSAState | OuterState) -> bytes:
    """SPSA: [2, "spsa", snapshot bytes, log bytes]; NoLoCo/DiLoCo: the outer state."""
    if isinstance(state, OuterState):
        return pack_outer(state)
    log = pack_log(RecordLog(state.closed, state.records))
    return _pack([VERSION, "spsa", pack_snapshot(state.snap), log])


def parse_state(blob: bytes, numel: int) -> SPSAState | OuterState:
    """The inverse of ``pack_state``, every piece checked."""
    r = Reader(blob, max_bin=len(blob) if isinstance(blob, (bytes, bytearray)) else 0,
               what="state")
    n = r.array(4, 5)
    r.version()
    kind = r.str("kind", ("spsa", "outer"))
    if kind == "outer":
        return parse_outer(blob, numel)
    if n != 4:
        r.fail("an SPSA state has 4 items")
    snap = parse_snapshot(r.bin("snapshot", most=4 * numel + (1 << 20)), numel)
    log = parse_log(r.bin("log"), snap.step)
    r.end()
    return SPSAState(snap, log.closed, log.records)


# --- requests ------------------------------------------------------------------------------

def pack_request(op: str, tag: int = 0, index: int = 0) -> bytes:
    return _pack([VERSION, op, tag, index])


def parse_request(data: bytes) -> tuple[str, int, int]:
    """(op, tag, chunk index) of a joiner's request."""
    if not isinstance(data, (bytes, bytearray)) or len(data) > REQUEST_LIMIT:
        raise Rejected("bad_request", "not a request")
    r = Reader(data, max_bin=0, what="request", reason="bad_request")
    r.array(4, 4)
    r.version()
    op = r.str("op", OPS)
    tag = r.int(0, MAX_STEP, "tag")
    index = r.int(0, 1 << 20, "index")
    r.end()
    return op, tag, index
