"""Signed contributions: an Ed25519 envelope around wire messages.

Why sign at all, when libp2p already authenticates every stream? Because a message is not
only heard from its author. SPSA records are relayed and served to late joiners, and a
public swarm needs evidence it can hand on: a signed record proves who said it to anyone,
not only to the peer at the other end of the stream.

Envelope (a msgpack array, ``MAX_OVERHEAD`` bytes on top of the message)::

    [version = 1, signer: bin 32, message: bin, signature: bin 64]

``signer`` is the raw Ed25519 public key; ``message`` is ``wire.encode``'s output, which
already carries its type, its step or round and (for SPSA records) its peer. The signature
covers ``SIGN_TAG ‖ u16-be len(swarm) ‖ swarm (utf-8) ‖ message``: the domain tag keeps a
message signature from ever passing as a manifest or an admission token, and the swarm
keeps it from being replayed into another swarm. Ed25519 already hashes the public key
into what it signs, so the key needs no place in the signed bytes.

``open_signed`` checks, in order, and raises ``Rejected(reason)`` at the first problem:
size (``oversized``), shape (``malformed``), version (``bad_version``), fields
(``bad_field``), the signature (``bad_signature``), and only then decodes the message with
``wire.decode`` (its own reasons). A message that names its peer must name the signer
(``wrong_signer``), and if the caller says who it expects, the signer must be that peer.
Authenticate first, parse second: a body's validators never see unsigned bytes.

Peer ids and keys. A libp2p Ed25519 peer id is the public key itself, wrapped:
base58btc of an identity multihash of the key's protobuf::

    00 24             multihash: identity function, 36 bytes follow
    08 01 12 20       protobuf PublicKey: key_type = Ed25519 (1), data = 32 bytes
    <32-byte key>

so ``12D3KooW…`` converts to the raw key and back without any lookup (``peer_id_of_key``,
``public_key_of_peer``). ``node/identity.py`` holds the key file; these are pure.

Replays. A signature does not stop the same signed bytes from arriving twice; what does is
that every message names its step or round (and an SPSA record its peer) inside the
signed bytes, and each algorithm accepts one message per (peer, step or round, part) and
refuses those of finished steps (``duplicate``, ``too_late``, ``stale`` in optim/). The
swarm in the signed payload keeps a message from being replayed into another swarm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import base58
import msgpack
from byteswarm.optim.sansio import Rejected
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from . import wire

VERSION = 1
KEY_BYTES = 32
SIG_BYTES = 64
SIGN_TAG = b"byteswarm/message/v1\0"
MAX_OVERHEAD = 128  # envelope bytes beyond the message: array, version, key, signature
NO_CONTEXT = wire.Context()

# --- keys and signatures -------------------------------------------------------------------


def pack(obj: Any) -> bytes:
    """msgpack bytes, starting from a small buffer: ``msgpack.packb`` reserves 256 kB on
    every call, which a decoder that re-packs what it received should not."""
    return msgpack.Packer(use_bin_type=True, buf_size=1024).pack(obj)


def public_key_bytes(key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key of a private key."""
    return key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)


def sign_bytes(key: Ed25519PrivateKey, tag: bytes, payload: bytes) -> bytes:
    """Ed25519 signature of ``tag ‖ payload`` (the tag is a domain separator)."""
    return key.sign(tag + payload)


def verify_bytes(public_key: bytes, tag: bytes, payload: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s over ``tag ‖ payload``; never raises for
    junk (a key or signature of the wrong length is simply not valid)."""
    if len(public_key) != KEY_BYTES or len(signature) != SIG_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, tag + payload)
    except (InvalidSignature, ValueError):
        return False
    return True


def check_key(value: Any, name: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != KEY_BYTES:
        raise Rejected("bad_field", f"{name} is not a {KEY_BYTES}-byte key")
    return value


# --- libp2p peer ids -------------------------------------------------------------------------

PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])  # see the module docstring
MAX_PEER_ID = 64  # characters; an Ed25519 peer id has 52


def peer_id_of_key(public_key: bytes) -> str:
    """The libp2p peer id (``12D3KooW…``) of a raw Ed25519 public key."""
    if len(public_key) != KEY_BYTES:
        raise ValueError(f"an Ed25519 public key has {KEY_BYTES} bytes, not {len(public_key)}")
    return base58.b58encode(PEER_ID_PREFIX + public_key).decode()


def public_key_of_peer(peer_id: str) -> bytes:
    """The raw Ed25519 public key inside a libp2p peer id, or ``Rejected("bad_peer_id")``
    (not base58, or not an identity-multihashed Ed25519 key: e.g. an RSA peer id)."""
    if not isinstance(peer_id, str) or not 0 < len(peer_id) <= MAX_PEER_ID:
        raise Rejected("bad_peer_id", repr(peer_id)[:80])  # bounded before the big-int math
    try:
        raw = base58.b58decode(peer_id)
    except ValueError:  # a character outside the base58 alphabet
        raise Rejected("bad_peer_id", f"{peer_id[:60]} is not base58") from None
    if len(raw) != len(PEER_ID_PREFIX) + KEY_BYTES or not raw.startswith(PEER_ID_PREFIX):
        raise Rejected("bad_peer_id", f"{peer_id[:60]} is not an Ed25519 peer id")
    return raw[len(PEER_ID_PREFIX):]


# --- the envelope ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Signed:
    """An opened envelope: structurally valid, signature not yet checked."""

    signer: bytes  # raw Ed25519 public key
    message: bytes  # wire.encode output
    signature: bytes

    @property
    def peer(self) -> str:
        return peer_id_of_key(self.signer)


def _signed_payload(swarm: str, message: bytes) -> bytes:
    s = swarm.encode()
    return len(s).to_bytes(2, "big") + s + message


def seal(message: bytes, *, swarm: str, key: Ed25519PrivateKey) -> bytes:
    """Envelope bytes for ``message`` (``wire.encode`` output) signed with ``key``."""
    sig = sign_bytes(key, SIGN_TAG, _signed_payload(swarm, message))
    return pack([VERSION, public_key_bytes(key), bytes(message), sig])


def open_envelope(data: bytes, *, max_bytes: int) -> Signed:
    """Envelope bytes to a ``Signed``, checking size and shape only (see ``open_signed``)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise Rejected("malformed", "not bytes")
    if len(data) > max_bytes:
        raise Rejected("oversized", f"{len(data)} > {max_bytes} bytes")
    try:
        obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True,
                              max_str_len=0, max_bin_len=max_bytes, max_array_len=4,
                              max_map_len=0, max_ext_len=0)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError,
            TypeError, UnicodeDecodeError) as e:
        raise Rejected("malformed", type(e).__name__) from None
    if not (isinstance(obj, list) and len(obj) == 4):
        raise Rejected("malformed", "not a 4-element signed envelope")
    version, signer, message, signature = obj
    if type(version) is not int or version != VERSION:
        raise Rejected("bad_version", repr(version)[:40])
    if not isinstance(message, bytes):
        raise Rejected("bad_field", "message is not bytes")
    if not isinstance(signature, bytes) or len(signature) != SIG_BYTES:
        raise Rejected("bad_field", f"signature is not {SIG_BYTES} bytes")
    return Signed(check_key(signer, "signer"), message, signature)


def check_signature(env: Signed, *, swarm: str) -> None:
    """``Rejected("bad_signature")`` unless ``env.signer`` signed ``env.message`` for
    ``swarm``."""
    if not verify_bytes(env.signer, SIGN_TAG, _signed_payload(swarm, env.message),
                        env.signature):
        raise Rejected("bad_signature", "the signature does not match the signer and message")


def max_signed_bytes(ctx: wire.Context = NO_CONTEXT) -> int:
    """The largest envelope any registered message type can make for this context."""
    return wire.max_message_bytes(ctx) + MAX_OVERHEAD


def open_signed(data: bytes, *, swarm: str, ctx: wire.Context = NO_CONTEXT,
                expect: str | None = None, max_bytes: int | None = None) -> tuple[str, Any]:
    """Envelope bytes to ``(signer peer id, message)``, or ``Rejected(reason)``.

    ``expect``: the peer id the caller knows sent it (the authenticated stream's remote
    peer, for a direct message); leave it None for relayed messages, whose author is the
    signer. A message with a ``peer`` field (an SPSA record) must be the signer's own.
    """
    if max_bytes is None:
        max_bytes = max_signed_bytes(ctx)
    env = open_envelope(data, max_bytes=max_bytes)
    check_signature(env, swarm=swarm)
    signer = env.peer
    if expect is not None and signer != expect:
        raise Rejected("wrong_signer", f"signed by {signer[:60]}, sent as {expect[:60]}")
    msg = wire.decode(env.message, swarm=swarm, ctx=ctx,
                      max_bytes=max_bytes - MAX_OVERHEAD)
    named = getattr(msg, "peer", None)
    if named is not None and named != signer:
        raise Rejected("wrong_signer", f"a message naming {named[:60]} signed by another key")
    return signer, msg
