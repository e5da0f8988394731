"""A joiner's SPSA state download: from several peers, in chunks, every chunk checked.

Theory of operation
-------------------
Honest SPSA replicas are bit-identical at every final step, and every peer publishes with
its heartbeat the fingerprints of θ at its latest marked final steps (driver.py). Every
``SERVE_EVERY`` final steps a peer also keeps its snapshot there, serialized
(``snapshot_blob``: deterministic, so equal snapshots give equal bytes), in a
``SnapshotStore`` of the latest ``KEEP``.

A joiner (``download``) picks the served step that the most peers published with one
fingerprint (``choose_mark``) and asks those peers, at most ``DONORS``, for the index of
their snapshot there: its size, the chunk size and the sha256 of every chunk. It keeps the
index that most donors sent, fetches the chunks from all donors that sent it, in turn and
several at once, and checks each against its hash; a chunk that fails or does not come is
fetched from the next donor and counted against the first. The assembled θ must have the
published fingerprint. Then each donor sends its records since that step (``log``); their
union, with ``replay``, rebuilds the current θ.

Limits. In a swarm that does not sign (a plain ``byteswarm node``), the records of the log
are taken on the donors' word: two donors that disagree on a record abort the download. A
signing swarm serves sealed records (node/sealing.py): a donor can omit records, which
another donor's log fills in, but cannot alter one. A swarm younger than
``SERVE_EVERY`` final steps, and NoLoCo and DiLoCo (whose replicas are not identical),
download one donor's whole state instead (``Driver.sync_from``).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack
import torch
from byteswarm.optim.sansio import Rejected
from byteswarm.optim.spsa import Snapshot, fingerprint_of

from .transport import Member, Transport

SERVE_EVERY = 40  # final steps between served snapshots (a multiple of algos.MARK_EVERY)
KEEP = 4  # served snapshots kept (heartbeats are seconds old when a joiner asks)
CHUNK = 1 << 18  # bytes
DONORS = 4
PARALLEL = 4  # chunk requests in flight
REQUEST_LIMIT = 64  # bytes of a request
TIMEOUT = 30.0  # seconds per request


# --- the snapshot as bytes ----------------------------------------------------------------

def snapshot_blob(snap: Snapshot) -> bytes:
    """[step, ĝ² average, [[step, scale], …] sorted, θ as little-endian fp32 bytes]."""
    theta = snap.theta.detach().cpu().contiguous().numpy().astype("<f4").tobytes()
    scales = [[t, snap.scales[t]] for t in sorted(snap.scales)]
    return msgpack.packb([snap.step, snap.g2, scales, theta])


def parse_snapshot(blob: bytes, numel: int) -> Snapshot:
    try:
        step, g2, scales, theta = msgpack.unpackb(blob)
    except Exception:  # msgpack's own errors, or the wrong shape of list
        raise Rejected("bad_state", "snapshot is not [step, g2, scales, theta]") from None
    ok_float = lambda v: type(v) is float and math.isfinite(v) and v >= 0
    if not (type(step) is int and step >= 0 and (g2 is None or ok_float(g2))
            and isinstance(scales, list) and len(scales) < 4096
            and all(isinstance(x, list) and len(x) == 2 and type(x[0]) is int
                    and ok_float(x[1]) for x in scales)
            and isinstance(theta, bytes) and len(theta) == 4 * numel):
        raise Rejected("bad_state", "snapshot fields out of range")
    vec = torch.frombuffer(bytearray(theta), dtype=torch.float32)
    if not bool(torch.isfinite(vec).all()):
        raise Rejected("bad_state", "snapshot θ is not finite")
    return Snapshot(step, vec, g2, {t: v for t, v in scales})


def make_index(step: int, blob: bytes) -> bytes:
    hashes = [hashlib.sha256(blob[i:i + CHUNK]).digest() for i in range(0, len(blob), CHUNK)]
    return msgpack.packb({"step": step, "size": len(blob), "chunk": CHUNK, "sha256": hashes})


def parse_index(data: bytes, step: int | None, limit: int) -> dict[str, Any]:
    """A donor's index of the blob at ``step`` (None: at any step it names)."""
    try:
        idx = msgpack.unpackb(data)
        size, chunk, hashes = idx["size"], idx["chunk"], idx["sha256"]
        ok = (idx["step"] == step if step is not None else
              type(idx["step"]) is int and 0 <= idx["step"] < 1 << 62)
        ok = (ok and type(size) is int and 0 < size <= limit
              and type(chunk) is int and 1024 <= chunk <= 1 << 24
              and isinstance(hashes, list) and len(hashes) == -(-size // chunk)
              and all(isinstance(h, bytes) and len(h) == 32 for h in hashes))
    except Exception:  # msgpack errors, missing keys, wrong types
        ok = False
    if not ok:
        raise Rejected("bad_state", "snapshot index malformed")
    return idx


# --- the donor side -----------------------------------------------------------------------

class SnapshotStore:
    """Serialized snapshots at the latest ``KEEP`` served steps, and their indexes."""

    def __init__(self) -> None:
        self.blobs: dict[int, bytes] = {}

    def add(self, snap: Snapshot) -> None:
        if snap.step > 0 and snap.step % SERVE_EVERY == 0 and snap.step not in self.blobs:
            self.blobs[snap.step] = snapshot_blob(snap)
            for old in sorted(self.blobs)[:-KEEP]:
                del self.blobs[old]

    def add_outer(self, round_: int, make: Callable[[], bytes]) -> None:
        """NoLoCo/DiLoCo: keep ``make()``, our outer state, once per round (node/outersync.py)."""
        if round_ > 0 and round_ not in self.blobs:
            self.blobs[round_] = make()
            for old in sorted(self.blobs)[:-KEEP]:
                del self.blobs[old]

    def answer(self, op: str, step: int, index: int) -> bytes | None:
        """The index or a chunk of the snapshot at ``step``, or the index of the latest we
        hold (``latest``); None for ``log`` requests (the algorithm answers those); b"" if
        we do not hold it."""
        if op == "latest":
            step = max(self.blobs, default=-1)
        blob = self.blobs.get(step)
        if op in ("index", "latest"):
            return b"" if blob is None else make_index(step, blob)
        if op == "chunk":
            return b"" if blob is None else blob[index * CHUNK:(index + 1) * CHUNK]
        return None


def parse_request(data: bytes) -> tuple[str, int, int]:
    try:
        op, step, index = msgpack.unpackb(data)
        if op in ("index", "chunk", "log", "latest") and type(step) is int and type(index) is int \
                and 0 <= step < 1 << 62 and 0 <= index < 1 << 20:
            return op, step, index
    except Exception:  # msgpack errors, or not three items
        pass
    raise Rejected("bad_request", "snapshot request malformed")


# --- the joiner side ----------------------------------------------------------------------

def choose_mark(members: dict[str, Member], me: str,
                among: set[str] | None = None) -> tuple[int, str, list[str]] | None:
    """(step, fingerprint, peers) of the latest served step that at least two peers
    published alike (or, if none did, that the most did; the latest among equals), or None
    if nobody published one. Latest, because donors keep only their last ``KEEP``
    snapshots and their heartbeats are seconds old."""
    votes: dict[tuple[int, str], list[str]] = {}
    for peer, m in members.items():
        if peer != me and (among is None or peer in among):
            for step, fp in m.marks.items():
                if step % SERVE_EVERY == 0 and step > 0:
                    votes.setdefault((step, fp), []).append(peer)
    if not votes:
        return None
    enough = min(2, max(map(len, votes.values())))
    (step, fp), peers = max(((k, v) for k, v in votes.items() if len(v) >= enough),
                            key=lambda kv: (kv[0][0], len(kv[1])))
    return step, fp, sorted(peers)[:DONORS]


async def ask_all(tr: Transport, donors: list[str], request: bytes, limit: int,
                  blame: Counter[str]) -> dict[str, bytes | None]:
    """Each donor's answer to one ``snap`` request, None for those that failed or had none."""
    async def one(peer: str) -> bytes | None:
        try:
            return await tr.request(peer, "snap", request, limit, TIMEOUT) or None
        except Exception:  # gone, slow, or junk: another donor may do
            blame[peer] += 1
            return None
    return dict(zip(donors, await asyncio.gather(*map(one, donors)), strict=True))


async def fetch_blob(tr: Transport, peers: list[str], step: int, idx: dict[str, Any],
                     blame: Counter[str], served: set[str]) -> bytes:
    """The blob ``idx`` describes, its chunks spread over ``peers`` (all of which sent that
    index), each checked against its hash; a chunk that fails comes from the next peer."""
    chunks: list[bytes | None] = [None] * len(idx["sha256"])
    gate = asyncio.Semaphore(PARALLEL)

    async def fetch(i: int) -> None:
        want = min(idx["chunk"], idx["size"] - i * idx["chunk"])
        for k in range(len(peers)):
            peer = peers[(i + k) % len(peers)]
            try:
                async with gate:
                    data = await tr.request(peer, "snap", msgpack.packb(["chunk", step, i]),
                                            want, TIMEOUT)
            except Exception:  # try the next donor
                blame[peer] += 1
                continue
            if len(data) == want and hashlib.sha256(data).digest() == idx["sha256"][i]:
                chunks[i] = data
                served.add(peer)
                return
            blame[peer] += 1
        raise Rejected("bad_state", f"chunk {i}: no donor sent bytes with its hash")

    await asyncio.gather(*(fetch(i) for i in range(len(chunks))))
    return b"".join(chunks)


async def download(tr: Transport, mark: tuple[int, str, list[str]], numel: int,
                   blame: Counter[str],
                   read_log: Callable[[bytes, int], dict[str, Any]] | None = None,
                   ) -> tuple[dict[str, Any], list[str]]:
    """The SPSA state at the donors' position, as ``algos.load_sync_state`` takes it, and
    the donors that served chunks. ``read_log`` parses a donor's record log (default
    ``parse_log``; a signing node checks sealed records). Raises Rejected if no
    consistent state came."""
    read_log = read_log or parse_log
    step, fp, donors = mark
    ask = lambda op: msgpack.packb([op, step, 0])
    answers = await ask_all(tr, donors, ask("index"), 1 << 20, blame)
    groups = Counter(a for a in answers.values() if a is not None)
    if not groups:
        raise Rejected("state_fetch_failed", f"no donor holds the snapshot at step {step}")
    best, _ = groups.most_common(1)[0]
    idx = parse_index(best, step, 4 * numel + (1 << 20))
    agree = [p for p, a in answers.items() if a == best]
    for p, a in answers.items():
        if a is not None and a != best:
            blame[p] += 1
    served: set[str] = set()
    snap = parse_snapshot(await fetch_blob(tr, agree, step, idx, blame, served), numel)
    if fingerprint_of(snap.theta) != fp:
        raise Rejected("bad_state", f"snapshot at step {step} lacks the published fingerprint")
    closed, records = step, {}
    for peer in agree:
        try:
            log = read_log(await tr.request(peer, "snap", ask("log"), 1 << 24, TIMEOUT), step)
        except Exception:  # Rejected or transport errors: the others' logs may do
            blame[peer] += 1
            continue
        closed = max(closed, log["closed"])
        for t, recs in log["records"].items():
            mine = records.setdefault(t, {})
            for p, q in recs.items():
                if mine.setdefault(p, q) != q:
                    raise Rejected("bad_state", f"donors disagree on {p}'s record of step {t}")
    state = {"snap": {"step": snap.step, "theta": snap.theta, "g2": snap.g2,
                      "scales": snap.scales}, "closed": closed, "records": records}
    return state, sorted(served)


def log_blob(closed: int, records: dict[int, dict[str, int]]) -> bytes:
    return msgpack.packb({"closed": closed, "records": records})


def parse_log(data: bytes, step: int) -> dict[str, Any]:
    """A donor's records since ``step``; shapes checked here, ranges by load_sync_state."""
    try:
        log = msgpack.unpackb(data, strict_map_key=False)
        closed, records = log["closed"], log["records"]
        ok = (type(closed) is int and closed >= step and isinstance(records, dict)
              and all(type(t) is int and t > step and isinstance(r, dict)
                      for t, r in records.items()))
    except Exception:  # msgpack errors, missing keys
        ok = False
    if not ok:
        raise Rejected("bad_state", "record log malformed")
    return log
