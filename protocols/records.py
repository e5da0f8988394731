"""Signed DHT records: what a swarm's nodes accept under its two DHT keys.

hivemind's DHT is a public whiteboard: any process that can reach one node can store any
value under any key, with any expiration, and the value with the latest expiration wins.
Before this module, three writes broke a swarm: a plain (non-dictionary) value at
``<swarm>.peers`` expiring in ten years hid the membership dictionary from every node
started after it; an entry under an honest peer's subkey, expiring years ahead, replaced
that peer's heartbeats; and junk at ``<swarm id>.manifest`` made every ``join`` fail. So
each key gets a rule that a value must prove, and every node checks it twice: when asked
to store (node/dhtrecords.py, a hivemind record validator) and when it reads
(node/transport.py), because a DHT peer that is not one of ours can return anything.

Membership: ``peers_key(swarm)`` holds a dictionary, one entry per peer, whose subkey is
the peer's libp2p id. An entry's value is bytes (``MAX_ENTRY`` at most)::

    msgpack [version = 1, body: bin, expiration: float64, signature: bin 64]

``body`` is msgpack of the heartbeat (a map with string keys; what the fields mean is
node/transport.py's business), at most ``MAX_BODY`` bytes. The signature is Ed25519 by the
key *inside the subkey* (an Ed25519 peer id is its public key, see protocols/signing.py)
over::

    ENTRY_TAG ‖ u16-be len(key) ‖ key ‖ u16-be len(subkey) ‖ subkey ‖ f64-be expiration ‖ body

so an entry can only ever stand under its signer's own subkey, only at the DHT key it was
signed for (not another swarm's), and only until the expiration it was signed with: the
DHT's own expiration may be earlier, never later (``expiration_mismatch``). There is no
timestamp of issue; hivemind already keeps, per subkey, the entry that expires last, so
an old entry replayed cannot displace a newer one of the same peer.

Expirations are capped: a signed expiration more than ``MAX_AHEAD`` seconds past the
reader's clock is refused (``too_far_ahead``). ``MAX_AHEAD`` is ``MAX_TTL`` (the longest a
node asks its heartbeat to live: 300 s, thirty default peer TTLs; node/transport.py clips
a longer ``peer_ttl`` to it) plus ``CLOCK_SLACK`` (60 s of clock difference between the
writer and the checker). So a peer that stops heartbeating is gone from everyone's view
within six minutes at worst, whatever it signed; an identity cannot linger for years.

``open_entry`` checks in this order, raising ``Rejected(reason)`` at the first problem,
cheapest first and the signature last but one: size (``oversized``), shape
(``malformed``), version (``bad_version``), fields (``bad_field``), the subkey
(``bad_peer_id``: not an Ed25519 peer id), the expiration (``bad_expiration``: not
finite; ``expiration_mismatch``; ``too_far_ahead``), the signature (``bad_signature``),
and only then decodes the body (``bad_body``). Authenticate first, parse second.

msgpack is decoded from at most ``MAX_ENTRY`` bytes with every length bounded (the
envelope: arrays of 4, no strings or maps; the body: arrays and maps of ``MAX_ITEMS``,
strings of ``MAX_STR``), so a header that claims a billion items is refused before
anything is allocated, and a nest of arrays reserves at most ``MAX_ITEMS`` slots a level
before msgpack's depth limit (1024) stops it: a few hundred kB for the worst 4 kB bomb.
A body that nests deeper than ``MAX_DEPTH`` is refused after decoding, by a loop (not
recursion), so nothing later can trip over it.

Manifest: ``manifest_key(swarm_id)`` holds one plain value, the signed manifest of that
swarm, and a value is accepted only if ``manifest.verify`` accepts it for that id: its
canonical bytes hash to the swarm id (protocols/swarmid.py) and its creator signed them.
The signature matters here too, not only the hash: the manifest's bytes are public, so
without it anyone could store them with a forged signature and a later expiration, and
every joiner would find that copy first. Its expiration is capped at ``MANIFEST_MAX_AHEAD``
(an hour, plus the slack); nodes re-store it far more often than that.

Pure: no clock (``now`` comes in), no IO, no hivemind.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
from byteswarm.optim.sansio import Rejected
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import manifest
from .signing import (
    MAX_PEER_ID,
    SIG_BYTES,
    pack,
    peer_id_of_key,
    public_key_bytes,
    public_key_of_peer,
    sign_bytes,
    verify_bytes,
)

VERSION = 1
ENTRY_TAG = b"byteswarm/dht-record/v1\0"
MAX_BODY = 4096  # bytes of a heartbeat body; a real one is ~100, ~700 with marks and token
MAX_ENTRY = MAX_BODY + 96  # the envelope adds 80: array, version, bin headers, float,
#                            signature
MAX_ITEMS = 64  # elements of any msgpack array or map in a body (a node publishes <= 32
#                 marks, readers use 16)
MAX_STR = 128  # characters of any msgpack string in an entry
MAX_DEPTH = 3  # containers in a body: the map, the marks list, a mark
MAX_TTL = 300.0  # seconds: the longest a node asks its heartbeat to live
CLOCK_SLACK = 60.0  # seconds of clock difference between writer and checker we tolerate
MAX_AHEAD = MAX_TTL + CLOCK_SLACK
MANIFEST_MAX_TTL = 3600.0  # seconds: the longest a node asks a manifest copy to live
MANIFEST_MAX_AHEAD = MANIFEST_MAX_TTL + CLOCK_SLACK
MAX_KEY = 256  # characters of a DHT key we sign for

_UNPACK_ERRORS = (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError,
                  TypeError, UnicodeDecodeError)


def peers_key(swarm: str) -> str:
    """The DHT key of a swarm's membership dictionary."""
    return f"{swarm}.peers"


def manifest_key(swarm_id: str) -> str:
    """The DHT key under which a public swarm's nodes keep its signed manifest."""
    return f"{swarm_id}.manifest"


@dataclass(frozen=True)
class Entry:
    """An opened, verified membership entry."""

    body: dict[str, Any]  # the heartbeat, decoded (string keys; values unchecked)
    expiration: float  # as signed


def _signed_payload(key: str, subkey: str, expiration: float, body: bytes) -> bytes:
    k, s = key.encode(), subkey.encode()
    return (len(k).to_bytes(2, "big") + k + len(s).to_bytes(2, "big") + s
            + struct.pack(">d", expiration) + body)


def seal_entry(key: Ed25519PrivateKey, *, dht_key: str, body: Mapping[str, Any],
               expiration: float) -> bytes:
    """Entry bytes for ``body`` under ``key``'s own subkey (its peer id) at ``dht_key``,
    valid until ``expiration`` (DHT time). A body over ``MAX_BODY`` is our bug: ValueError."""
    raw = pack(dict(body))
    if len(raw) > MAX_BODY:
        raise ValueError(f"heartbeat body of {len(raw)} bytes > {MAX_BODY}")
    try:  # what every reader will check: better to fail here than be silently dropped
        _open_body(raw)
    except Rejected as e:
        raise ValueError(f"heartbeat body refused by our own reader: {e}") from None
    expiration = float(expiration)
    subkey = peer_id_of_key(public_key_bytes(key))
    sig = sign_bytes(key, ENTRY_TAG, _signed_payload(dht_key, subkey, expiration, raw))
    return pack([VERSION, raw, expiration, sig])


def _unpack(data: bytes, reason: str, what: str, *, items: int, strs: int) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=strs,
                               max_bin_len=MAX_BODY, max_array_len=items,
                               max_map_len=items if strs else 0, max_ext_len=0)
    except _UNPACK_ERRORS as e:
        raise Rejected(reason, f"{what}: {type(e).__name__}") from None


def open_entry(data: Any, *, dht_key: str, subkey: Any, expiration: Any,
               now: float) -> Entry:
    """The verified entry stored as ``data`` under ``subkey`` of ``dht_key`` with the DHT
    expiration ``expiration``, or ``Rejected(reason)`` (see the module docstring for the
    order of checks). ``now`` is DHT (wall-clock) time."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise Rejected("malformed", f"an entry is bytes, not {type(data).__name__}")
    if len(data) > MAX_ENTRY:
        raise Rejected("oversized", f"{len(data)} > {MAX_ENTRY} bytes")
    obj = _unpack(bytes(data), "malformed", "entry", items=4, strs=0)
    if not (isinstance(obj, list) and len(obj) == 4):
        raise Rejected("malformed", "not a 4-element entry")
    version, body, signed_exp, signature = obj
    if type(version) is not int or version != VERSION:
        raise Rejected("bad_version", repr(version)[:40])
    if not isinstance(body, bytes):
        raise Rejected("bad_field", "body is not bytes")
    if type(signed_exp) is not float:
        raise Rejected("bad_field", "expiration is not a float")
    if not isinstance(signature, bytes) or len(signature) != SIG_BYTES:
        raise Rejected("bad_field", f"signature is not {SIG_BYTES} bytes")
    if not isinstance(subkey, str) or not 0 < len(subkey) <= MAX_PEER_ID:
        raise Rejected("bad_peer_id", repr(subkey)[:80])
    public_key = public_key_of_peer(subkey)  # Rejected("bad_peer_id") for anything else
    if not isinstance(dht_key, str) or len(dht_key) > MAX_KEY:
        raise ValueError("the DHT key is ours and must be a short string")  # our bug
    if (not isinstance(expiration, (int, float)) or not math.isfinite(expiration)
            or not math.isfinite(signed_exp)):
        raise Rejected("bad_expiration", "not a finite number")
    if expiration > signed_exp:
        raise Rejected("expiration_mismatch", f"stored until {expiration:.3f}, signed "
                       f"until {signed_exp:.3f}")
    if signed_exp > now + MAX_AHEAD:
        raise Rejected("too_far_ahead", f"expires {signed_exp - now:.0f} s from now "
                       f"> {MAX_AHEAD:.0f} s")
    if not verify_bytes(public_key, ENTRY_TAG,
                        _signed_payload(dht_key, subkey, signed_exp, body), signature):
        raise Rejected("bad_signature", f"not signed by {subkey[:60]} for {dht_key[:60]}")
    return Entry(_open_body(body), signed_exp)


def _open_body(body: bytes) -> dict[str, Any]:
    fields = _unpack(body, "bad_body", "body", items=MAX_ITEMS, strs=MAX_STR)
    if not (isinstance(fields, dict) and all(isinstance(k, str) for k in fields)):
        raise Rejected("bad_body", "a heartbeat is a map with string keys")
    _check_depth(fields, MAX_DEPTH)
    return fields


def _check_depth(obj: Any, limit: int) -> None:
    """``Rejected("bad_body")`` if containers nest more than ``limit`` deep in ``obj``. A
    loop, not recursion: msgpack accepts up to 1024 levels, Python's stack fewer."""
    todo = [(obj, 1)]
    while todo:
        value, depth = todo.pop()
        if depth > limit:
            raise Rejected("bad_body", f"containers nested more than {limit} deep")
        if isinstance(value, dict):
            todo.extend((v, depth + 1) for v in value.values() if isinstance(v, (dict, list)))
        elif isinstance(value, list):
            todo.extend((v, depth + 1) for v in value if isinstance(v, (dict, list)))


def check_manifest(blob: Any, *, swarm_id: str, expiration: Any,
                   now: float) -> manifest.Manifest:
    """The manifest, if ``blob`` may stand at ``manifest_key(swarm_id)`` until
    ``expiration``: it is the signed manifest that id names, and it expires within
    ``MANIFEST_MAX_AHEAD``. Else ``Rejected`` with manifest.verify's reasons, or
    ``bad_expiration``/``too_far_ahead``."""
    if not isinstance(expiration, (int, float)) or not math.isfinite(expiration):
        raise Rejected("bad_expiration", "not a finite number")
    if expiration > now + MANIFEST_MAX_AHEAD:
        raise Rejected("too_far_ahead", f"expires {expiration - now:.0f} s from now "
                       f"> {MANIFEST_MAX_AHEAD:.0f} s")
    return manifest.verify(blob, swarm_id)
